"""Does a change of training semantics keep the loss curve? Trains twice through the train stage, A and
B differing only by the given overrides (same seed, data order and batches), and compares the logged
training loss at equal trained tokens; one JSON result in benchmarks/results/.

    python benchmarks/loss_curve.py --profile 24gb --a lora.dropout=0.1 [--steps 100]

Model: a real one, SmolLM2-135M-Instruct from the demo (`invoke stage prepare`), under the reference
recipe (configs/mistral-7b-guanaco.yaml: r=64, alpha 16 on q,k,v,o,gate, lr 2e-4 constant, paged
8-bit AdamW) and a throughput profile's overrides (benchmarks/train_throughput.py).
Data: real text present offline on every host, cut from the Python standard library's sources
(`--data` takes any JSONL of {"text": ...} rows instead); its sha256 goes into the result.
Criterion (issue 4): each logging window's mean loss of B within 2% of A's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import sysconfig
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import PROFILES  # noqa: E402

from stages.common import names  # noqa: E402
from stages.common.artifacts import package_versions, read_manifest  # noqa: E402
from stages.common.layout import RunLayout  # noqa: E402

MAX_TOKENS = 512


def stdlib_rows(path: Path, tokenizer_dir: Path, max_tokens: int, n_rows: int = 4000, chars: int = 1500) -> Path:
    """`n_rows` text rows of up to `chars` characters from the standard library's .py files, in sorted
    order, keeping those the model's tokenizer makes at most `max_tokens` long (the train stage drops
    longer rows); a given Python version always yields the same rows."""
    if path.is_file():
        return path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows: list[str] = []
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in source.parts or "site-packages" in source.parts:
            continue
        text = source.read_text(errors="replace")
        pieces = [text[i : i + chars] for i in range(0, len(text) - chars // 4, chars)]
        rows += [r for r in pieces if len(tok(r).input_ids) < max_tokens - 8]  # room for BOS/EOS
        if len(rows) >= n_rows:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:n_rows]))
    return path


def train(run_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "stages.train", "--config", str(ROOT / "configs" / "mistral-7b-guanaco.yaml")]
    cmd += ["--run-dir", str(run_dir), *(a for o in overrides for a in ("--set", o))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: training {overrides} failed:\n{proc.stderr[-3000:]}")
    log = json.loads(RunLayout(run_dir, "loss-curve").training_log.read_text())
    metrics = read_manifest(run_dir, names.TRAIN)["metrics"]
    windows = [(e["num_input_tokens_seen"], e["loss"]) for e in log if "loss" in e]
    return {"windows": windows, "eval_loss": metrics["eval_loss"], "tokens_per_s": metrics["tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="24gb", choices=sorted(PROFILES))
    p.add_argument("--a", action="append", default=[], help="override for run A (repeatable)")
    p.add_argument("--b", action="append", default=[], help="override for run B (repeatable)")
    p.add_argument("--model", type=Path, default=ROOT / "cache" / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--data", type=Path, help="JSONL of text rows (default: the standard library's sources)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-loss-curve"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"error: no model at {args.model}; run `invoke stage prepare` or pass --model", file=sys.stderr)
        return 2
    data = args.data or stdlib_rows(args.workdir / "stdlib.jsonl", args.model, MAX_TOKENS)
    common = [
        *PROFILES[args.profile],
        f"model.name_or_path={args.model}",
        "data.dataset=null",  # the recipe names the Hub dataset; this run trains on its own file
        f"data.train_files=[{data}]",
        f"data.max_seq_length={MAX_TOKENS}",
        f"training.max_steps={args.steps}",
        f"training.logging_steps={args.logging_steps}",
        f"training.save_steps={args.steps}",
    ]
    a = train(args.workdir / "a", [*common, *args.a])
    b = train(args.workdir / "b", [*common, *args.b])
    if [t for t, _ in a["windows"]] != [t for t, _ in b["windows"]]:
        raise SystemExit("error: A and B trained on different token counts; the comparison needs equal batches")
    rel = [abs(lb - la) / la for (_, la), (_, lb) in zip(a["windows"], b["windows"], strict=True)]
    import torch

    result = {
        "profile": args.profile,
        "a": args.a,
        "b": args.b,
        "overrides": common,
        "model": args.model.name,
        "data": {"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()},
        "tokens": [t for t, _ in a["windows"]],
        "loss_a": [la for _, la in a["windows"]],
        "loss_b": [lb for _, lb in b["windows"]],
        "max_relative_difference": round(max(rel), 4),
        "mean_relative_difference": round(sum(rel) / len(rel), 4),
        "eval_loss_a": a["eval_loss"],
        "eval_loss_b": b["eval_loss"],
        "tokens_per_s_a": a["tokens_per_s"],
        "tokens_per_s_b": b["tokens_per_s"],
        "tolerance": args.tolerance,
        "within_tolerance": max(rel) <= args.tolerance,
        "hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "versions": package_versions(("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel")),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "measured_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"loss-curve-{args.profile}-{result['measured_at']}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"max relative difference {result['max_relative_difference']:.2%} over {len(rel)} windows "
        f"(mean {result['mean_relative_difference']:.2%}); eval loss A {a['eval_loss']:.4f} B {b['eval_loss']:.4f}; "
        f"{'within' if result['within_tolerance'] else 'OUTSIDE'} {args.tolerance:.0%}; {name}"
    )
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
