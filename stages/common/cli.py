"""The command line every stage shares: --config, --run-dir, --set."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

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


def add_section_flags(parser: argparse.ArgumentParser, section: str, model: type[BaseModel], *fields: str) -> None:
    """One flag per field of a config section (quantization.quant_type: --quant-type), its choices,
    default and help taken from the field, for stages that also run without a pipeline YAML."""
    for name in fields:
        info = model.model_fields[name]
        flag, helptext = f"--{name.replace('_', '-')}", f"{info.description} (YAML: {section}.{name})"
        if info.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=info.default, help=helptext)
        else:
            parser.add_argument(flag, choices=get_args(info.annotation) or None, default=info.default, help=helptext)


def section_from_flags(args: argparse.Namespace, model: type[BaseModel], *fields: str):
    """The config section built from the flags add_section_flags made (the other fields at their defaults)."""
    return model(**{name: getattr(args, name) for name in fields})


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
