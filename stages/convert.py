"""Convert stage: the merged HF checkpoint to one GGUF with the pinned llama.cpp converter, checked.

    python -m stages.convert --config runs/demo/config.yaml                          # local
    docker compose run --rm gguf python -m stages.convert --config runs/demo/config.yaml

Writes gguf/<run_name>.<outtype>.gguf (gguf.outtype, f16 by default), from which quantize makes
every type. Before the file is kept:
- its EOS is the merged model's, and its chat template tokenizes a fixed set of conversations
  (built-in ones, smoke.messages, the first held-out prompts) exactly as HF's does
  (gguf/chat_parity.json);
- with report.enabled, its held-out perplexity (llama-perplexity) is within
  report.max_conversion_ppl_delta of the merged HF model's on the same chunks, and their next
  token agrees at report.min_conversion_top1 of the positions (the HF model runs one layer at a
  time in float32, so a 7B model needs a few GB). Its distributions stay in
  gguf/<run_name>.<outtype>.logits for the report.
With gguf.lora_adapter, the adapter is also written as gguf/<run_name>.lora.f16.gguf.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from stages.common import llamacpp, names, specs
from stages.common.artifacts import check_free_disk, dir_size, stage_output, verify_manifest, write_json_atomic
from stages.common.chat_template import check_parity
from stages.common.cli import StageContext, context, stage_parser
from stages.common.config import PipelineConfig
from stages.common.data import train_and_held_out, train_files, with_system
from stages.common.errors import StageError, console, run_stage
from stages.common.gguf_runtime import GGUFInfo, GGUFModel, gguf_py, read_gguf
from stages.common.heldout import held_out
from stages.common.layout import RunLayout
from stages.common.model import resolve
from stages.common.perplexity import PERPLEXITY_TOOL, held_out_chunks, hf_reference, perplexity_base
from stages.common.progress import is_terminal, plain_env

SPEC = specs.spec(names.CONVERT)

CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
# Conversations every parity check covers, whatever the data: one turn, several turns.
FIXED_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello! What can you do?"}],
    [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And one larger than 100, with digits only: no words."},
    ],
]
PARITY_HELD_OUT = 5  # held-out prompts added to the fixed conversations
# GGUF size relative to a 16-bit merged checkpoint, with room for the vocab and metadata.
SIZE_FACTOR = {"f32": 2.1, "f16": 1.1, "bf16": 1.1, "q8_0": 0.6}
TAIL_BYTES = 4096


def _stream(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd`, echoing its output as it comes (the converter draws its own progress bars; off a
    terminal each redraw becomes a plain line, at most one per progress.PLAIN_INTERVAL), and
    return the exit code with the output's tail for the error message."""
    tail: deque[bytes] = deque()
    kept = 0
    plain = not is_terminal()
    env = {**env, **plain_env()}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    sink = getattr(sys.stdout, "buffer", None)  # absent when stdout is a text-only capture
    while chunk := os.read(proc.stdout.fileno(), 65536):
        if plain:
            chunk = chunk.replace(b"\r", b"\n").replace(b"\n\n", b"\n")
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


def _run_converter(script: str, cmd: list[str], what: Path, outfile: Path) -> None:
    rc, tail = _stream([sys.executable, str(llamacpp.script(script)), *cmd], llamacpp.tool_env())
    if rc != 0 or not outfile.is_file():
        raise StageError(f"{script} failed on {what} (exit {rc}): {_last_error_line(tail)}")


def convert_lora(adapter_dir: Path, base_dir: Path, outfile: Path) -> None:
    """The peft adapter as an f16 LoRA GGUF; `base_dir` gives the base model's config."""
    cmd = [str(adapter_dir), "--base", str(base_dir), "--outfile", str(outfile), "--outtype", "f16"]
    _run_converter(LORA_CONVERTER, cmd, adapter_dir, outfile)


def parity_conversations(cfg: PipelineConfig) -> list[list[dict[str, str]]]:
    """The fixed conversations, each smoke message, and the first held-out prompts (chat data, when
    its files are here: an adapter trained elsewhere may come without them)."""
    system = cfg.data.system_prompt
    out = [with_system(system, c) for c in FIXED_CONVERSATIONS]
    out += [with_system(system, [{"role": "user", "content": m}]) for m in cfg.smoke.messages]
    files = [*train_files(cfg.data), *cfg.data.eval_files]
    if cfg.data.format != "text" and all(Path(f).is_file() for f in files):
        held_out = train_and_held_out(cfg.data, cfg.training.seed).held_out
        out += [r["prompt"] for r in held_out[:PARITY_HELD_OUT] if "prompt" in r]
    return out


