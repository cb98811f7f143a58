"""Held-out exact match of the fine-tuned demo model per llama.cpp quant type, on SmolLM2 itself and
on the widened fixture (benchmarks/widen.py), into benchmarks/results/.

    python benchmarks/quant_exact_match.py                      # the small fixture (0.94 B, minutes)
    python benchmarks/quant_exact_match.py --shape 7b           # the 7B fixture (slow)

Why: the fixture computes SmolLM2-135M's function in wider rows, which take k-quants, while
SmolLM2's own 576-wide rows fall back to Q5_0 inside "Q4_K_M". This measures, on the same held-out
rows evaluate scores, what each type does to the fine-tuned answers: the native model at Q4_K_M
(fallbacks) and Q4_0, the fixture at Q4_0, Q4_K_S, Q4_K_M (with and without an importance matrix),
Q5_K_M and Q8_0. Needs the demo run's adapter (`invoke pipeline` on configs/demo.yaml).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host import hardware, write_result  # noqa: E402
from widen import widen_adapter, widen_model  # noqa: E402

from stages.common.artifacts import package_versions  # noqa: E402
from stages.common.config import load_config  # noqa: E402
from stages.common.data import plain_text, train_and_held_out  # noqa: E402
from stages.common.gguf_runtime import GGUFModel  # noqa: E402
from stages.common.layout import RunLayout  # noqa: E402
from stages.convert import convert_checkpoint  # noqa: E402
from stages.quantize import compute_imatrix, quantize_file  # noqa: E402

SOURCE = ROOT / "cache" / "models" / "SmolLM2-135M-Instruct"
ROWS = 40  # what evaluate scores at 7B (eval.example_budget)
FIXTURE_TYPES = ("Q4_0", "Q4_K_S", "Q4_K_M", "Q4_K_M+imatrix", "Q5_K_M", "Q8_0")


def exact_match(gguf: Path, pairs) -> float:
    """evaluate.score's rule: greedy, the GGUF's chat template, stripped answer == reference."""
    hits = 0
    with GGUFModel(gguf, n_ctx=2048) as model:
        for messages, want in pairs:
            got = model.generate(model.prompt_tokens(model.chat_prompt(messages)), 32)
            hits += got.text.strip() == want.strip()
    return hits / len(pairs)


def quantized(f16: Path, work: Path, name: str, train_text: str, embeddings: str | None) -> Path:
    qtype, _, extra = name.partition("+")
    imatrix = None
    if extra == "imatrix":
        imatrix = work / f"{f16.stem}.imatrix.gguf"
        if not imatrix.is_file():
            compute_imatrix(f16, train_text, imatrix, 16)
    out = work / f"{f16.stem}.{name}.gguf"
    quantize_file(f16, out, qtype, embeddings, imatrix=imatrix)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=("small", "7b"))
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    demo = load_config(ROOT / "configs" / "demo.yaml")
    adapter = RunLayout.of(demo, ROOT / "runs" / demo.run_name).adapter
    split = train_and_held_out(demo.data, demo.training.seed)
    pairs = [(r["prompt"], r["completion"][0]["content"]) for r in split.held_out][:ROWS]
    train_text = plain_text(split.train)
    rows: dict[str, dict[str, float]] = {"native": {}, "fixture": {}}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        work = Path(tmp)
        merge = [sys.executable, "-m", "stages.merge", "--adapter"]
        for kind, base, adapter_dir in (
            ("native", SOURCE, adapter),
            ("fixture", work / "model", work / "adapter"),
        ):
            if kind == "fixture":
                widen_model(SOURCE, base, args.shape)
                widen_adapter(adapter, adapter_dir, SOURCE, args.shape)
            merged = work / f"{kind}-merged"
            subprocess.run([*merge, str(adapter_dir), "--base", str(base), "--output", str(merged)], check=True)
            f16 = work / f"{kind}.f16.gguf"
            convert_checkpoint(merged, f16, "f16", kind)
            # The demo keeps SmolLM2's tied embeddings (its output layer too) at f16, as configs/demo.yaml does.
            types, embeddings = (("Q4_K_M", "Q4_0"), "f16") if kind == "native" else (FIXTURE_TYPES, None)
            for name in types:
                rows[kind][name] = exact_match(quantized(f16, work, name, train_text, embeddings), pairs)
                print(f"{kind} {name}: {rows[kind][name]:.3f}", flush=True)
    result = {
        "benchmark": "quant_exact_match",
        "command": " ".join(["python", "benchmarks/quant_exact_match.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": args.shape,
        "rows": len(pairs),
        "exact_match": rows,
        "wall_s": round(time.monotonic() - t0, 1),
        "host": hardware(),
        "versions": package_versions(),
    }
    print(write_result(args.results, f"quant-exact-match-{args.shape}", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
