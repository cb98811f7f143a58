"""Disk a whole run needs, estimated from the base model's size before any stage starts.

Each stage declares what it writes (specs.py: ``StageSpec.disk``, one function below per stage)
as a ``StageDisk``: bytes it leaves in the run folder, bytes it adds to cache/ (a Hub download,
the base GGUF evaluate makes), and scratch it holds only while it runs. ``run_disk`` walks the
enabled stages in order and returns the peak: what earlier stages left, plus this stage's outputs
and scratch. A stage's intermediate bytes (the merged weights, the f16 GGUF and its saved logits)
are freed once every stage that reads them has run, as the pipeline removes them unless the
config's ``keep`` section keeps them (specs.Intermediate); ``pruned`` names the stages to treat
so instead (an empty set: keep all).

Figures per stage (N parameters, r the LoRA rank; files measured on the demo and Mistral-7B):
- prepare: a prepared model at 16 bits (2N) in cache/;
- train: the adapter and two checkpoints (save_total_limit=2), each adapter + optimizer state;
  a Hub model not yet in the cache: its 16-bit checkpoint (2N), downloaded to the Hub cache;
- merge: the merged checkpoint at merge.dtype (2N);
- convert: the GGUF at gguf.outtype (2N for f16), the LoRA GGUF, and with the report the f16
  file's saved distributions: per scored token 2 bytes per vocabulary entry, ctx/2 tokens per
  chunk, as many chunks as report.token_budget gives;
- quantize: each type at its nominal bits per weight + 10 % (quantize.py's own check);
- report: its files (a few MB);
- evaluate: the base model at eval.quant_type in cache/, and its f16 GGUF while it is made (scratch).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stages.common import names

GGUF_BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
MERGE_BYTES = {"float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelSize:
    params: int
    vocab: int
    lora_params: int
    download: int = 0  # bytes still to fetch from the Hub into its cache
    source: str = ""  # where the figures come from, for the message

    @property
    def bytes16(self) -> int:
        return 2 * self.params


@dataclass(frozen=True)
class StageDisk:
    run: int = 0  # left in the run folder
    cache: int = 0  # added to cache/ or the Hub cache, kept
    scratch: int = 0  # held while the stage runs, then removed
    intermediate: int = 0  # the part of `run` removed once its readers ran (specs.Intermediate)


def _gguf(params: int, qtype: str) -> int:
    return int(params * names.QUANT_TYPES[qtype] / 8 * 1.1)


def prepare(cfg, size: ModelSize) -> StageDisk:
    return StageDisk(cache=size.bytes16 if cfg.model.prepare else 0)


def train(cfg, size: ModelSize) -> StageDisk:
    adapter = 4 * size.lora_params  # float32 on disk at most
    optim = "8bit" in cfg.training.optim
    state = adapter + size.lora_params * (2 if optim else 8)
    return StageDisk(run=adapter + 2 * state, cache=size.download)


def merge(cfg, size: ModelSize) -> StageDisk:
    merged = size.params * MERGE_BYTES[cfg.merge.dtype]
    return StageDisk(run=merged, intermediate=merged)


def convert(cfg, size: ModelSize) -> StageDisk:
    lora = 2 * size.lora_params if cfg.gguf.lora_adapter else 0
    gguf = int(size.params * GGUF_BYTES_PER_PARAM[cfg.gguf.outtype])
    r = cfg.report
    logits = r.chunks_for(size.params) * (r.ctx // 2) * (2 * size.vocab + 8) if r.enabled else 0
    return StageDisk(run=gguf + logits + lora, intermediate=gguf + logits)


def quantize(cfg, size: ModelSize) -> StageDisk:
    return StageDisk(run=sum(_gguf(size.params, q) for q in cfg.gguf.quant_types))


def report(cfg, size: ModelSize) -> StageDisk:
    return StageDisk(run=4 << 20)


def evaluate(cfg, size: ModelSize) -> StageDisk:
    return StageDisk(cache=_gguf(size.params, cfg.eval.quant_type), scratch=size.bytes16)


def nothing(cfg, size: ModelSize) -> StageDisk:
    return StageDisk()


@dataclass
class DiskPlan:
    rows: list[tuple[str, StageDisk]] = field(default_factory=list)
    run_peak: int = 0  # in the run folder, at the worst moment
    cache: int = 0  # added to caches by the end

    def describe(self) -> str:
        parts = [f"{name} {d.run / 2**30:.1f}" for name, d in self.rows if d.run >= 1 << 26]
        return ", ".join(parts) + " GiB" if parts else "under 64 MiB per stage"


def pruned_by_config(cfg, stages: list) -> set[str]:
    """Stages whose large intermediates (specs.Intermediate) the pipeline removes once read: those
    the config's `keep` section does not keep."""
    keep = getattr(cfg, "keep", None)
    return {s.name for s in stages for i in s.intermediates if not getattr(keep, i.name, True)}


def run_disk(cfg, size: ModelSize, stages: list, pruned: Iterable[str] | None = None) -> DiskPlan:
    """Peak disk of running `stages` (StageSpecs, in order) from nothing; the intermediates of stages
    in `pruned` (by default pruned_by_config) are freed once every enabled reader has run."""
    pruned = pruned_by_config(cfg, stages) if pruned is None else set(pruned)
    enabled = {s.name for s in stages}
    plan = DiskPlan()
    live: dict[str, StageDisk] = {}
    done: set[str] = set()
    for spec in stages:
        d = spec.disk(cfg, size)
        plan.rows.append((spec.name, d))
        plan.run_peak = max(plan.run_peak, sum(x.run for x in live.values()) + d.run + d.scratch)
        plan.cache += d.cache
        live[spec.name] = d
        done.add(spec.name)
        for producer in stages:
            readers = {c for i in producer.intermediates for c in i.consumers} & enabled
            kept = live.get(producer.name)
            if producer.name in pruned and kept and kept.intermediate and readers <= done:
                live[producer.name] = StageDisk(run=kept.run - kept.intermediate)
    return plan


def free_bytes(path: Path) -> tuple[int, Path]:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    import shutil

    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe
