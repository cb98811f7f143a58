"""The pipeline's stages, each declared once: what it reads, what it consumes, where it runs.

Everything else is derived from STAGES: the build graph and its keys (pipeline.py), the image a
stage runs in (containers.py), which stages need llama.cpp on the host (tasks.py), the
compose services (checked by tests/test_specs.py) and each stage's memory preflight. What a
stage's key covers, and so what rebuilds it, is read here:

- ``reads``: the config sections (or dotted fields) it reads;
- ``upstream``: the stages whose outputs it consumes (their output digests);
- ``inputs``: files outside the run it reads (base model, data files), by content;
- ``disk``: what it writes, from the model's size (disk.py adds it up for the whole run);
- its code: ``stages/<name>.py`` and every project module it imports, transitively (codekeys.py);
- the runtime: package versions locally, the image's dependency layers in Docker.

Outputs are named in layout.py. Nothing here imports an ML library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stages.common import disk as disk_use
from stages.common import names, preflight
from stages.common.config import PipelineConfig
from stages.common.data import train_files
from stages.common.layout import RunLayout

# The images, by the key `invoke build --stage` takes; each is images/<key>.Dockerfile.
TRAIN_IMAGE, MERGE_IMAGE, GGUF_IMAGE = "train", "merge", "gguf"
IMAGES = (TRAIN_IMAGE, MERGE_IMAGE, GGUF_IMAGE)


def _always(cfg: PipelineConfig) -> bool:
    return True


def _model_and_data(cfg: PipelineConfig) -> list[Path]:
    return [Path(cfg.model.name_or_path), *map(Path, train_files(cfg.data)), *map(Path, cfg.data.eval_files)]


def _model(cfg: PipelineConfig) -> list[Path]:
    return [Path(cfg.model.name_or_path)]


def _nothing(cfg: PipelineConfig) -> list[Path]:
    return []


@dataclass(frozen=True)
class Intermediate:
    """Outputs of a stage that only later stages read: removed once all of `consumers` have run,
    unless `keep.<name>` says otherwise, and remade by rerunning the stage when one needs them."""

    name: str  # the field of the config's `keep` section
    files: Callable[[str, PipelineConfig, RunLayout], bool]  # which manifest outputs (paths relative to the run)
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class StageSpec:
    name: str
    image: str  # one of IMAGES
    reads: tuple[str, ...]  # config sections or dotted fields
    upstream: tuple[str, ...]  # stages whose outputs it consumes
    inputs: Callable[[PipelineConfig], list[Path]] = _nothing  # files outside the run, keyed by content
    enabled: Callable[[PipelineConfig], bool] = _always
    llama_cpp: bool = False  # runs llama.cpp tools or its converter
    network: bool = False  # may download (the Hub); the others run with networking off
    # RAM its peak needs, and for what, checked before the heavy work (preflight.py).
    memory: Callable[..., tuple[int, str]] | None = None
    intermediates: tuple[Intermediate, ...] = ()
    # Bytes it writes (run folder, caches, scratch), from the base model's size: disk.py.
    disk: Callable[..., disk_use.StageDisk] = disk_use.nothing

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    @property
    def offline(self) -> bool:
        """Runs without network: everything it reads is under runs/, cache/ and data/."""
        return not self.network

    def check_memory(self, cfg: PipelineConfig, layout: RunLayout, **facts) -> None:
        if self.memory is not None:
            preflight.check_free_memory(*self.memory(cfg, layout, **facts))


# The report settings convert reads: it checks its f16 file against the merged model on the held-out chunks.
CHECK = tuple(
    f"report.{f}"
    for f in ("enabled", "ctx", "max_chunks", "token_budget", "max_conversion_ppl_delta", "min_conversion_top1")
)


def _merged_weights(rel: str, cfg: PipelineConfig, layout: RunLayout) -> bool:
    # The weights only: config and tokenizer files stay (the report reads them).
    return rel.startswith(layout.rel(layout.merged) + "/") and rel.endswith(".safetensors")


def _outtype_gguf(rel: str, cfg: PipelineConfig, layout: RunLayout) -> bool:
    kind = cfg.gguf.outtype
    return rel in (layout.rel(layout.gguf(kind)), layout.rel(layout.gguf_logits(kind)))


def _prepares(cfg: PipelineConfig) -> bool:
    return bool(cfg.model.prepare or cfg.data.prepare or cfg.data.dataset)


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        names.PREPARE,
        MERGE_IMAGE,
        ("model", "data"),
        (),
        enabled=_prepares,
        network=True,  # a Hub dataset (data.dataset) is fetched here
        disk=disk_use.prepare,
    ),
    StageSpec(
        names.TRAIN,
        TRAIN_IMAGE,
        ("run_name", "model", "data", "quantization", "lora", "training"),
        (names.PREPARE,),
        inputs=_model_and_data,
        memory=preflight.train_memory,
        network=True,  # a Hub model id is fetched here
        disk=disk_use.train,
    ),
    StageSpec(
        names.MERGE,
        MERGE_IMAGE,
        ("model", "merge", "quantization"),  # onto=dequantized replays the training quantization
        (names.TRAIN,),
        inputs=_model,
        memory=preflight.merge_memory,
        intermediates=(Intermediate("merged", _merged_weights, (names.CONVERT,)),),
        disk=disk_use.merge,
    ),
    StageSpec(
        names.CONVERT,
        GGUF_IMAGE,
        ("run_name", "model", "gguf.outtype", "gguf.lora_adapter", "smoke.messages", "data", "training.seed", *CHECK),
        (names.MERGE, names.TRAIN),
        inputs=_model_and_data,
        llama_cpp=True,
        memory=preflight.convert_memory,
        intermediates=(Intermediate("outtype_gguf", _outtype_gguf, (names.QUANTIZE, names.REPORT)),),
        disk=disk_use.convert,
    ),
    StageSpec(
        names.QUANTIZE,
        GGUF_IMAGE,
        ("run_name", "gguf", "data", "training.seed"),
        (names.CONVERT,),
        inputs=_model_and_data,
        llama_cpp=True,
        memory=preflight.quantize_memory,
        disk=disk_use.quantize,
    ),
    StageSpec(
        names.REPORT,
        GGUF_IMAGE,
        ("run_name", "report", "gguf", "data", "training.seed"),
        (names.QUANTIZE, names.CONVERT, names.MERGE, names.TRAIN),
        inputs=_model_and_data,
        enabled=lambda cfg: cfg.report.enabled,
        llama_cpp=True,
        disk=disk_use.report,
    ),
    StageSpec(names.SMOKE, GGUF_IMAGE, ("smoke", "gguf", "data.system_prompt"), (names.QUANTIZE,), llama_cpp=True),
    StageSpec(
        names.EVALUATE,
        GGUF_IMAGE,
        ("eval", "data", "model", "gguf.token_embedding_type", "training.seed"),
        (names.QUANTIZE, names.TRAIN, names.PREPARE),
        inputs=_model_and_data,
        enabled=lambda cfg: cfg.eval.exact_match,
        llama_cpp=True,
        disk=disk_use.evaluate,
    ),
)
BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def spec(name: str) -> StageSpec:
    """The spec of stage `name`; ValueError naming the stages when there is none."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(NAMES)}") from None


def enabled(cfg: PipelineConfig) -> list[StageSpec]:
    """The stages `cfg` runs, in pipeline order."""
    return [s for s in STAGES if s.enabled(cfg)]
