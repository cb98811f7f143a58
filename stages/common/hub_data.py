"""Hub datasets by id: ``data.dataset`` is fetched once by the prepare stage and read by every other
stage as a plain local file.

    data:
      dataset: mlabonne/guanaco-llama2-1k
      split: train                   # any `datasets` split expression, e.g. train[:90%]
      revision: null                 # a commit hash makes the run reproducible
      subset: null                   # the configuration name, for datasets with several
      data_files: []                 # only these files of the repository (glob patterns)

The prepare stage (the only one with network) resolves ``revision`` to a commit with
huggingface_hub, under the same cache and offline rules as models (``HF_HUB_CACHE``,
``HF_HUB_OFFLINE=1`` reads the cache alone, ``HF_TOKEN`` for gated datasets), loads the split with
`datasets` from that snapshot and writes its rows as JSONL to ``local_file(cfg)`` under cache/.
The file's name depends only on the config, so the offline stages find it without asking the Hub;
a stamp beside it records the commit, and a second run with the same commit rewrites nothing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from stages.common import names
from stages.common.config import DataConfig
from stages.common.errors import StageError, console
from stages.common.layout import cache_dir

DATASETS_DIR = "datasets"
STAMP_SUFFIX = ".kiln-dataset.json"
# Never fetched: dataset loading scripts (code; `datasets` no longer runs them anyway).
IGNORE = ["*.py", "*.pyc"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def request(cfg: DataConfig) -> dict[str, Any]:
    """What the config asks of the Hub: the identity of the exported file."""
    return {
        "dataset": cfg.dataset,
        "revision": cfg.revision,
        "subset": cfg.subset,
        "split": cfg.split,
        "data_files": list(cfg.data_files),
    }


def local_file(cfg: DataConfig) -> Path:
    """Where the rows of ``cfg.dataset`` live once fetched: cache/datasets/<org>--<name>/...jsonl."""
    if not cfg.dataset:
        raise ValueError("local_file() needs data.dataset")
    from stages.common.keys import digest

    folder = cache_dir() / DATASETS_DIR / cfg.dataset.replace("/", "--")
    name = f"{_slug(cfg.subset or 'default')}.{_slug(cfg.split)}.{digest(request(cfg))[:12]}.jsonl"
    return folder / name


def stamp_path(target: Path) -> Path:
    return target.with_name(target.name + STAMP_SUFFIX)


def read_stamp(target: Path) -> dict[str, Any] | None:
    try:
        return json.loads(stamp_path(target).read_text())
    except (OSError, ValueError):
        return None


def snapshot(cfg: DataConfig) -> tuple[Path, str]:
    """The dataset repository at the resolved commit, from the Hub or the cache: (folder, commit)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from stages.common.progress import hub_progress_bars, status

    what = f"{cfg.dataset}@{cfg.revision or 'main'}"
    try:
        with hub_progress_bars(), status(f"fetching dataset {what}"):
            folder = snapshot_download(
                cfg.dataset,
                repo_type="dataset",
                revision=cfg.revision,
                allow_patterns=[*cfg.data_files, "README.md"] if cfg.data_files else None,
                ignore_patterns=IGNORE,
                token=os.environ.get("HF_TOKEN"),  # only ever from the environment at run time
            )
    except LocalEntryNotFoundError:
        raise StageError(
            f"dataset {what} is not in the Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no "
            "network); run the prepare stage once where the Hub is reachable, or export the rows to a local "
            "file and list it in data.train_files"
        ) from None
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0]
        raise StageError(
            f"Hub refused dataset {what}: {first}; check the id and revision, and HF_TOKEN for gated datasets"
        ) from None
    path = Path(folder)
    return path, path.name  # huggingface_hub names snapshot folders by their commit


def load_rows(cfg: DataConfig, folder: Path) -> list[dict[str, Any]]:
    """The split's rows, read by `datasets` from the snapshot folder (its README's configs name
    the subsets and their files, as on the Hub)."""
    import datasets

    from stages.common.progress import is_terminal

    if not is_terminal():
        datasets.disable_progress_bars()  # plain logs: one line per step below, not a bar per split
    with tempfile.TemporaryDirectory(prefix=names.TMP_PREFIX) as scratch:  # datasets' Arrow cache: not kept
        try:
            ds = datasets.load_dataset(
                str(folder),
                name=cfg.subset,
                split=cfg.split,
                data_files=list(cfg.data_files) or None,
                cache_dir=scratch,
            )
        except (ValueError, FileNotFoundError) as exc:
            first = str(exc).splitlines()[0]
            raise StageError(
                f"dataset {cfg.dataset}: {first}; check data.subset, data.split and data.data_files"
            ) from None
        return ds.to_list()


def write_jsonl(rows: list[dict[str, Any]], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{names.TMP_PREFIX}{target.name}.{os.getpid()}")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(target)


def fetch(cfg: DataConfig) -> dict[str, Any]:
    """Fetch data.dataset and write its rows to local_file(cfg), unless they are there at the same
    commit. Returns what the prepare manifest records (the commit as ``revision``)."""
    target = local_file(cfg)
    folder, commit = snapshot(cfg)
    record = {**request(cfg), "requested_revision": cfg.revision, "revision": commit, "file": str(target)}
    old = read_stamp(target)
    if target.is_file() and old is not None and old.get("revision") == commit and old.get("request") == request(cfg):
        console.print(f"dataset {cfg.dataset} at {commit[:12]}: {old['rows']} rows in {target} (cached)")
        return {**record, "rows": old["rows"], "cached": True}
    rows = load_rows(cfg, folder)
    if not rows:
        raise StageError(f"dataset {cfg.dataset} split {cfg.split!r} has no rows; check data.split")
    write_jsonl(rows, target)
    stamp = {"request": request(cfg), "revision": commit, "rows": len(rows)}
    stamp_path(target).write_text(json.dumps(stamp, indent=1))
    console.print(f"dataset {cfg.dataset} at {commit[:12]}: {len(rows)} rows written to {target}")
    return {**record, "rows": len(rows), "cached": False}
