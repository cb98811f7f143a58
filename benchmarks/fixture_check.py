"""Check that a widened checkpoint (benchmarks/widen.py) computes its source's function, and that the
padded adapter merged into it computes the merged source's: the 7B fixture's acceptance check.

    python benchmarks/fixture_check.py                       # builds the 7B fixture and adapter if missing
    python benchmarks/fixture_check.py --rows 24 --shape small --fixture /tmp/smol-small --adapter-out /tmp/ad

On the demo's held-out rows (cache/data/demo-dates/eval.jsonl, rendered with the chat template),
every position's logits of the widened model, run layer by layer by stages/common/hf_stream.py in
float32, are compared with the source's (transformers, float32): top-1 agreement, max |logit
difference|, perplexity of the next tokens. Then the padded adapter is merged into the widened model
with the merge stage (standalone mode, float16, into a temporary folder deleted afterwards) and the
source + adapter merged the same way is the reference. The yardstick for "within bf16 tolerance" is
measured on the same positions: the source itself run with bfloat16 instead of float32 compute.
The JSON lands in benchmarks/results/fixture-<shape>-check-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages.common.artifacts import package_versions  # noqa: E402
from stages.common.hf_stream import stream_logits  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
SMOLLM2 = ROOT / "cache" / "models" / "SmolLM2-135M-Instruct"
DEMO_ADAPTER = ROOT / "runs" / "demo" / "adapter"
FIXTURE_7B = ROOT / "cache" / "models" / "SmolLM2-7B-widened"
ADAPTER_7B = ROOT / "cache" / "adapters" / "demo-7b"


def held_out_chunks(model_dir: Path, eval_file: Path | None = None, rows: int | None = None) -> list[list[int]]:
    """The demo's held-out rows as the chat template renders them, tokenized (one chunk per row)."""
    from transformers import AutoTokenizer

    from stages.common.config import load_config
    from stages.common.data import load_rows

    cfg = load_config(DEMO_CONFIG)
    files = [str(eval_file)] if eval_file else [str(ROOT / f) for f in cfg.data.eval_files]
    found, _ = load_rows(files, cfg.data)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [
        list(tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False))
        for r in found[:rows]
    ]


