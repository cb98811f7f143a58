"""An HF causal LM's forward pass, one decoder layer in memory at a time.

    from stages.common.hf_stream import next_token_stats
    stats = next_token_stats(Path("runs/demo/merged"), chunks)           # chunks: lists of token ids
    stats.nll[i]     # float32 [stop - start]: -log p(chunks[i][p + 1] | chunks[i][: p + 1]), p = start .. stop - 1
    stats.argmax[i]  # int64 [stop - start]: the most likely next token at those positions
    stats.perplexity()                                                   # exp(mean NLL) over every scored position

    stream_logits(model_dir, chunks, consume)   # consume(i, first_position, logits [n, vocab]) per piece

Why: loading a 7B model in transformers takes 1.2 x its size in RAM (30 GB in float32). Here the
checkpoint's safetensors shards are read tensor by tensor (plain reads, no mmap; see
safetensors_io), one decoder layer at a time, into that layer's transformers module, which then
runs every sequence before the next layer replaces it; the merge stage streams tensors the same
way. Peak memory is one layer in the compute dtype, the hidden states of all sequences
(tokens x hidden x 4 bytes) and one batch's activations, not the model: at Mistral-7B's shapes in
float32, about 0.9 GB of layer, 0.8 GB of output layer, and 16 KB per token (docs/scale-7b.md has
the measured peaks).

Exactness: the modules are transformers' own (the model class's embedding, decoder layers,
rotary embedding, final norm, output layer, built on the meta device from config.json and given
the checkpoint's tensors), and the causal mask and position ids are built as the model's forward
builds them for an unpadded sequence. So the logits equal ``AutoModelForCausalLM`` run on the same
chunks to float32 rounding (tests/test_widen.py checks it). Assumed, as in Llama, Mistral, Qwen2
and their kin: the model's forward is embed_tokens -> layers(mask, rotary embedding) -> norm ->
lm_head, under ``model.model`` and ``model.lm_head``, with no embedding scale or logit soft-cap.

Chunks may have different lengths; each is one unpadded sequence (positions 0 .. len - 1).
Chunks of equal length run together in batches of at most ``batch_tokens`` tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.errors import StageError
from stages.common.safetensors_io import CheckpointReader

DEFAULT_BATCH_TOKENS = 2048  # rows of one matmul batch; bounds the MLP's and the logits' activations
LOGIT_ROWS = 1024  # positions per output-layer matmul: 1024 x 49,152 vocabulary x 4 bytes = 200 MB

Consumer = Callable[[int, int, Any], None]  # (chunk index, first position, float32 logits [n, vocab])


@dataclass
class NextTokenStats:
    """Per-chunk next-token figures for positions start .. stop - 1 of each chunk."""

    start: int
    nll: list[Any] = field(default_factory=list)  # float32 tensors
    argmax: list[Any] = field(default_factory=list)  # int64 tensors
    topk_ids: list[Any] = field(default_factory=list)  # int64 [n, k], when top_k > 0
    topk_logprobs: list[Any] = field(default_factory=list)  # float32 [n, k]
    seconds: float = 0.0

    def positions(self) -> int:
        return sum(len(x) for x in self.nll)

    def mean_nll(self) -> float:
        import torch

        return float(torch.cat(self.nll).double().mean()) if self.nll else float("nan")

    def perplexity(self) -> float:
        import math

        return math.exp(self.mean_nll())


@dataclass
class _Batch:
    index: list[int]  # chunk indices
    ids: Any  # int64 [B, T]
    hidden: Any = None


def _model_skeleton(model_dir: Path, attn_implementation: str | None):
    """The model class built from config.json on the meta device (no memory), and its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    inner = getattr(model, "model", None)
    missing = [
        name
        for name, owner in (("model", model), ("layers", inner), ("embed_tokens", inner), ("norm", inner))
        if owner is None or not hasattr(owner, name)
    ]
    missing += [n for n in ("rotary_emb",) if inner is not None and not hasattr(inner, n)]
    missing += [n for n in ("lm_head",) if not hasattr(model, n)]
    if missing:
        raise StageError(
            f"{model_dir}: {type(model).__name__} lacks {', '.join(missing)}; the layer-streamed forward pass "
            "handles Llama-style models (model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head)"
        )
    return model, model.config


