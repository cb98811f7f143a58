"""Held-out perplexity the way llama-perplexity scores it, for GGUFs and for the HF model they came from.

    text, chunks = held_out_chunks(cfg, f16, work)       # the run's held-out rows as plain text, in chunks
    ppl = perplexity_base(f16, text, logits, cfg.report.ctx, len(chunks))   # saves f16's distributions
    kl = kl_against_base(q4, logits, len(chunks))        # a quantized file against them
    hf = hf_reference(merged, chunks, logits)            # the HF model on the same tokens: ppl, top-1

convert checks its f16 file against the merged HF model with these (the conversion check); report
measures each quantized type against the f16 file's saved distributions.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from stages.common import llamacpp
from stages.common.config import PipelineConfig
from stages.common.data import plain_text
from stages.common.errors import StageError, console

PERPLEXITY_TOOL = "llama-perplexity"
# Lines of llama-perplexity's output read here (tools/perplexity/perplexity.cpp).
FINAL_PPL = re.compile(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)")
KL_FIELDS = {
    "ppl": re.compile(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
    "kl_mean": re.compile(r"Mean\s+KLD:\s*(-?[\d.]+)"),
    "kl_99": re.compile(r"99\.0%\s+KLD:\s*(-?[\d.]+)"),
    "top1_agreement": re.compile(r"Same top p:\s*([\d.]+)"),
}


def _match(pattern: re.Pattern[str], output: str, what: str) -> float:
    m = pattern.search(output)
    if not m:
        raise StageError(
            f"{PERPLEXITY_TOOL} printed no {what}; its output format changed? (llama.cpp {llamacpp.COMMIT})"
        )
    return float(m[1])


def chunks_of(tokens: list[int], ctx: int, max_chunks: int, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: consecutive ctx-token windows, the first token of each replaced
    by BOS when the model adds one."""
    out = []
    for i in range(min(len(tokens) // ctx, max_chunks)):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            chunk = [bos, *chunk[1:]]
        out.append(chunk)
    return out


def held_out_chunks(cfg: PipelineConfig, rows: list[dict], gguf: Path, work: Path) -> tuple[Path, list[list[int]]]:
    """`rows` as plain text (written to work/held_out.txt for llama-perplexity) and the chunks it will
    score, tokenized as it tokenizes them; as many chunks as report.token_budget allows."""
    from stages.common.gguf_runtime import GGUFModel, read_gguf

    text = plain_text(rows)
    text_file = work / "held_out.txt"
    text_file.write_text(text)
    with GGUFModel(gguf, n_ctx=256, vocab_only=True) as model:
        bos = model.llm.token_bos() if model.add_bos else None
        tokens = model.tokenize(text, add_bos=model.add_bos, special=False)
    ctx = cfg.report.ctx
    if len(tokens) < 2 * ctx:
        raise StageError(
            f"the held-out text is {len(tokens)} tokens; llama-perplexity needs at least 2 x report.ctx "
            f"= {2 * ctx}. Lower report.ctx or hold out more rows"
        )
    n_params = read_gguf(gguf).n_params
    chunks = chunks_of(tokens, ctx, cfg.report.chunks_for(n_params), bos)
    console.print(f"scoring {len(chunks)} chunks of {ctx} held-out tokens ({n_params / 1e9:.2f} B parameters)")
    return text_file, chunks


def perplexity_base(model: Path, text: Path, logits: Path, ctx: int, chunks: int) -> float:
    """Perplexity of `model`; its token distributions are saved to `logits` for the KL runs."""
    args = ["-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks)]
    out = llamacpp.run_tool(PERPLEXITY_TOOL, [*args, "--kl-divergence-base", str(logits)])
    return _match(FINAL_PPL, out, "final perplexity")


def kl_against_base(model: Path, logits: Path, chunks: int) -> dict[str, float]:
    args = ["-m", str(model), "--kl-divergence-base", str(logits), "--kl-divergence", "--chunks", str(chunks)]
    out = llamacpp.run_tool(PERPLEXITY_TOOL, args)
    stats = {k: _match(p, out, k) for k, p in KL_FIELDS.items()}
    stats["top1_agreement"] /= 100
    return stats


def read_base_logits(path: Path):
    """The distributions llama-perplexity --kl-divergence-base saved: "_logits_", n_ctx, n_vocab,
    n_chunk (int32), the tokens, then per scored position (the second half of each chunk) a record
    of (scale, min log-prob) as two float32 and n_vocab uint16 q (logit = max - (65535 - q) x scale).
    Returns (tokens [n_chunk, n_ctx], q [positions, n_vocab]), chunk after chunk."""
    import numpy as np

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(raw[:8]) != b"_logits_":
        raise StageError(f"{path.name} is not a llama-perplexity logits file (llama.cpp {llamacpp.COMMIT})")
    n_ctx, n_vocab, n_chunk = (int(x) for x in raw[8:20].view(np.int32))
    tokens = raw[20 : 20 + 4 * n_chunk * n_ctx].view(np.int32)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    records = raw[20 + 4 * n_chunk * n_ctx :].view(np.uint16).reshape(-1, nv)
    if len(records) != n_chunk * (n_ctx - 1 - n_ctx // 2):
        raise StageError(f"{path.name}: {len(records)} records for {n_chunk} chunks of {n_ctx}; a truncated file?")
    return tokens.reshape(n_chunk, n_ctx), records[:, 4 : 4 + n_vocab]


def hf_reference(model_dir: Path, chunks: list[list[int]], logits: Path) -> dict[str, Any]:
    """The HF checkpoint's perplexity on exactly the chunks and positions llama-perplexity scored
    (float32, one decoder layer in memory at a time: hf_stream), and how often its next-token
    argmax equals the one in the GGUF's saved distributions."""
    import numpy as np

    from stages.common.hf_stream import next_token_stats

    saved_tokens, saved = read_base_logits(logits)
    first = len(chunks[0]) // 2
    if saved_tokens.shape != (len(chunks), len(chunks[0])) or any(
        list(saved_tokens[i, 1:]) != c[1:] for i, c in enumerate(chunks)
    ):
        raise StageError(f"{logits.name} holds other tokens than the held-out chunks; remake it (rerun convert)")
    stats = next_token_stats(model_dir, chunks, start=first, log=lambda line: console.print(f"merged HF model: {line}"))
    hf_top1 = np.concatenate([a.numpy() for a in stats.argmax])
    gguf_top1 = np.asarray(saved).argmax(axis=1)
    return {
        "hf_perplexity": math.exp(stats.mean_nll()),
        "hf_dtype": "float32",
        "positions": len(hf_top1),
        "top1_agreement": float((hf_top1 == gguf_top1).mean()),
        "hf_seconds": round(stats.seconds, 1),
    }
