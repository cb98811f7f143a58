"""Does the train stage fit on this GPU? The estimate (vram.py) against the card's free memory, in
three places:

- the train stage, on CUDA, before it loads the model: free memory from CUDA itself; when the
  estimate does not fit it stops with both numbers and the fastest profile that would fit;
- `invoke check` and `invoke pipeline` before any stage, from nvidia-smi (no ML library imported);
- `--profile auto`: the fastest measured profile (profiles.SPEEDUP) whose estimate fits the visible
  card, said out loud.

KILN_SKIP_MEMORY_CHECK=1 turns the stop into nothing (the same switch as the host-RAM preflight).
"""

from __future__ import annotations

import os
from pathlib import Path

from stages.common import vram
from stages.common.errors import StageError
from stages.common.vram import Estimate, GiB


def model_config(model) -> tuple[dict | None, str]:
    """The base model's config.json (ModelConfig `model`) without downloading weights: the local
    folder, or the Hub cache for a Hub id; (None, why) when neither has it."""
    local = Path(model.name_or_path).expanduser()
    if local.is_dir():
        config = vram.read_model_config(local)
        return config, str(local / "config.json") if config else f"{local} has no readable config.json"
    if model.prepare:
        return None, f"{local} is made by the prepare stage ({model.prepare})"
    from stages.common.model import HUB_ID

    if not HUB_ID.match(model.name_or_path):
        return None, f"{local} does not exist"
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision)
    except Exception:  # an unreadable cache is the same as none
        found = None
    if isinstance(found, str):
        config = vram.read_model_config(Path(found).parent)
        if config:
            return config, found
    return None, f"{model.name_or_path} is not in the Hub cache yet (the train stage downloads it)"


def _fits_message(cfg, config: dict, usable: int) -> str:
    pick = vram.fitting_profile(cfg, config, usable)
    if pick is None:
        return (
            "no measured profile fits either: lower training.batch_size or data.max_seq_length, "
            "or use a GPU with more memory"
        )
    name, est = pick
    if name is None:
        return f"the recipe without a profile would need {est.total / GiB:.1f} GiB"
    return (
        f"--profile {name} would need {est.total / GiB:.1f} GiB and fits "
        "(or lower training.batch_size or data.max_seq_length)"
    )


def misfit(cfg, config: dict, est: Estimate, free: int, usable: int, card: str) -> str:
    """The one-line story of an estimate that does not fit."""
    t = cfg.training
    return (
        f"the train stage needs about {est.total / GiB:.1f} GiB of GPU memory ({est.describe()}; micro-batch "
        f"{t.batch_size} × {cfg.data.max_seq_length} tokens), and {card} has {free / GiB:.1f} GiB free "
        f"({usable / GiB:.1f} GiB usable after {vram.HEADROOM / GiB:.0f} GiB headroom); "
        f"{_fits_message(cfg, config, usable)}; {vram.ENV_SKIP}=1 skips this check"
    )


def check_train_fits(cfg, model_dir: Path) -> Estimate | None:
    """In the train stage, on CUDA, before loading: StageError when the estimate exceeds what this
    process's GPU has free. Returns the estimate (None for an architecture it cannot estimate)."""
    import torch

    config = vram.read_model_config(model_dir)
    est = vram.estimate_for(cfg, config) if config else None
    if est is None or os.environ.get(vram.ENV_SKIP) == "1":
        return est
    device = int(os.environ.get("LOCAL_RANK", "0"))
    free, _total = torch.cuda.mem_get_info(device)
    usable = vram.usable_bytes(free, context_counted=True)
    if est.total > usable:
        raise StageError(misfit(cfg, config, est, free, usable, torch.cuda.get_device_name(device)))
    return est


def auto_profile(load, gpus: list[vram.Gpu] | None = None) -> tuple[str | None, str]:
    """Resolve `--profile auto`: `load(profile)` gives the PipelineConfig with that profile applied
    (before --set). Returns (profile or None, the sentence that says what was picked and why)."""
    gpus = vram.visible_gpus() if gpus is None else gpus
    base = load(None)
    if base.training.device == "cpu" or not gpus:
        why = "training.device is cpu" if base.training.device == "cpu" else "no NVIDIA GPU is visible (nvidia-smi)"
        return None, f"--profile auto: {why}; no profile applied (the profiles are for one CUDA GPU)"
    config, where = model_config(base.model)
    if config is None:
        raise StageError(
            f"--profile auto needs the base model's config.json to estimate GPU memory, and {where}; "
            "download the model first or pick a profile by name (--profile 24gb or 12gb)"
        )
    from stages.common.profiles import by_speed

    gpu = min(gpus, key=lambda g: g.free)
    usable = vram.usable_bytes(gpu.free, context_counted=False)
    tried = []
    for name, _ in by_speed():
        est = vram.estimate_for(load(name), config)
        if est is None:
            raise StageError(f"--profile auto: cannot estimate GPU memory for {where}'s architecture; name a profile")
        tried.append(f"{name or 'recipe'} {est.total / GiB:.1f}")
        if est.total <= usable:
            label = f"profile {name}" if name else "the recipe as written (no profile)"
            return name, (
                f"--profile auto: {label}, estimated {est.total / GiB:.1f} GiB of the {usable / GiB:.1f} GiB usable "
                f"on {gpu.name} ({gpu.free / GiB:.1f} GiB free); fastest measured that fits"
            )
    raise StageError(
        f"--profile auto: nothing fits {gpu.name} ({usable / GiB:.1f} GiB usable of {gpu.free / GiB:.1f} GiB free; "
        f"estimates: {', '.join(tried)} GiB); lower training.batch_size or data.max_seq_length"
    )
