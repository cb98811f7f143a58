"""Train-speed profiles for one CUDA GPU: config overrides chosen by benchmarks/train_throughput.py
(Mistral-7B shapes, one H200; the README's Performance section has the figures). Each takes the
largest micro-batch that stays inside its memory target with gradient checkpointing and Liger's
fused kernels. `invoke pipeline --profile 24gb` applies one before any `--set`."""

from __future__ import annotations

from stages.common.errors import StageError

PROFILES: dict[str, list[str]] = {
    # <= 22 GiB allocated. LoRA dropout 0 lets peft skip the dropout module and its saved copy of every
    # adapted layer's input (1.6 GiB at batch 32), which makes room for batch 40; the loss curve on a
    # real model stays within 0.07% of dropout 0.1's (benchmarks/loss_curve.py, results/loss-curve-*).
    # training.fused_lora (stages/common/fused_lora.py): +4.3% on the same batches, per-step loss within
    # 1.0e-4 relative of peft's path (results/train-throughput-24gb-fused-1gpu-new-20261130T065526Z.json).
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


# Tokens/s against the reference recipe, measured in one run on one H200
# (benchmarks/results/train-throughput-*-1gpu-20261129T044510Z.json). `--profile auto` tries the
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
