"""Hub datasets by id (data.dataset): the prepare stage fetches with the real `datasets` library from a
Hub-style cache laid out here (datasets--org--name/refs/main -> snapshots/<commit>/, as
huggingface_hub keeps one), offline, records the commit, reuses its export on a second run, and
the real train stage trains on it. No network, no mocks: stages run in subprocesses, because
huggingface_hub reads its cache location and offline switch at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import as_text, repeat_rows

from stages.common import hub_data, names, specs
from stages.common.artifacts import read_manifest
from stages.common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
REPO = "kiln-test/tiny-guanaco"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
OLD_COMMIT = "0000000000000000000000000000000000000001"
README = """\
---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
- config_name: small
  data_files:
  - split: train
    path: small/train-*.parquet
---
# tiny guanaco, made by the test
"""


def lay_out(cache: Path) -> Path:
    """REPO at COMMIT (branch main) and OLD_COMMIT (tag v0), as the Hub cache keeps them."""
    repo = cache / f"datasets--{REPO.replace('/', '--')}"
    for commit, n in ((COMMIT, 24), (OLD_COMMIT, 8)):
        snap = repo / "snapshots" / commit
        (snap / "data").mkdir(parents=True)
        rows = as_text(repeat_rows(n, seed=n))
        pq.write_table(pa.Table.from_pylist(rows), snap / "data" / "train-00000-of-00001.parquet")
        (snap / "small").mkdir()
        pq.write_table(pa.Table.from_pylist(rows[:5]), snap / "small" / "train-00000-of-00001.parquet")
        (snap / "README.md").write_text(README)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v0").write_text(OLD_COMMIT)
    return cache


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return lay_out(tmp_path_factory.mktemp("hub"))


def env(hub: Path, kiln_cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", names.ENV_CACHE: str(kiln_cache),
            "PYTHONPATH": str(ROOT)}  # fmt: skip


def write_config(folder: Path, model: Path, **data) -> Path:
    tree = {
        "run_name": "hub-data",
        "model": {"name_or_path": str(model)},
        "data": {"dataset": REPO, "format": "text", "max_seq_length": 64, "eval_fraction": 0.25, **data},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"device": "cpu", "max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 2},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def stage(name: str, config: Path, run_dir: Path, environ: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"stages.{name}", "--config", str(config), "--run-dir", str(run_dir)]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, cwd=ROOT)


def exported(kiln_cache: Path, config: Path) -> Path:
    os.environ[names.ENV_CACHE], old = str(kiln_cache), os.environ.get(names.ENV_CACHE)
    try:
        return hub_data.local_file(load_config(config).data)
    finally:
        os.environ.pop(names.ENV_CACHE) if old is None else os.environ.__setitem__(names.ENV_CACHE, old)


def test_prepare_fetches_records_the_commit_and_reuses_its_export(hub, tmp_path, tiny_mistral):
    config, run_dir, kiln_cache = write_config(tmp_path, tiny_mistral), tmp_path / "runs" / "r", tmp_path / "cache"
    proc = stage(names.PREPARE, config, run_dir, env(hub, kiln_cache))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_manifest(run_dir, names.PREPARE)["inputs"]["dataset"]
    assert (record["revision"], record["requested_revision"], record["rows"], record["cached"]) == (
        COMMIT,
        None,
        24,
        False,
    )
    target = exported(kiln_cache, config)
    assert Path(record["file"]) == target
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows == as_text(repeat_rows(24, seed=24))  # every row, in order, as datasets read them
    stamp = target.stat().st_mtime_ns

    again = stage(names.PREPARE, config, run_dir, env(hub, kiln_cache))
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_manifest(run_dir, names.PREPARE)["inputs"]["dataset"]["cached"] is True
    assert target.stat().st_mtime_ns == stamp, "a second run at the same commit rewrites nothing"

    # The train stage, offline, reads the export; its key sees the file's content.
    trained = stage(names.TRAIN, config, run_dir, env(hub, kiln_cache))
    assert trained.returncode == 0, trained.stderr[-2000:]
    metrics = read_manifest(run_dir, names.TRAIN)["metrics"]
    assert (metrics["train_rows"], metrics["eval_rows"]) == (18, 6)
    assert str(target) in read_manifest(run_dir, names.TRAIN)["inputs"]["data"]
    os.environ[names.ENV_CACHE] = str(kiln_cache)
    try:
        assert target in specs.spec(names.TRAIN).inputs(load_config(config))
    finally:
        del os.environ[names.ENV_CACHE]


def test_pinned_revision_subset_and_data_files(hub, tmp_path, tiny_mistral):
    cases = {
        "tag": ({"revision": "v0"}, OLD_COMMIT, 8),
        "commit": ({"revision": COMMIT}, COMMIT, 24),
        "subset": ({"subset": "small"}, COMMIT, 5),
        "data_files": ({"data_files": ["small/*.parquet"]}, COMMIT, 5),
    }
    for case, (data, commit, n) in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        config = write_config(folder, tiny_mistral, **data)
        proc = stage(names.PREPARE, config, folder / "run", env(hub, folder / "cache"))
        assert proc.returncode == 0, (case, proc.stderr[-2000:])
        record = read_manifest(folder / "run", names.PREPARE)["inputs"]["dataset"]
        assert (record["revision"], record["rows"]) == (commit, n), case


def test_unknown_revision_offline_is_one_line_with_the_fix(hub, tmp_path, tiny_mistral):
    config = write_config(tmp_path, tiny_mistral, revision="f" * 40)
    proc = stage(names.PREPARE, config, tmp_path / "run", env(hub, tmp_path / "cache"))
    assert proc.returncode == 2
    (line,) = [ln for ln in proc.stderr.splitlines() if "✗ prepare" in ln]
    assert "is not in the Hub cache and the Hub cannot be reached" in line and "export the rows" in line


def test_config_takes_one_source_of_rows(tmp_path):
    from stages.common.errors import StageError

    base = {"run_name": "r", "model": {"name_or_path": "m"}}
    for data, message in (
        ({"dataset": REPO, "train_files": ["a.jsonl"]}, "data.dataset and data.train_files are both set"),
        ({}, "no training rows: list local files in data.train_files or set data.dataset"),
        ({"dataset": "not an id"}, "is not a Hub id"),
        ({"train_files": ["a.jsonl"], "revision": "main"}, "go with data.dataset"),
    ):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, "data": data}))
        with pytest.raises(StageError, match=message):
            load_config(path)
    assert specs.spec(names.PREPARE).network, "prepare fetches datasets: it runs where the network is"
    cfg_path = tmp_path / "ok.yaml"
    cfg_path.write_text(yaml.safe_dump({**base, "data": {"dataset": REPO}}))
    assert names.PREPARE in [s.name for s in specs.enabled(load_config(cfg_path))]