def reference_logits(model_dir: Path, chunks: list[list[int]], dtype: str = "float32") -> list[Any]:
    """Whole-model logits from transformers (small models only), one [len, vocab] float32 tensor per chunk."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.inference_mode():
        out = [model(torch.tensor([c])).logits[0].float() for c in chunks]
    del model
    return out


def compare(reference: list[Any], chunks: list[list[int]], logits_of) -> dict[str, Any]:
    """Agreement of a model's logits with the reference's at every position; logits_of(consume) runs the
    model and calls consume(chunk index, first position, logits) (hf_stream.stream_logits's protocol)."""
    import torch

    agree = total = 0
    max_diff = 0.0
    per_position: list[Any] = []
    nll = {"reference": 0.0, "model": 0.0}
    scored = 0

    def consume(i: int, p: int, logits) -> None:
        nonlocal agree, total, max_diff, scored
        ref = reference[i][p : p + logits.shape[0]]
        diff = (logits - ref).abs().amax(-1)
        per_position.append(diff)
        max_diff = max(max_diff, float(diff.max()))
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        total += logits.shape[0]
        targets = torch.tensor(chunks[i][p + 1 : p + 1 + logits.shape[0]], dtype=torch.long)
        n = len(targets)
        for key, lg in (("reference", ref), ("model", logits)):
            nll[key] += float(torch.nn.functional.cross_entropy(lg[:n].double(), targets, reduction="sum"))
        scored += n

    t0 = time.monotonic()
    logits_of(consume)
    diffs = torch.cat(per_position)
    ppl = {k: float(torch.tensor(v / scored).exp()) for k, v in nll.items()}
    return {
        "positions": total,
        "top1_agreement": agree / total,
        "top1_disagreements": total - agree,
        "max_abs_logit_diff": max_diff,
        "mean_max_abs_logit_diff": float(diffs.mean()),
        "p99_max_abs_logit_diff": float(diffs.quantile(0.99)),
        "perplexity_reference": ppl["reference"],
        "perplexity_model": ppl["model"],
        "perplexity_relative_delta": ppl["model"] / ppl["reference"] - 1,
        "seconds": round(time.monotonic() - t0, 1),
    }


def streamed(model_dir: Path, chunks: list[list[int]], dtype: str = "float32", log=None):
    """compare()'s logits_of for a checkpoint run layer by layer."""
    return lambda consume: stream_logits(model_dir, chunks, consume, dtype=dtype, log=log)


def yardstick(model_dir: Path, chunks: list[list[int]], reference: list[Any]) -> dict[str, Any]:
    """What bfloat16 compute does to the source's own logits: the tolerance the widened model must meet."""
    return compare(reference, chunks, streamed(model_dir, chunks, "bfloat16"))


def merge(base: Path, adapter: Path, out: Path, dtype: str = "float16") -> dict[str, Any]:
    """The merge stage, standalone, as its own process (its peak RSS stays its own); its metrics."""
    metrics = out.with_name(out.name + ".metrics.json")
    cmd = [sys.executable, "-m", "stages.merge", "--base", str(base), "--adapter", str(adapter), "--output", str(out)]
    try:
        cmd += ["--dtype", dtype, "--metrics-json", str(metrics)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(metrics.read_text())
    finally:
        metrics.unlink(missing_ok=True)


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def dir_gb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9, 3)


def main(argv: list[str] | None = None) -> int:
    import psutil
    import widen  # benchmarks/widen.py, next to this file

    p = argparse.ArgumentParser(prog="python benchmarks/fixture_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(widen.SHAPES), default="7b", help="target shape")
    p.add_argument("--source", type=Path, default=SMOLLM2, help="source checkpoint (prepare stage's SmolLM2)")
    p.add_argument("--adapter", type=Path, default=DEMO_ADAPTER, help="the source's LoRA adapter (demo run's)")
    p.add_argument("--fixture", type=Path, default=FIXTURE_7B, help="widened checkpoint; built when missing")
    p.add_argument("--adapter-out", type=Path, default=ADAPTER_7B, help="padded adapter; built when missing")
    p.add_argument("--eval-file", type=Path, help="held-out rows (default: the demo config's eval file)")
    p.add_argument("--rows", type=int, default=None, help="held-out rows to use (default: all)")
    p.add_argument("--workdir", type=Path, default=ROOT / "cache", help="where the temporary merges go")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON")
    args = p.parse_args(argv)

    # Setup: the fixture and the padded adapter (built once), the held-out chunks, the references.
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": "fixture-check",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/fixture_check.py", *(argv or sys.argv[1:])]),
        "shape": args.shape,
        "host": {
            "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "versions": package_versions(),
    }
    for what, path, build in (
        ("fixture", args.fixture, lambda: widen.widen_model(args.source, args.fixture, args.shape)),
        (
            "adapter",
            args.adapter_out,
            lambda: widen.widen_adapter(args.adapter, args.adapter_out, args.source, args.shape, str(args.fixture)),
        ),
    ):
        if path.exists():
            result[what] = {
                "built": False,
                "current": widen.is_current(path, args.source, args.shape, None if what == "fixture" else args.adapter),
            }
        else:
            t = time.monotonic()
            result[what] = {"built": True, **build(), "wall_s": round(time.monotonic() - t, 1)}
        result[what].update(path=str(path), size_gb=dir_gb(path))
        print(what, json.dumps(result[what]), flush=True)
    chunks = held_out_chunks(args.source, args.eval_file, rows=args.rows)
    result["held_out"] = {"rows": len(chunks), "tokens": sum(map(len, chunks))}
    log = lambda s: print(s, flush=True)  # noqa: E731

    # Run: base vs source, bf16 yardstick, then the merged pair.
    ref = reference_logits(args.source, chunks)
    result["yardstick_source_bf16_vs_f32"] = yardstick(args.source, chunks, ref)
    print("yardstick", json.dumps(result["yardstick_source_bf16_vs_f32"]), flush=True)
    result["fixture_vs_source"] = compare(ref, chunks, streamed(args.fixture, chunks, log=log))
    print("fixture", json.dumps(result["fixture_vs_source"]), flush=True)
    del ref
    small_merged = args.workdir / f".tmp-check-merged-source-{os.getpid()}"
    big_merged = args.workdir / f".tmp-check-merged-fixture-{os.getpid()}"
    try:
        merge(args.source, args.adapter, small_merged)
        ref = reference_logits(small_merged, chunks)
        stats = merge(args.fixture, args.adapter_out, big_merged)
        result["merge_fixture"] = {k: stats.get(k) for k in ("wall_s", "peak_rss_gib", "bytes_written", "shards")}
        result["merged_fixture_vs_merged_source"] = compare(ref, chunks, streamed(big_merged, chunks, log=log))
        print("merged", json.dumps(result["merged_fixture_vs_merged_source"]), flush=True)
    finally:
        # Cleanup: the merged checkpoints are as large as the fixture; only the fixture and adapter stay.
        shutil.rmtree(small_merged, ignore_errors=True)
        shutil.rmtree(big_merged, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["peak_rss_gib"] = round(peak_rss_gib(), 2)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"fixture-{args.shape}-check-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
