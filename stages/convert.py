"""Convert stage: the merged HF checkpoint to one GGUF with the pinned llama.cpp converter.

    python -m stages.convert --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.convert --config runs/demo/config.yaml

Reads runs/<run>/merged/ (checked against the merge manifest), runs llama.cpp's
convert_hf_to_gguf.py with the gguf-py of the same tree, and writes
runs/<run>/gguf/<run_name>.<outtype>.gguf (gguf.outtype, f16 by default). Every quantized type
is made from this one file by the quantize stage.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stages.common import llamacpp, names
from stages.common.artifacts import check_free_disk, dir_size, stage_output, verify_manifest
from stages.common.cli import StageContext, context, stage_parser
from stages.common.errors import StageError, run_stage


def convert_checkpoint(model_dir: Path, outfile: Path, outtype: str, model_name: str) -> None:
    """Run the pinned converter; StageError with the converter's last line when it fails."""
    cmd = [
        sys.executable,
        str(llamacpp.script("convert_hf_to_gguf.py")),
        str(model_dir),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype,
        "--model-name",
        model_name,
    ]
    proc = subprocess.run(cmd, env=llamacpp.tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0 or not outfile.is_file():
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise StageError(f"convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}): {last}")


def convert(ctx: StageContext) -> None:
    cfg, run_dir = ctx.cfg, ctx.run_dir

    # Setup.
    merge_manifest = verify_manifest(run_dir, names.MERGE)
    merged = run_dir / names.MERGED_DIR
    factor = 2.1 if cfg.gguf.outtype == "f32" else 1.1  # f16 weights stay f16; f32 doubles them
    check_free_disk(run_dir, int(dir_size(merged) * factor), "the GGUF conversion")
    name = names.gguf_name(cfg.run_name, cfg.gguf.outtype)

    # Run.
    with stage_output(run_dir, names.CONVERT) as out:
        target = out.path(f"{names.GGUF_DIR}/{name}")
        convert_checkpoint(merged, target, cfg.gguf.outtype, cfg.run_name)

        # Cleanup: record exactly which llama.cpp made the file.
        out.commit(
            inputs={"merged": names.MERGED_DIR, "merge_outputs": len(merge_manifest[names.M_OUTPUTS])},
            metrics={"outtype": cfg.gguf.outtype, "size_bytes": target.stat().st_size},
            extra={names.M_LLAMA_CPP: llamacpp.info()},
        )


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.convert", __doc__).parse_args(argv)
    return run_stage(names.CONVERT, lambda: convert(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
