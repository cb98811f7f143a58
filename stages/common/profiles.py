"""Train-speed profiles for one CUDA GPU: config overrides chosen by benchmarks/train_throughput.py
(Mistral-7B shapes on one GPU; docs/performance.md has the figures). Each takes the
largest micro-batch that stays inside its memory target with gradient checkpointing and Liger's
fused kernels. `invoke pipeline --profile 24gb` applies one before any `--set`."""

from __future__ import annotations

from stages.common.errors import StageError

PROFILES: dict[str, list[str]] = {
    # <= 22 GiB allocated. LoRA dropout 0 lets peft skip the dropout module and its saved copy of each
    # adapted layer's input, which makes room for batch 40; fused_lora runs the same math in fewer
    # kernels. Both keep the loss curve (docs/performance.md).
    "24gb": [
        "training.batch_size=40",
        "training.gradient_checkpointing=true",
        "training.liger_kernel=true",
        "lora.dropout=0.0",
        "training.fused_lora=true",
    ],
    # <= 10 GiB allocated, the recipe's own dropout.
    "12gb": ["training.batch_size=8", "training.gradient_checkpointing=true", "training.liger_kernel=true"],
}


# Tokens/s against the reference recipe (benchmarks/results/train-throughput-*). `--profile auto` tries the
# profiles in this order, then the reference, and takes the first whose memory estimate fits.
SPEEDUP: dict[str, float] = {"24gb": 3.27, "12gb": 1.54}
AUTO = "auto"


def by_speed() -> list[tuple[str | None, list[str]]]:
    """(profile, its overrides) from the fastest measured to the reference recipe (None, no overrides)."""
    ranked = sorted(PROFILES, key=lambda n: -SPEEDUP.get(n, 1.0))
    return [*((n, list(PROFILES[n])) for n in ranked), (None, [])]


def profile_overrides(name: str | None) -> list[str]:
    """The overrides of profile `name` (none for None). `auto` is resolved before this
    (gpu_fit.auto_profile), where the card and the model are known."""
    if name is None:
        return []
    if name not in PROFILES:
        raise StageError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)} or {AUTO}")
    return list(PROFILES[name])