def _load(module, reader: CheckpointReader, prefix: str, dtype) -> None:
    """Give a meta-device module the checkpoint's tensors under `prefix`, cast to dtype (no copy kept)."""
    wanted = list(module.state_dict())
    absent = [f"{prefix}{k}" for k in wanted if f"{prefix}{k}" not in reader]
    if absent:
        raise StageError(
            f"{reader.folder}: checkpoint lacks {', '.join(absent[:3])}"
            + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            + "; is config.json this checkpoint's?"
        )
    state = {}
    for key in wanted:
        t = reader.get(f"{prefix}{key}")
        state[key] = t.to(dtype) if t.is_floating_point() else t
    module.load_state_dict(state, strict=True, assign=True)


def _free(module) -> None:
    module.to("meta")


def _batches(chunks: Sequence[Sequence[int]], batch_tokens: int) -> list[_Batch]:
    import torch

    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        if len(c) == 0:
            raise StageError(f"chunk {i} is empty; every chunk needs at least one token")
        by_len.setdefault(len(c), []).append(i)
    out = []
    for length, idx in sorted(by_len.items()):
        per = max(1, batch_tokens // length)
        for j in range(0, len(idx), per):
            part = idx[j : j + per]
            out.append(_Batch(part, torch.tensor([list(chunks[i]) for i in part], dtype=torch.long)))
    return out


def stream_logits(
    model_dir: Path,
    chunks: Sequence[Sequence[int]],
    consume: Consumer,
    *,
    start: int = 0,
    stop: int | None = None,
    dtype: str = "float32",
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    attn_implementation: str | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Run every chunk through the model; hand the logits of positions start .. stop - 1 (stop
    defaults to each chunk's length, and is capped at it) to consume, in pieces of up to 1024
    positions, as float32. dtype: "float32" (default) or "bfloat16" compute."""
    import torch

    model_dir = Path(model_dir)
    if dtype not in ("float32", "bfloat16"):
        raise StageError(f"dtype {dtype!r}: use float32 or bfloat16")
    torch_dtype = getattr(torch, dtype)
    model, config = _model_skeleton(model_dir, attn_implementation)
    inner = model.model
    batches = _batches(chunks, batch_tokens)
    vocab = config.vocab_size
    for i, c in enumerate(chunks):
        bad = [t for t in (min(c), max(c)) if not 0 <= t < vocab]
        if bad:
            raise StageError(f"chunk {i} holds token id {bad[0]}, outside the vocabulary of {vocab}")

    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    t0 = time.monotonic()
    with torch.inference_mode(), CheckpointReader(model_dir) as reader:
        # Embedding.
        _load(inner.embed_tokens, reader, "model.embed_tokens.", torch_dtype)
        for b in batches:
            b.hidden = inner.embed_tokens(b.ids)
        _free(inner.embed_tokens)

        # Rotary embedding and masks per batch shape, as the model's forward builds them.
        rotary = type(inner.rotary_emb)(config=config)
        rope: dict[int, tuple[Any, Any]] = {}
        masks: dict[tuple[int, int, str], Any] = {}

        def mask_for(b: _Batch, layer) -> Any:
            kind = getattr(layer, "attention_type", None) or (
                "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
            )
            key = (*b.ids.shape, kind)
            if key not in masks:
                fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                masks[key] = fn(config, b.hidden, None, None, rope[b.ids.shape[1]][0])
            return masks[key]

        for b in batches:
            length = b.ids.shape[1]
            if length not in rope:
                pos = torch.arange(length).unsqueeze(0)
                rope[length] = (pos, rotary(b.hidden, position_ids=pos))

        # Decoder layers, one in memory at a time.
        for li, layer in enumerate(inner.layers[: config.num_hidden_layers]):
            tl = time.monotonic()
            _load(layer, reader, f"model.layers.{li}.", torch_dtype)
            for b in batches:
                pos, cos_sin = rope[b.ids.shape[1]]
                out = layer(
                    b.hidden,
                    attention_mask=mask_for(b, layer),
                    position_ids=pos,
                    position_embeddings=cos_sin,
                    use_cache=False,
                )
                b.hidden = out[0] if isinstance(out, tuple) else out
            _free(layer)
            if log:
                log(f"layer {li + 1}/{config.num_hidden_layers}: {time.monotonic() - tl:.1f} s")

        # Final norm and output layer (the input embedding when tied and not stored).
        _load(inner.norm, reader, "model.norm.", torch_dtype)
        head_key = "lm_head." if "lm_head.weight" in reader else "model.embed_tokens."
        if head_key != "lm_head." and not getattr(config, "tie_word_embeddings", False):
            raise StageError(f"{model_dir}: no lm_head.weight, and tie_word_embeddings is false")
        _load(model.lm_head, reader, head_key, torch_dtype)
        for b in batches:
            hidden = inner.norm(b.hidden)
            b.hidden = None
            for row, ci in enumerate(b.index):
                end = hidden.shape[1] if stop is None else min(stop, hidden.shape[1])
                for p in range(start, end, LOGIT_ROWS):
                    q = min(p + LOGIT_ROWS, end)
                    consume(ci, p, model.lm_head(hidden[row, p:q]).float())
        _free(inner.norm)
        _free(model.lm_head)
    if log:
        log(f"forward pass over {sum(len(c) for c in chunks)} tokens: {time.monotonic() - t0:.1f} s")


def next_token_stats(
    model_dir: Path,
    chunks: Sequence[Sequence[int]],
    *,
    start: int = 0,
    stop: int | None = None,
    top_k: int = 0,
    dtype: str = "float32",
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    log: Callable[[str], None] | None = None,
) -> NextTokenStats:
    """NLL of the next token and the argmax (and optionally the top-k log-probabilities) at positions
    start .. stop - 1 of each chunk; stop defaults to, and is capped at, len(chunk) - 1 (the last
    position with a next token)."""
    import torch

    stats = NextTokenStats(start)
    pieces: list[list[tuple[Any, ...]]] = [[] for _ in chunks]  # per chunk, in position order
    targets = [torch.tensor(list(c), dtype=torch.long) for c in chunks]
    ends = [len(c) - 1 if stop is None else min(stop, len(c) - 1) for c in chunks]

    def consume(i: int, p: int, logits) -> None:
        n = min(logits.shape[0], ends[i] - p)  # the last position has no next token to score
        if n <= 0:
            return
        logp = torch.log_softmax(logits[:n], dim=-1)
        nll = -logp.gather(1, targets[i][p + 1 : p + 1 + n].unsqueeze(1)).squeeze(1)
        top = logp.topk(top_k, dim=-1) if top_k else None
        pieces[i].append((nll, logp.argmax(-1), *((top.indices, top.values) if top else ())))

    t0 = time.monotonic()
    stream_logits(model_dir, chunks, consume, start=start, stop=stop, dtype=dtype, batch_tokens=batch_tokens, log=log)
    empty = (
        torch.empty(0),
        torch.empty(0, dtype=torch.long),
        torch.empty(0, top_k, dtype=torch.long),
        torch.empty(0, top_k),
    )
    for got in pieces:
        cols = [torch.cat(col) for col in zip(*got, strict=True)] if got else empty[: 4 if top_k else 2]
        stats.nll.append(cols[0])
        stats.argmax.append(cols[1])
        if top_k:
            stats.topk_ids.append(cols[2])
            stats.topk_logprobs.append(cols[3])
    stats.seconds = time.monotonic() - t0
    return stats
