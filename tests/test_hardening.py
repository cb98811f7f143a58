"""Hardened inputs: Hub revisions resolved to a commit and recorded, remote code off unless asked.

No network: a Hub cache is laid out on disk the way huggingface_hub keeps one
(models--org--name/refs/main -> snapshots/<commit>/), and the stages run offline against it in
subprocesses (huggingface_hub reads its cache location and offline switch at import).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import as_text, repeat_rows, write_jsonl

from stages.common import names
from stages.common.config import ModelConfig, PipelineConfig
from stages.common.errors import console
from stages.common.model import resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "kiln-test/tiny-mistral"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_mistral) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(tiny_mistral, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def offline_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def resolve_in_subprocess(cache: Path, revision: str | None) -> subprocess.CompletedProcess:
    code = (
        "import sys; from stages.common.config import ModelConfig; from stages.common.model import resolve;"
        "from stages.common.errors import StageError\n"
        f"try:\n r = resolve(ModelConfig(name_or_path={REPO!r}, revision={revision!r}))\n"
        " print(r.source, r.revision, r.path)\n"
        "except StageError as e:\n print(e, file=sys.stderr); sys.exit(2)\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=offline_env(cache), capture_output=True, text=True)


def test_hub_id_resolves_to_the_commit_of_the_branch(hub_cache):
    proc = resolve_in_subprocess(hub_cache, None)
    assert proc.returncode == 0, proc.stderr
    source, revision, path = proc.stdout.split()
    assert (source, revision) == ("hub", COMMIT)
    assert Path(path) == hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT


def test_pinned_commit_resolves_and_an_unknown_one_is_refused(hub_cache):
    assert resolve_in_subprocess(hub_cache, COMMIT).stdout.split()[:2] == ["hub", COMMIT]
    proc = resolve_in_subprocess(hub_cache, "f" * 40)
    assert proc.returncode == 2
    assert "neither a local folder nor reachable on the Hub" in " ".join(proc.stderr.split())


def test_train_manifest_records_the_resolved_commit(hub_cache, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", as_text(repeat_rows(16, seed=3)))
    cfg_path = tmp_path / "hub.yaml"
    tree = {
        "run_name": "hub",
        "model": {"name_or_path": REPO},  # no revision: the branch's commit is what gets recorded
        "data": {"train_files": [str(data)], "format": "text", "max_seq_length": 64, "eval_fraction": 0.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"device": "cpu", "max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 2},
    }
    cfg_path.write_text(yaml.safe_dump(tree))
    run_dir = tmp_path / "runs" / "hub"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "--config", str(cfg_path), "--run-dir", str(run_dir)],
        env=offline_env(hub_cache),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    inputs = json.loads((run_dir / names.MANIFESTS_DIR / f"{names.TRAIN}.json").read_text())["inputs"]
    assert inputs["model_source"] == "hub"
    assert inputs["model_revision"] == COMMIT


def test_remote_code_is_off_by_default_and_warns_when_on(tiny_mistral):
    assert ModelConfig(name_or_path="x").trust_remote_code is False
    assert PipelineConfig.model_fields["model"].annotation is ModelConfig
    with console.capture() as quiet:
        resolve(ModelConfig(name_or_path=str(tiny_mistral)))
    assert "trust_remote_code" not in quiet.get()
    with console.capture() as loud:
        resolve(ModelConfig(name_or_path=str(tiny_mistral), trust_remote_code=True))
    assert (
        "warning" in loud.get()
        and "model.trust_remote_code is on: code shipped with the model will run" in " ".join(loud.get().split())
    )


@pytest.mark.parametrize("opt_in", [False, True])
def test_remote_code_setting_reaches_transformers(tiny_mistral, monkeypatch, opt_in):
    """The train stage hands the config's choice to transformers, not a default of its own."""
    import transformers

    from stages.common.config import validate_config
    from stages.train import load_tokenizer

    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen["trust_remote_code"] = kwargs.get("trust_remote_code")
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    cfg = validate_config(
        {
            "run_name": "t",
            "model": {"name_or_path": str(tiny_mistral), "trust_remote_code": opt_in},
            "data": {"train_files": ["d.jsonl"]},
        }
    )
    load_tokenizer(tiny_mistral, cfg)
    assert seen["trust_remote_code"] is opt_in
