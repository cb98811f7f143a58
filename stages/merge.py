"""Merge stage: fold a LoRA adapter into the base weights, one tensor at a time, on the CPU.

    # pipeline: model.name_or_path + runs/<run>/adapter -> runs/<run>/merged (the YAML's merge section)
    python -m stages.merge --config runs/demo/config.yaml
    docker compose run --rm merge python -m stages.merge --config runs/demo/config.yaml
    # standalone: OUT_DIR appears whole or not at all
    python -m stages.merge --base BASE_DIR --adapter ADAPTER_DIR --output OUT_DIR [--dtype bfloat16] [--verify]
    python -m stages.merge --base B --adapter A --output O --onto dequantized --compare-onto

Every merged tensor is bit-identical to peft's merge_and_unload; memory follows the largest tensor,
not the model. docs/merge.md explains --onto, --verify and --compare-onto, and gives the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stages.common import keys, names, specs
from stages.common.artifacts import check_free_disk, new_folder, sha256_file, stage_output, verify_manifest
from stages.common.cli import add_section_flags, context, section_from_flags, stage_parser
from stages.common.config import MergeConfig, QuantizationConfig
from stages.common.errors import console, run_stage
from stages.common.merge_checks import VERIFY, run_checks
from stages.common.merge_plan import Plan, make_plan
from stages.common.merge_write import DEFAULT_SHARD_GB, SIDE_FILES_BYTES, write_merged
from stages.common.model import resolve

SPEC = specs.spec(names.MERGE)
MERGE_FLAGS = ("dtype", "onto")
QUANT_FLAGS = ("quant_type", "double_quant", "compute_dtype")


def merge_into(plan: Plan, out_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write the merged checkpoint into out_dir (which the caller publishes), then run the checks."""
    stats = write_merged(plan, out_dir, int(args.shard_size * 1e9))
    return stats | run_checks(plan, out_dir, args.verify, args.compare_onto)


def standalone(args: argparse.Namespace) -> None:
    # Setup: the settings are the pipeline's config sections, built from the flags.
    merge = section_from_flags(args, MergeConfig, *MERGE_FLAGS)
    quant = section_from_flags(args, QuantizationConfig, *QUANT_FLAGS)
    out = args.output.resolve()
    # Run in a staging folder beside OUT_DIR, renamed to it once everything, checks included, passed.
    # Cleanup: new_folder deletes the staging folder on any failure, so nothing is left at OUT_DIR.
    with new_folder(out) as staging:
        plan = make_plan(args.base, args.adapter, merge, quant, compare=args.compare_onto)
        check_free_disk(out.parent, plan.out_bytes + SIDE_FILES_BYTES, "the merged checkpoint")
        stats = merge_into(plan, staging, args)
    if args.metrics_json:
        args.metrics_json.write_text(json.dumps(stats, indent=2) + "\n")
    console.print(f"wrote {out}")


def pipeline(args: argparse.Namespace) -> None:
    # Setup: the train stage's output must be complete and intact before anything is read.
    ctx = context(args)
    cfg, layout = ctx.cfg, ctx.layout
    base = resolve(cfg.model).path
    train_manifest = verify_manifest(layout.root, names.TRAIN)
    plan = make_plan(
        base, layout.adapter, cfg.merge, cfg.quantization, compare=args.compare_onto, remote=cfg.model.trust_remote_code
    )
    check_free_disk(layout.root, plan.out_bytes + SIDE_FILES_BYTES, "the merged checkpoint")
    SPEC.check_memory(cfg, layout, base=base)
    # Run, then publish with a manifest. Cleanup: stage_output deletes its staging folder on any failure.
    with stage_output(layout.root, names.MERGE, owned=(names.MERGED_DIR,)) as out:
        stats = merge_into(plan, out.path(layout.merged), args)
        out.commit(
            inputs={
                "base": str(base),
                "base_fingerprint": keys.fingerprint([base], keys.FileHashes()),
                "adapter": names.ADAPTER_DIR,
                "train_manifest_sha256": sha256_file(layout.manifest(names.TRAIN)),
                "train_started_at": train_manifest.get(names.M_STARTED),
                "dtype": cfg.merge.dtype,
                "onto": cfg.merge.onto,
                "quantization": plan.quant.describe() if cfg.merge.onto == "dequantized" else None,
            },
            metrics=stats,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("python -m stages.merge", __doc__)
    standalone_flags = parser.add_argument_group("standalone mode (instead of --config)")
    standalone_flags.add_argument("--base", type=Path, help="base HF checkpoint folder, safetensors")
    standalone_flags.add_argument("--adapter", type=Path, help="PEFT LoRA adapter folder")
    standalone_flags.add_argument("--output", type=Path, help="folder to create for the merged checkpoint")
    standalone_flags.add_argument("--metrics-json", type=Path, help="also write the merge metrics here")
    add_section_flags(standalone_flags, "merge", MergeConfig, *MERGE_FLAGS)
    add_section_flags(standalone_flags, "quantization", QuantizationConfig, *QUANT_FLAGS)
    parser.add_argument(
        "--verify",
        nargs="?",
        const="auto",
        choices=VERIFY,
        help="check merged vs base+adapter before publishing: full (logits), layers (sampled layers), "
        "auto (full up to ~250M parameters)",
    )
    parser.add_argument(
        "--compare-onto", action="store_true", help="report logit difference onto original vs dequantized"
    )
    parser.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_GB, help="max GB per output shard")
    args = parser.parse_args(argv)
    missing = [f"--{n}" for n in ("base", "adapter", "output") if getattr(args, n) is None]
    if args.config is None and missing:
        parser.error(f"give --config, or all of --base, --adapter and --output (missing {', '.join(missing)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(names.MERGE, lambda: pipeline(args) if args.config else standalone(args))


if __name__ == "__main__":
    raise SystemExit(main())
