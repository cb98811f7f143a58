"""The laptop path at 7B: merge, convert, quantize, report, smoke and evaluate on a 7.4 B-parameter
model, timed and sized per stage, with the quality figures, into benchmarks/results/.

    python benchmarks/scale_7b.py                                   # local runtime
    python benchmarks/scale_7b.py --runtime docker --memory 16g     # each stage in its container, 16 GiB, no swap

Inputs, built once and reused (benchmarks/widen.py): the 7B fixture, SmolLM2-135M-Instruct widened
to Mistral-7B's shapes (cache/models/SmolLM2-7B-widened, 14.8 GB), and the demo's adapter padded
to it (cache/adapters/demo-7b); the demo pipeline's train stage runs first when its adapter is
missing. Then, from a fresh run folder:

    invoke pipeline --config configs/dates-7b.yaml --from merge --adapter cache/adapters/demo-7b

Recorded per stage: wall time (the stage process's lifetime, from its manifest), peak RSS and
peak anonymous RSS of its process tree (host.ProcessWatch: what no file backs, so what a memory
limit cannot reclaim), bytes written. For the run: peak disk of the run folder, cache/gguf and the
base model, the quality figures (conversion check, KL per type, exact match, smoke), the host
(cores, RAM, load average before and during) and the package versions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host import DiskWatch, ProcessWatch, hardware, stamp, write_result  # noqa: E402
from widen import is_current, widen_adapter, widen_model  # noqa: E402

from stages.common import names, specs  # noqa: E402
from stages.common.artifacts import package_versions, read_manifest  # noqa: E402
from stages.common.config import load_config  # noqa: E402
from stages.common.layout import RunLayout, cache_dir  # noqa: E402

CONFIG = ROOT / "configs" / "dates-7b.yaml"
DEMO = ROOT / "configs" / "demo.yaml"
SOURCE = ROOT / "cache" / "models" / "SmolLM2-135M-Instruct"
FIXTURE = ROOT / "cache" / "models" / "SmolLM2-7B-widened"
ADAPTER = ROOT / "cache" / "adapters" / "demo-7b"
TARGETS = {
    "wall_s_all_stages": 3600,
    "container_memory_limit_gib": 16,
    "anon_peak_gib_per_stage": 8,
    "peak_disk_gb": 60,
    "finetuned_exact_match_min": 0.8,
    "base_exact_match_max": 0.3,
    "f16_top1_vs_hf_min": 0.99,
}


def invoke(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, check=True)


def inputs(log=print) -> dict:
    """The fixture and the padded adapter, built when missing or stale."""
    demo = load_config(DEMO)
    demo_adapter = RunLayout.of(demo, ROOT / names.RUNS_DIR / demo.run_name).adapter
    if read_manifest(demo_adapter.parent, names.TRAIN) is None:
        log("the demo adapter is missing: running the demo pipeline up to train")
        invoke("pipeline", "--config", str(DEMO), "--runtime", "local")
    built = {}
    t0 = time.monotonic()
    if not is_current(FIXTURE, SOURCE, "7b"):
        built["model"] = widen_model(SOURCE, FIXTURE, "7b", log=log)
    if not is_current(ADAPTER, SOURCE, "7b", adapter=demo_adapter):
        built["adapter"] = widen_adapter(demo_adapter, ADAPTER, SOURCE, "7b")
    return {"built_s": round(time.monotonic() - t0, 1) if built else 0.0, "built": sorted(built)}


def quality(run_dir: Path) -> dict:
    report = (read_manifest(run_dir, names.REPORT) or {}).get(names.M_METRICS, {}).get("report", {})
    evaluate = (read_manifest(run_dir, names.EVALUATE) or {}).get(names.M_METRICS, {})
    smoke = (read_manifest(run_dir, names.SMOKE) or {}).get(names.M_METRICS, {})
    return {
        "conversion": report.get("conversion"),
        "types": [
            {k: r.get(k) for k in ("type", "size_bytes", "bits_per_weight", "perplexity", "kl_mean", "top1_agreement")}
            for r in report.get("types", [])
        ],
        "scored_tokens": report.get("text"),
        "smoke_answers": [(a["input"], a["output"], a["stopped_at_eos"]) for a in smoke.get("answers", [])],
        "base_exact_match": evaluate.get("base_exact_match"),
        "finetuned_exact_match": evaluate.get("finetuned_exact_match"),
        "eval_rows": evaluate.get("n"),
    }


def stage_rows(run_dir: Path, summary: dict, watch: ProcessWatch) -> list[dict]:
    rows = []
    for row in summary["stages"]:
        manifest = read_manifest(run_dir, row["stage"]) or {}
        outputs = manifest.get(names.M_OUTPUTS, {})
        peak = watch.peaks.get(specs.spec(row["stage"]).module, {})
        rows.append(
            {
                "stage": row["stage"],
                "status": row["status"],
                "wall_s": manifest.get(names.M_DURATION) if row["status"] == "ran" else 0.0,
                "orchestrated_s": row["seconds"],
                "peak_rss_gib": round(peak.get("rss", 0) / 2**30, 2),
                "peak_anon_gib": round(peak.get("anon", 0) / 2**30, 2),
                "bytes_written": sum(o[names.M_SIZE] for o in outputs.values()),
                "pruned": manifest.get(names.M_PRUNED, []),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runtime", choices=("local", "docker"), default="local")
    p.add_argument("--memory", default=None, help="docker: memory limit per container, e.g. 16g (swap off)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value for this run (repeatable), as invoke pipeline --set",
    )
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--keep-run", action="store_true", help="keep the run folder afterwards (it holds ~18 GB)")
    args = p.parse_args(argv)

    before = hardware()
    prepared = inputs()
    cfg = load_config(CONFIG, args.overrides)
    run_dir = ROOT / names.RUNS_DIR / f"{cfg.run_name}-{args.runtime}"
    shutil.rmtree(run_dir, ignore_errors=True)
    base_gguf = cache_dir() / "gguf"
    cmd = ["pipeline", "--config", str(CONFIG), "--from", names.MERGE, "--adapter", str(ADAPTER)]
    cmd += ["--run-dir", str(run_dir.relative_to(ROOT)), "--runtime", args.runtime]
    if args.memory:
        cmd += ["--memory", args.memory]
    cmd += [a for o in args.overrides for a in ("--set", o)]
    started = datetime.now(UTC)
    t0 = time.monotonic()
    with ProcessWatch() as watch, DiskWatch([run_dir, base_gguf]) as disk:
        proc = subprocess.run([sys.executable, "-m", "invoke", *cmd], cwd=ROOT)
    wall = time.monotonic() - t0
    summary_path = RunLayout(run_dir, cfg.run_name).summary_json
    if not summary_path.is_file():  # refused before any stage ran (preflight printed why)
        print(f"no stage ran (invoke exited {proc.returncode}); nothing to record", file=sys.stderr)
        return proc.returncode or 1
    summary = json.loads(summary_path.read_text())
    stages = stage_rows(run_dir, summary, watch)
    base_bytes = sum(f.stat().st_size for f in FIXTURE.glob("*.safetensors"))
    result = {
        "benchmark": "scale_7b",
        "command": " ".join(["python", "benchmarks/scale_7b.py", *(argv if argv is not None else sys.argv[1:])]),
        "pipeline_command": "invoke " + " ".join(cmd),
        "started_at": started.isoformat(timespec="seconds"),
        "exit_code": proc.returncode,
        "runtime": args.runtime,
        "memory_limit": args.memory,
        "overrides": args.overrides,
        "host": {**before, "load_average_during": watch.loads},
        "versions": package_versions(),
        "inputs": prepared,
        "model": {"path": str(FIXTURE.relative_to(ROOT)), "safetensors_bytes": base_bytes},
        "wall_s": round(wall, 1),
        "stages_wall_s": round(sum(s["wall_s"] or 0 for s in stages), 1),
        "stages": stages,
        # The base model stays for the whole run; the run folder and cache/gguf (the base model's
        # GGUF for evaluate) peak on top of it.
        "peak_disk_bytes": base_bytes + disk.peak,
        "quality": quality(run_dir),
        "targets": TARGETS,
    }
    tag = f"{args.runtime}{'-' + args.memory if args.memory else ''}{'-set' if args.overrides else ''}"
    out = write_result(args.results, f"scale-7b-{tag}", result, stamp(started))
    if not args.keep_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{out}: exit {proc.returncode}, {wall / 60:.1f} min, peak disk {result['peak_disk_bytes'] / 1e9:.1f} GB")
    for s in stages:
        rss, anon = s["peak_rss_gib"], s["peak_anon_gib"]
        print(f"  {s['stage']:9} {s['wall_s'] or 0:7.1f} s  RSS {rss:5.2f} GiB  anon {anon:5.2f} GiB")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
