"""Randomly initialised base models of published shapes for the GPU benchmarks (the GPU hosts cannot
download weights; throughput and memory do not depend on the weights' values).

    python benchmarks/random_base.py llama2-70b /tmp/kiln-bench/llama2-70b-nf4      # 4-bit, layer by layer
    python benchmarks/random_base.py llama2-70b:2 /tmp/l70-2                         # 2 layers of those shapes

Mistral-7B is written in bf16 and quantized by the train stage as a real base would be. The larger
shapes are written already quantized (NF4, double quantization, packed in bf16 storage so FSDP can
shard them), one decoder layer at a time: each weight is drawn in bf16 on the GPU, quantized there
with bitsandbytes, moved to the host and written, so no more than one weight matrix is ever held in
16 bits (Llama-2-70B in bf16 would be 138 GB; its 4-bit checkpoint is ~39 GB). transformers loads the
result as it loads any pre-quantized bitsandbytes checkpoint (tests/test_random_base.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Published shapes (config.json of each model), as LlamaConfig keyword arguments.
SHAPES: dict[str, dict] = {
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40),
    "codellama-34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                          num_key_value_heads=8),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
}  # fmt: skip
STD = 0.02  # initializer_range of these models' configs


def llama_config(shape: str, vocab: int = 32000):
    """'llama2-70b' or 'llama2-70b:2' (the same shapes with 2 layers) -> LlamaConfig."""
    from transformers import LlamaConfig

    name, _, layers = shape.partition(":")
    if name not in SHAPES:
        raise SystemExit(f"error: unknown shape {name!r}; expected one of {', '.join(SHAPES)}")
    kwargs = {**SHAPES[name], **({"num_hidden_layers": int(layers)} if layers else {})}
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, **kwargs)


def tiny_config():
    """Llama-2-70B's config with 2 layers and tiny widths: tests and CPU dry runs of the same code."""
    from transformers import LlamaConfig

    shapes = llama_config("llama2-70b:2").to_dict()
    keep = ("rms_norm_eps", "num_hidden_layers", "max_position_embeddings")
    return LlamaConfig(**{k: shapes[k] for k in keep}, vocab_size=320, hidden_size=128, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def quant_config(storage: str = "bfloat16"):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="bfloat16",
        bnb_4bit_quant_storage=storage,
    )


def write_prequantized(path: Path, config, device: str = "cuda", seed: int = 0) -> Path:
    """A random NF4 checkpoint of `config` at `path`, written one decoder layer per shard."""
    import torch
    from bitsandbytes.functional import quantize_4bit
    from safetensors.torch import save_file

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_out = config.num_attention_heads * head

    def dense(shape):
        return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, STD, generator=gen)

    def quantized(name: str, out_features: int, in_features: int, tensors: dict) -> None:
        packed, state = quantize_4bit(
            dense((out_features, in_features)),
            blocksize=64,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.bfloat16,
        )
        tensors[f"{name}.weight"] = packed.cpu()
        for key, value in state.as_dict(packed=True).items():
            tensors[f"{name}.weight.{key}"] = value.cpu()

    linears = {
        "self_attn.q_proj": (q_out, h), "self_attn.k_proj": (kv * head, h), "self_attn.v_proj": (kv * head, h),
        "self_attn.o_proj": (h, q_out), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }  # fmt: skip
    layers = config.num_hidden_layers
    shards = [f"model-{i:05d}-of-{layers + 1:05d}.safetensors" for i in range(1, layers + 2)]
    weight_map: dict[str, str] = {}
    total = 0

    def flush(tensors: dict, shard: str) -> None:
        nonlocal total
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(v.numel() * v.element_size() for v in tensors.values())

    for i in range(layers):
        tensors: dict = {}
        prefix = f"model.layers.{i}"
        for name, (out_features, in_features) in linears.items():
            quantized(f"{prefix}.{name}", out_features, in_features, tensors)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        flush(tensors, shards[i])
        if (i + 1) % 10 == 0 or i + 1 == layers:  # a write cut short by a time limit shows how far it got
            print(f"random base: {i + 1}/{layers} layers, {total / 2**30:.1f} GiB", file=sys.stderr, flush=True)
    ends = {
        "model.embed_tokens.weight": dense((config.vocab_size, h)).cpu(),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": dense((config.vocab_size, h)).cpu(),
    }
    flush(ends, shards[-1])
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.dtype = torch.bfloat16
    config.quantization_config = quant_config().to_dict()
    config.save_pretrained(path)  # config.json last: its presence marks a complete checkpoint
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    write_prequantized(Path(args[1]), llama_config(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
