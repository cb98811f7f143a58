"""What the train stage does differently under FSDP (training.fsdp): where the 4-bit base is loaded,
where its quantization constants live, and how the sharded adapter is gathered for saving.

A base whose checkpoint is already 4-bit (config.json has a quantization_config, as the random
Llama-2-70B-shaped base of benchmarks/random_base.py) can be larger than one GPU: every rank reads
it into host RAM and FSDP moves only that rank's shard of each layer to its GPU. A 16-bit base is
quantized on each rank's own GPU as under DDP, so it must fit one GPU once quantized. The blockwise
quantization constants (absmax, ~1/64 byte per weight with double quantization) are not parameters:
FSDP neither shards nor moves them, so they are moved to the rank's GPU here.
"""

from __future__ import annotations

import json
from pathlib import Path


def prequantized(model_dir: Path) -> bool:
    """Whether the checkpoint at `model_dir` is stored quantized (bitsandbytes 4-bit and the like)."""
    config = model_dir / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def quant_states_to(model, device) -> int:
    """Move every 4-bit layer's quantization constants to `device`; returns how many layers."""
    from bitsandbytes.nn import Linear4bit

    moved = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is not None:
            state.to(device)  # in place; the module's own reference (used after FSDP gathers) is the same object
            module.quant_state = state
            moved += 1
    return moved


def full_adapter_state(model) -> dict:
    """The trainable (LoRA) tensors, gathered whole on every rank from FSDP's shards (a collective:
    every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
