"""The command line every stage shares: --config, --run-dir, --set."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from stages.common.config import PipelineConfig, load_config
from stages.common.errors import StageError
from stages.common.layout import RunLayout


def stage_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argparse parser with the shared options; `doc` is the stage module's docstring."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="pipeline YAML (the run's frozen runs/<run>/config.yaml)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run folder (default: runs/<run_name>)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. training.learning_rate=1e-4 (repeatable)",
    )
    return parser


@dataclass(frozen=True)
class StageContext:
    cfg: PipelineConfig
    layout: RunLayout

    @property
    def run_dir(self) -> Path:
        return self.layout.root


def context(args: argparse.Namespace) -> StageContext:
    if args.config is None:
        raise StageError("no --config given; pass the pipeline YAML, e.g. --config configs/demo.yaml")
    cfg = load_config(args.config, args.overrides)
    return StageContext(cfg=cfg, layout=RunLayout.of(cfg, args.run_dir))
