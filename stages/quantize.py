"""Quantize stage: every requested llama.cpp type, each made from the one f16 GGUF.

    python -m stages.quantize --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.quantize --config runs/demo/config.yaml

Reads runs/<run>/gguf/<run_name>.<outtype>.gguf (checked against the convert manifest) and
writes runs/<run>/gguf/<run_name>.<TYPE>.gguf for each of gguf.quant_types with llama-quantize,
recording each file's size, its measured bits per weight next to the type's nominal one, and how
many tensors llama.cpp had to quantize with a fallback type (rows not a multiple of 256 cannot
take k-quants; small models such as SmolLM2 hit this, so their files come out larger).

With gguf.imatrix, llama-imatrix first measures which weights matter on the run's own training
text (gguf/imatrix.gguf, gguf.imatrix_chunks chunks) and every type is quantized with it.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from stages.common import llamacpp, names, specs
from stages.common.artifacts import check_free_disk, stage_output, verify_manifest
from stages.common.cli import StageContext, context, stage_parser
from stages.common.data import plain_text, train_and_held_out
from stages.common.errors import StageError, console, run_stage
from stages.common.gguf_runtime import read_gguf
from stages.common.progress import Progress  # plain lines when the output is not a terminal

SPEC = specs.spec(names.QUANTIZE)

QUANTIZE_TOOL = "llama-quantize"
IMATRIX_TOOL = "llama-imatrix"
IMATRIX_CTX = 512
TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")  # "[  12/ 272] blk.1.attn_k.weight ..."
FALLBACK_LINE = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


@dataclass(frozen=True)
class QuantType:
    """One entry of the menu of quant types a config may ask for."""

    name: str  # as written in gguf.quant_types and in file names
    llama_type: str  # llama-quantize's type argument
    nominal_bpw: float  # bits per weight on a 7B-class model (llama.cpp's table)


REGISTRY: dict[str, QuantType] = {}


def register(qtype: QuantType) -> QuantType:
    REGISTRY[qtype.name] = qtype
    return qtype


# The accepted types and their nominal sizes live in names.QUANT_TYPES; each is its own
# llama-quantize type. An alias or a type with extra llama-quantize options registers here.
for _name, _bpw in names.QUANT_TYPES.items():
    register(QuantType(_name, _name, _bpw))


def lookup(types: list[str]) -> list[QuantType]:
    """The registry entries for `types`; StageError naming every unknown one and the valid ones."""
    unknown = [t for t in types if t not in REGISTRY]
    if unknown:
        raise StageError(
            f"gguf.quant_types: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(REGISTRY)} "
            "(register another in stages/quantize.py)"
        )
    return [REGISTRY[t] for t in types]


def quantize_file(
    src: Path,
    dst: Path,
    qtype: str,
    token_embedding_type: str | None = None,
    imatrix: Path | None = None,
    progress: Progress | None = None,
) -> int:
    """llama-quantize `src` to `dst` at `qtype`; returns how many tensors needed a fallback type."""
    llama_type = REGISTRY[qtype].llama_type if qtype in REGISTRY else qtype
    cmd = [str(llamacpp.tool(QUANTIZE_TOOL))]
    if token_embedding_type:
        cmd += ["--token-embedding-type", token_embedding_type]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src), str(dst), llama_type, str(os.cpu_count() or 1)]
    task = progress.add_task(qtype, total=None) if progress else None
    lines: list[str] = []
    fallback = 0
    proc = subprocess.Popen(
        cmd,
        env=llamacpp.tool_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if (m := TENSOR_LINE.match(line)) and progress and task is not None:
            progress.update(task, completed=int(m[1]), total=int(m[2]))
        elif m := FALLBACK_LINE.search(line):
            fallback = int(m[1])
    rc = proc.wait()
    if rc != 0 or not dst.is_file():
        console.print("".join(lines[-20:]), markup=False, highlight=False)
        errors = [ln.strip() for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        last = errors[-1] if errors else (lines[-1].strip() if lines else "no output")
        raise StageError(f"{QUANTIZE_TOOL} {qtype} failed on {src.name} (exit {rc}): {last}")
    return fallback


def compute_imatrix(model: Path, text: str, out_file: Path, chunks: int) -> None:
    """llama-imatrix over `text` with `model` (the f16 GGUF); StageError with its last line on failure."""
    text_file = out_file.with_name(out_file.name + ".txt")
    text_file.write_text(text)
    args = ["-m", str(model), "-f", str(text_file), "-o", str(out_file)]
    args += ["-c", str(IMATRIX_CTX), "--chunks", str(chunks), "--no-ppl"]
    try:
        llamacpp.run_tool(IMATRIX_TOOL, args)
    finally:
        text_file.unlink(missing_ok=True)
    if not out_file.is_file():
        raise StageError(f"{IMATRIX_TOOL} wrote no {out_file.name}")


def quantize(ctx: StageContext) -> None:
    cfg, layout, run_dir = ctx.cfg, ctx.layout, ctx.run_dir

    # Setup: every type known and the tool present before any work; then the source and the disk.
    qtypes = lookup(cfg.gguf.quant_types)
    llamacpp.tool(QUANTIZE_TOOL)
    verify_manifest(run_dir, names.CONVERT)
    src = layout.gguf(cfg.gguf.outtype)
    source = read_gguf(src)
    # Nominal size + 10%, plus the vocab and metadata each file repeats. Models too narrow for
    # k-quants come out larger (fallback types), but those are small models.
    extra = source.size_bytes - source.tensor_bytes
    need = sum(int(source.n_params * q.nominal_bpw / 8 * 1.1) + extra for q in qtypes)
    check_free_disk(run_dir, need, "the quantized GGUFs")
    SPEC.check_memory(cfg, layout, largest_tensor_elements=source.largest_tensor_elements)

    # Run.
    with stage_output(run_dir, names.QUANTIZE) as out:
        imatrix = None
        if cfg.gguf.imatrix:
            imatrix = out.path(layout.imatrix)
            text = plain_text(train_and_held_out(cfg.data, cfg.training.seed).train)
            with console.status(f"{IMATRIX_TOOL}: {cfg.gguf.imatrix_chunks} chunks of training text"):
                compute_imatrix(src, text, imatrix, cfg.gguf.imatrix_chunks)
            console.print(f"importance matrix: {imatrix.name} from {len(text) / 1e3:.0f} k characters of training text")
        files = {}
        columns = (TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            for q in qtypes:
                dst = out.path(layout.gguf(q.name))
                fallback = quantize_file(
                    src, dst, q.name, cfg.gguf.token_embedding_type, imatrix=imatrix, progress=progress
                )
                info = read_gguf(dst)
                files[q.name] = {
                    "size_bytes": info.size_bytes,
                    "bits_per_weight": round(info.bits_per_weight, 3),
                    "nominal_bits_per_weight": q.nominal_bpw,
                    "fallback_tensors": fallback,
                    "file_type": info.file_type,
                    "tensor_types": info.tensor_types,
                }
                n_tensors = sum(info.tensor_types.values())
                progress.console.print(
                    f"{q.name}: {info.size_bytes / 2**20:.1f} MiB, {info.bits_per_weight:.2f} bits/weight "
                    f"(nominal {q.nominal_bpw}), {fallback} of {n_tensors} tensors on a fallback type",
                    soft_wrap=True,
                )

        # Cleanup.
        out.commit(
            inputs={
                "source": src.name,
                "token_embedding_type": cfg.gguf.token_embedding_type,
                "imatrix": imatrix.name if imatrix else None,
            },
            metrics={
                "n_params": source.n_params,
                # One line for the run summary's table, which shows scalar metrics only.
                "bits_per_weight": ", ".join(f"{t} {f['bits_per_weight']:.2f}" for t, f in files.items()),
                "types": files,
            },
            extra={names.M_LLAMA_CPP: llamacpp.info()},
        )


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.quantize", __doc__).parse_args(argv)
    return run_stage(names.QUANTIZE, lambda: quantize(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
