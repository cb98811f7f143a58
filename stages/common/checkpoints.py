"""The train stage's resumable checkpoints: which one to resume, and when to start afresh.

    resume = latest_checkpoint(layout.checkpoints, training_digest(cfg, data_sha), manage=main_rank)

The folder is stamped with the digest of the training config (and data) that wrote it; another
config's checkpoints are cleared rather than resumed. A checkpoint is resumed only when every file
the Trainer needs is present and parses: a stage killed mid-save leaves a torn one, which is skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages.common.errors import console

CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
CONFIG_STAMP = "config.sha256"


def _checkpoint_ok(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed (torn or partial), or None when it is complete."""
    from safetensors import safe_open

    for name in CHECKPOINT_FILES:
        f = path / name
        if not f.is_file() or f.stat().st_size == 0:
            return f"{name} missing or empty"
    try:
        json.loads((path / "trainer_state.json").read_text())
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as fh:
            list(fh.keys())
    except Exception as exc:  # any parse failure means a torn write
        return f"unreadable ({type(exc).__name__})"
    if not list(path.glob("rng_state*.pth")):
        return "RNG state missing"
    return None


def latest_checkpoint(ckpt_dir: Path, digest: str, manage: bool = True) -> Path | None:
    """The newest complete checkpoint of this exact training config; torn ones are skipped. Only the
    process that `manage`s the folder (global rank 0) clears another config's checkpoints and stamps it;
    the others find None there, as rank 0 will once it has cleared it."""
    stamp = ckpt_dir / CONFIG_STAMP
    if not manage:
        stamped = stamp.is_file() and stamp.read_text().strip() == digest
        return _newest_complete(ckpt_dir) if stamped else None
    if ckpt_dir.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        console.print("checkpoints belong to another training config; starting afresh")
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")
    return _newest_complete(ckpt_dir)


def _newest_complete(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for path in found:
        why = _checkpoint_ok(path)
        if why is None:
            return path
        console.print(f"[yellow]skipping torn checkpoint {path.name}[/yellow]: {why}")
    return None
