"""Quantize stage: every requested llama.cpp type, each made from the one f16 GGUF.

    python -m stages.quantize --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.quantize --config runs/demo/config.yaml

Reads runs/<run>/gguf/<run_name>.<outtype>.gguf (checked against the convert manifest) and
writes runs/<run>/gguf/<run_name>.<TYPE>.gguf for each of gguf.quant_types with llama-quantize,
recording each file's size and measured bits per weight.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stages.common import llamacpp, names
from stages.common.artifacts import check_free_disk, stage_output, verify_manifest
from stages.common.cli import StageContext, context, stage_parser
from stages.common.errors import StageError, console, run_stage


def check_types(types: list[str]) -> None:
    unknown = [t for t in types if t not in names.QUANT_TYPES]
    if unknown:
        raise StageError(f"gguf.quant_types: unknown {', '.join(unknown)}; valid: {', '.join(names.QUANT_TYPES)}")


def n_params(gguf_path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(gguf_path).tensors)


def quantize_file(src: Path, dst: Path, qtype: str, token_embedding_type: str | None = None) -> None:
    cmd = [str(llamacpp.tool("llama-quantize"))]
    if token_embedding_type:
        cmd += ["--token-embedding-type", token_embedding_type]
    cmd += [str(src), str(dst), qtype, str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, env=llamacpp.tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not dst.is_file():
        sys.stdout.write(proc.stdout)
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise StageError(f"llama-quantize {qtype} failed on {src.name} (exit {proc.returncode}): {last}")


def quantize(ctx: StageContext) -> None:
    cfg, run_dir = ctx.cfg, ctx.run_dir

    # Setup.
    check_types(cfg.gguf.quant_types)
    verify_manifest(run_dir, names.CONVERT)
    src = run_dir / names.GGUF_DIR / names.gguf_name(cfg.run_name, cfg.gguf.outtype)
    need = sum(int(src.stat().st_size * names.QUANT_TYPES[t] / 16 * 1.1) for t in cfg.gguf.quant_types)
    check_free_disk(run_dir, need, "the quantized GGUFs")
    params = n_params(src)

    # Run.
    with stage_output(run_dir, names.QUANTIZE) as out:
        files = {}
        for qtype in cfg.gguf.quant_types:
            dst = out.path(f"{names.GGUF_DIR}/{names.gguf_name(cfg.run_name, qtype)}")
            quantize_file(src, dst, qtype, cfg.gguf.token_embedding_type)
            size = dst.stat().st_size
            files[qtype] = {"size_bytes": size, "bits_per_weight": round(size * 8 / params, 3)}
            console.print(f"{qtype}: {size / 2**20:.1f} MiB, {files[qtype]['bits_per_weight']} bits/weight")

        # Cleanup.
        out.commit(
            inputs={"source": src.name},
            metrics={"n_params": params, "types": files},
            extra={names.M_LLAMA_CPP: llamacpp.info()},
        )


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.quantize", __doc__).parse_args(argv)
    return run_stage(names.QUANTIZE, lambda: quantize(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
