"""Where users look during and after training: TensorBoard, the loss-curve PNG, a quiet start.

- ``training.report_to: tensorboard`` (off by default): the trainer writes event files to
  runs/<run>/tensorboard/ as it logs (every training.logging_steps), so
  ``tensorboard --logdir runs/<run>/tensorboard`` shows the loss live. They are not a stage output:
  they grow while the stage runs and a rerun adds to them.
- ``loss_curve_png``: train loss (every logged step) and eval loss against step, from the train
  stage's log history (adapter/training_log.json), for the run summary.
- ``quiet_optional_kernels``: bitsandbytes (0.50) on a CPU with AVX512-BF16 tries, at import, to
  fetch a faster 4-bit matmul from the Hugging Face Hub through the optional `kernels` package,
  and logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
  'kernels'..." when it is not installed. Nothing is wrong: bitsandbytes then uses its own CPU
  kernels, which is what the CPU tests and the demo measure. kiln does not install `kernels` (it
  downloads code from the Hub at run time, and the stages run offline), so that one record is
  dropped; every other bitsandbytes message passes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from stages.common.layout import RunLayout

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_OPTIONAL_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
TENSORBOARD_ENV = "TENSORBOARD_LOGGING_DIR"  # read by transformers' TensorBoardCallback


class _DropOptionalKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_OPTIONAL_KERNEL)


def quiet_optional_kernels() -> None:
    """Drop bitsandbytes' notice about the optional `kernels` package (see the module docstring).
    Call before bitsandbytes is imported."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropOptionalKernelNotice) for f in logger.filters):
        logger.addFilter(_DropOptionalKernelNotice())


def prepare_training_output(cfg, layout: RunLayout) -> None:
    """Before the trainer is built: the quiet start, and where TensorBoard's event files go."""
    quiet_optional_kernels()
    if cfg.training.report_to == "tensorboard":
        layout.tensorboard.mkdir(parents=True, exist_ok=True)
        os.environ[TENSORBOARD_ENV] = str(layout.tensorboard)


def loss_points(layout: RunLayout) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) loss against step from the train stage's log history; empty when absent."""
    try:
        history = json.loads(layout.training_log.read_text())
    except (OSError, ValueError):
        return [], []
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    return train, evals


def loss_curve_png(layout: RunLayout, path: Path | None = None) -> Path | None:
    """Write the loss curve (train and eval loss against step); None when nothing was logged."""
    train, evals = loss_points(layout)
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or layout.loss_curve_png
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        marker = "." if len(train) < 30 else None
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", marker=marker)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss (held out)", color="tab:red", marker="o")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"{layout.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
