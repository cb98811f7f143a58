"""Where everything of a run lives: the one place that names a run's paths.

    layout = RunLayout.of(cfg, run_dir)          # run_dir defaults to runs/<run_name>
    layout.merged, layout.gguf("Q4_K_M"), layout.manifest("merge"), layout.log("train")

Stages write through ``stage_output(...).path(layout.X)`` and read through ``layout.X``; tests and
benchmarks do the same, so a file is named here and nowhere else. Manifests list outputs by
their path relative to the run folder (``layout.rel``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stages.common import names


def cache_dir() -> Path:
    """The project cache: prepared models and data, base GGUFs, llama.cpp, file hashes
    ($KILN_CACHE, else cache/ in the working directory)."""
    return Path(os.environ.get(names.ENV_CACHE, names.CACHE_DIR))


def manifest_path(run_dir: Path, stage: str) -> Path:
    """A stage's manifest: the proof that its outputs are complete (artifacts.py)."""
    return run_dir / names.MANIFESTS_DIR / f"{stage}.json"


def log_path(run_dir: Path, stage: str) -> Path:
    return run_dir / names.LOGS_DIR / f"{stage}.log"


@dataclass(frozen=True)
class RunLayout:
    root: Path  # the run folder, runs/<run_name> unless given
    name: str  # the run's name, which GGUF file names carry

    @classmethod
    def of(cls, cfg, run_dir: Path | str | None = None) -> RunLayout:
        """The layout of `cfg`'s run (a PipelineConfig), in `run_dir` or runs/<run_name>."""
        root = Path(run_dir) if run_dir is not None else Path(names.RUNS_DIR) / cfg.run_name
        return cls(root, cfg.run_name)

    def rel(self, path: Path) -> str:
        """`path` relative to the run folder, as manifests list it."""
        return Path(path).relative_to(self.root).as_posix()

    # --- Inputs and bookkeeping -------------------------------------------------------------
    @property
    def config(self) -> Path:
        """The resolved config every stage of the run reads."""
        return self.root / names.RUN_CONFIG

    def manifest(self, stage: str) -> Path:
        return manifest_path(self.root, stage)

    def log(self, stage: str) -> Path:
        return log_path(self.root, stage)

    def failed_report(self, stage: str) -> Path:
        """Measurements a stage keeps for diagnosis when its gate fails."""
        return self.root / names.LOGS_DIR / f"{stage}.failed.json"

    @property
    def summary_json(self) -> Path:
        return self.root / names.SUMMARY_JSON

    @property
    def summary_md(self) -> Path:
        return self.root / names.SUMMARY_MD

    @property
    def loss_curve_png(self) -> Path:
        return self.root / names.LOSS_CURVE_PNG

    # --- train ------------------------------------------------------------------------------
    @property
    def adapter(self) -> Path:
        return self.root / names.ADAPTER_DIR

    @property
    def training_log(self) -> Path:
        """The trainer's log history (loss, learning rate, eval loss per logged step)."""
        return self.adapter / names.TRAINING_LOG

    @property
    def checkpoints(self) -> Path:
        return self.root / names.CHECKPOINTS_DIR

    @property
    def split(self) -> Path:
        """Which rows trained and which were held out, by hash (heldout.py)."""
        return self.root / names.SPLIT_FILE

    @property
    def tensorboard(self) -> Path:
        """Live event files (training.report_to=tensorboard); not an output: written as training goes."""
        return self.root / names.TENSORBOARD_DIR

    # --- merge ------------------------------------------------------------------------------
    @property
    def merged(self) -> Path:
        return self.root / names.MERGED_DIR

    # --- convert, quantize, report ----------------------------------------------------------
    @property
    def gguf_dir(self) -> Path:
        return self.root / names.GGUF_DIR

    def gguf(self, kind: str) -> Path:
        """A GGUF of the run, e.g. gguf/demo.Q4_K_M.gguf: kind is an outtype (f16) or a quant type."""
        return self.gguf_dir / f"{self.name}.{kind}.gguf"

    def gguf_logits(self, kind: str) -> Path:
        """A GGUF's next-token distributions on the held-out chunks (llama-perplexity's format)."""
        return self.gguf_dir / f"{self.name}.{kind}.logits"

    @property
    def lora_gguf(self) -> Path:
        return self.gguf(names.LORA_KIND)

    @property
    def chat_parity(self) -> Path:
        return self.gguf_dir / names.PARITY_FILE

    @property
    def imatrix(self) -> Path:
        return self.gguf_dir / names.IMATRIX_FILE

    @property
    def report_json(self) -> Path:
        return self.gguf_dir / names.REPORT_JSON

    @property
    def report_md(self) -> Path:
        return self.gguf_dir / names.REPORT_MD

    @property
    def report_png(self) -> Path:
        return self.gguf_dir / names.REPORT_PNG

    @property
    def modelfile(self) -> Path:
        return self.gguf_dir / names.MODELFILE

    @property
    def model_card(self) -> Path:
        return self.gguf_dir / names.MODEL_CARD

    # --- smoke, evaluate --------------------------------------------------------------------
    @property
    def smoke(self) -> Path:
        return self.root / names.SMOKE_FILE

    @property
    def eval_dir(self) -> Path:
        return self.root / names.EVAL_DIR

    @property
    def exact_match(self) -> Path:
        return self.eval_dir / names.EXACT_MATCH_FILE