def convert_checkpoint(
    model_dir: Path, outfile: Path, outtype: str, model_name: str, metadata: dict[str, Any] | None = None
) -> None:
    """Run the pinned converter on `model_dir`; `metadata` overrides general.* keys (the
    converter's --metadata file). StageError with the converter's last error line when it fails."""
    cmd = [str(model_dir), "--outfile", str(outfile)]
    cmd += ["--outtype", outtype, "--model-name", model_name]
    override = outfile.with_name(outfile.name + ".metadata.json")
    if metadata:
        override.write_text(json.dumps(metadata, indent=1))
        cmd += ["--metadata", str(override)]
    try:
        _run_converter(CONVERTER, cmd, model_dir, outfile)
    finally:
        override.unlink(missing_ok=True)


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
    cfg, layout, run_dir = ctx.cfg, ctx.layout, ctx.run_dir

    # Setup: the merged checkpoint must be complete, and there must be room for the GGUF.
    merge_manifest = verify_manifest(run_dir, names.MERGE)
    if cfg.gguf.lora_adapter:
        verify_manifest(run_dir, names.TRAIN)
        llamacpp.script(LORA_CONVERTER)
    merged = layout.merged
    llamacpp.script(CONVERTER)
    if cfg.report.enabled:
        llamacpp.tool(PERPLEXITY_TOOL)
    check_free_disk(run_dir, int(dir_size(merged) * SIZE_FACTOR[cfg.gguf.outtype]), "the GGUF conversion")
    SPEC.check_memory(cfg, layout)
    name = layout.gguf(cfg.gguf.outtype).name
    metadata = base_model_fields(cfg)

    # Run.
    with stage_output(run_dir, names.CONVERT) as out:
        target = out.path(layout.gguf(cfg.gguf.outtype))
        convert_checkpoint(merged, target, cfg.gguf.outtype, cfg.run_name, metadata)
        info = read_gguf(target)
        check_special_tokens(info, merged)
        console.print(
            f"{name}: {info.size_bytes / 2**20:.1f} MiB, {info.n_params / 1e6:.1f} M parameters, "
            f"{info.bits_per_weight:.2f} bits/weight ({info.file_type})",
            soft_wrap=True,
        )
        parity = {"checked": False, "why": "no chat template in the merged model"}
        if info.get("tokenizer.chat_template"):
            with GGUFModel(target, n_ctx=2048, vocab_only=True) as model:
                parity = {"checked": True, **check_parity(merged, model, parity_conversations(cfg))}
            console.print(f"chat template parity: {len(parity['conversations'])} conversations, HF == llama.cpp tokens")
        out.path(layout.chat_parity).write_text(json.dumps(parity, indent=1) + "\n")
        lora = None
        if cfg.gguf.lora_adapter:
            lora = out.path(layout.lora_gguf)
            convert_lora(layout.adapter, resolve(cfg.model).path, lora)
            console.print(f"{lora.name}: {lora.stat().st_size / 2**20:.1f} MiB (apply with --lora to the base GGUF)")
        conversion = None
        if cfg.report.enabled and not (held := held_out(cfg, layout)).rows:
            conversion = {"skipped": held.reason}
            console.print(f"[yellow]conversion check skipped[/yellow]: {held.reason}")
        elif cfg.report.enabled:
            logits = out.path(layout.gguf_logits(cfg.gguf.outtype))
            conversion = conversion_check(cfg, layout, held.rows, target, logits)

        # Cleanup: record exactly which llama.cpp made the file, and what is in it.
        checked = bool(conversion) and "skipped" not in conversion
        out.commit(
            inputs={"merged": layout.rel(merged), "merge_outputs": len(merge_manifest[names.M_OUTPUTS])},
            metrics={
                "outtype": cfg.gguf.outtype,
                "chat_parity": len(parity.get("conversations", [])),
                "lora_gguf": lora.name if lora else None,
                **({"conversion_ppl_delta": round(conversion["relative_delta"], 5)} if checked else {}),
                **({"conversion_top1": round(conversion["top1_agreement"], 5)} if checked else {}),
                "conversion": conversion,
                **info.summary(),
            },
            extra={names.M_LLAMA_CPP: llamacpp.info()},
        )


def conversion_check(
    cfg: PipelineConfig, layout: RunLayout, rows: list[dict[str, Any]], f16: Path, logits: Path
) -> dict[str, Any]:
    """The f16 GGUF against the merged HF model on the held-out chunks: perplexity and top-1 next
    token, each gated (report.max_conversion_ppl_delta, report.min_conversion_top1). The f16 file's
    distributions stay in `logits` for the report's KL runs."""
    with tempfile.TemporaryDirectory(prefix=f"{names.TMP_PREFIX}{names.CONVERT}-text-", dir=layout.root) as work:
        text, chunks = held_out_chunks(cfg, rows, f16, Path(work))
        with console.status(f"llama-perplexity on {f16.name}"):
            gguf_ppl = perplexity_base(f16, text, logits, cfg.report.ctx, len(chunks))
    with console.status("the merged HF model on the same tokens, one layer at a time"):
        hf = hf_reference(layout.merged, chunks, logits)
    result = {
        "gguf_perplexity": gguf_ppl,
        **hf,
        "relative_delta": gguf_ppl / hf["hf_perplexity"] - 1,
        "max_delta": cfg.report.max_conversion_ppl_delta,
        "min_top1": cfg.report.min_conversion_top1,
        "chunks": len(chunks),
        "ctx": cfg.report.ctx,
    }
    console.print(
        f"conversion: HF perplexity {hf['hf_perplexity']:.4f}, {f16.name} {gguf_ppl:.4f} "
        f"({result['relative_delta']:+.3%}); top-1 agreement {hf['top1_agreement']:.2%} of {hf['positions']} positions"
    )
    failures = []
    if abs(result["relative_delta"]) > cfg.report.max_conversion_ppl_delta:
        failures.append(
            f"{f16.name} perplexity {gguf_ppl:.4f} vs merged HF {hf['hf_perplexity']:.4f} differs by "
            f"{result['relative_delta']:+.2%} > report.max_conversion_ppl_delta={cfg.report.max_conversion_ppl_delta}"
        )
    if hf["top1_agreement"] < cfg.report.min_conversion_top1:
        failures.append(
            f"{f16.name} and the merged HF model agree on the next token at {hf['top1_agreement']:.2%} of "
            f"{hf['positions']} positions < report.min_conversion_top1={cfg.report.min_conversion_top1}"
        )
    if failures:
        kept = layout.failed_report(names.CONVERT)
        write_json_atomic(kept, result)
        raise StageError(f"conversion check: {'; '.join(failures)} (measurements in {kept})")
    return result


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.convert", __doc__).parse_args(argv)
    return run_stage(names.CONVERT, lambda: convert(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
