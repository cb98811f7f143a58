"""Convert stage: the merged HF checkpoint to one GGUF with the pinned llama.cpp converter.

    python -m stages.convert --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.convert --config runs/demo/config.yaml

Reads runs/<run>/merged/ (checked against the merge manifest), runs llama.cpp's
convert_hf_to_gguf.py with the gguf-py of the same tree, and writes
runs/<run>/gguf/<run_name>.<outtype>.gguf (gguf.outtype, f16 by default). Every quantized type
is made from this one file by the quantize stage. The GGUF's general.* fields name the run and
its base model; its EOS token is checked against the merged model's before the file is kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from stages.common import llamacpp, names
from stages.common.artifacts import check_free_disk, dir_size, stage_output, verify_manifest
from stages.common.cli import StageContext, context, stage_parser
from stages.common.config import PipelineConfig
from stages.common.errors import StageError, console, run_stage
from stages.common.gguf_runtime import GGUFInfo, gguf_py, read_gguf

CONVERTER = "convert_hf_to_gguf.py"
# GGUF size relative to a 16-bit merged checkpoint, with room for the vocab and metadata.
SIZE_FACTOR = {"f32": 2.1, "f16": 1.1, "bf16": 1.1, "q8_0": 0.6}
TAIL_BYTES = 4096


def _stream(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd`, echoing its output as it comes (the converter draws its own progress bars),
    and return the exit code with the output's tail for the error message."""
    tail: deque[bytes] = deque()
    kept = 0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    sink = getattr(sys.stdout, "buffer", None)  # absent when stdout is a text-only capture
    while chunk := os.read(proc.stdout.fileno(), 65536):
        if sink:
            sink.write(chunk)
        else:
            sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
        tail.append(chunk)
        kept += len(chunk)
        while kept - len(tail[0]) > TAIL_BYTES:
            kept -= len(tail.popleft())
    return proc.wait(), b"".join(tail).decode(errors="replace")


def _last_error_line(output: str) -> str:
    lines = [ln.strip() for ln in output.replace("\r", "\n").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else "no output"


def convert_checkpoint(
    model_dir: Path, outfile: Path, outtype: str, model_name: str, metadata: dict[str, Any] | None = None
) -> None:
    """Run the pinned converter on `model_dir`; `metadata` overrides general.* keys (the
    converter's --metadata file). StageError with the converter's last error line when it fails."""
    cmd = [sys.executable, str(llamacpp.script(CONVERTER)), str(model_dir), "--outfile", str(outfile)]
    cmd += ["--outtype", outtype, "--model-name", model_name]
    override = outfile.with_name(outfile.name + ".metadata.json")
    if metadata:
        override.write_text(json.dumps(metadata, indent=1))
        cmd += ["--metadata", str(override)]
    try:
        rc, tail = _stream(cmd, llamacpp.tool_env())
    finally:
        override.unlink(missing_ok=True)
    if rc != 0 or not outfile.is_file():
        raise StageError(f"{CONVERTER} failed on {model_dir} (exit {rc}): {_last_error_line(tail)}")


def base_model_fields(cfg: PipelineConfig) -> dict[str, Any]:
    """general.* fields that name the run and its base model (GGUF naming: basename, finetune).

    The license comes from the base model's card when it is a local folder with one.
    """
    source = cfg.model.name_or_path.rstrip("/")
    basename = Path(source).name
    base: dict[str, Any] = {"name": basename}
    local = Path(source).expanduser()
    if not local.exists() and source.count("/") == 1:  # a Hub id: org/name
        base["organization"] = source.split("/")[0]
        base["repo_url"] = f"https://huggingface.co/{source}"
    fields: dict[str, Any] = {
        "general.name": cfg.run_name,
        "general.basename": basename,
        "general.finetune": cfg.run_name,
        "general.base_models": [base],
    }
    if local.is_dir():
        card = gguf_py().metadata.Metadata.load_model_card(local)
        if card.get("license"):
            fields["general.license"] = card["license"]
    return fields


def hf_eos_ids(model_dir: Path) -> set[int]:
    """EOS ids the HF checkpoint declares (config.json and generation_config.json; int or list)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        value = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        ids.update([value] if isinstance(value, int) else value or [])
    return ids


def check_special_tokens(info: GGUFInfo, model_dir: Path) -> None:
    """A GGUF whose EOS is none of the model's own never stops generating: refuse to keep it."""
    eos, expected = info.get("tokenizer.ggml.eos_token_id"), hf_eos_ids(model_dir)
    if expected and eos not in expected:
        raise StageError(
            f"the GGUF's tokenizer.ggml.eos_token_id is {eos}, but the merged model declares EOS "
            f"{sorted(expected)} (config.json/generation_config.json); generation would not stop. "
            "Check the tokenizer files in merged/ (the merge stage copies them from the base model)"
        )


def convert(ctx: StageContext) -> None:
    cfg, run_dir = ctx.cfg, ctx.run_dir

    # Setup: the merged checkpoint must be complete, and there must be room for the GGUF.
    merge_manifest = verify_manifest(run_dir, names.MERGE)
    merged = run_dir / names.MERGED_DIR
    llamacpp.script(CONVERTER)
    check_free_disk(run_dir, int(dir_size(merged) * SIZE_FACTOR[cfg.gguf.outtype]), "the GGUF conversion")
    name = names.gguf_name(cfg.run_name, cfg.gguf.outtype)
    metadata = base_model_fields(cfg)

    # Run.
    with stage_output(run_dir, names.CONVERT) as out:
        target = out.path(f"{names.GGUF_DIR}/{name}")
        convert_checkpoint(merged, target, cfg.gguf.outtype, cfg.run_name, metadata)
        info = read_gguf(target)
        check_special_tokens(info, merged)
        console.print(
            f"{name}: {info.size_bytes / 2**20:.1f} MiB, {info.n_params / 1e6:.1f} M parameters, "
            f"{info.bits_per_weight:.2f} bits/weight ({info.file_type})",
            soft_wrap=True,
        )

        # Cleanup: record exactly which llama.cpp made the file, and what is in it.
        out.commit(
            inputs={"merged": names.MERGED_DIR, "merge_outputs": len(merge_manifest[names.M_OUTPUTS])},
            metrics={"outtype": cfg.gguf.outtype, **info.summary()},
            extra={names.M_LLAMA_CPP: llamacpp.info()},
        )


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.convert", __doc__).parse_args(argv)
    return run_stage(names.CONVERT, lambda: convert(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
