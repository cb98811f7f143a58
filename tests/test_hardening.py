"""Hardened inputs: Hub revisions resolved to a commit and recorded, remote code off unless asked.

No network: a Hub cache is laid out on disk the way huggingface_hub keeps one
(models--org--name/refs/main -> snapshots/<commit>/), and the stages run offline against it in
subprocesses (huggingface_hub reads its cache location and offline switch at import).
Remote code is a model folder with code of its own (config.json's auto_map) that logs which
stage imported it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from conftest import as_text, repeat_rows, write_jsonl

from stages.common import names
from stages.common.artifacts import read_manifest
from stages.common.config import ModelConfig, PipelineConfig
from stages.common.errors import console
from stages.common.model import resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "kiln-test/tiny-mistral"
ROOT = Path(__file__).resolve().parents[1]
CODE_LOG = "KILN_TEST_CODE_LOG"
SHIPPED_CONFIG = f"""\
import os
import sys

from transformers import MistralConfig

with open(os.environ["{CODE_LOG}"], "a") as log:
    log.write(sys.modules["__main__"].__spec__.name + "\\n")


class ShippedConfig(MistralConfig):
    model_type = "mistral"
"""
SHIPPED_MODEL = """\
from transformers import MistralForCausalLM

from .configuration_shipped import ShippedConfig


class ShippedForCausalLM(MistralForCausalLM):
    config_class = ShippedConfig
"""
SHIPPED_FILES = {"configuration_shipped.py": SHIPPED_CONFIG, "modeling_shipped.py": SHIPPED_MODEL}


def hub_layout(cache: Path, model: Path) -> Path:
    """`model` as huggingface_hub caches REPO at COMMIT, its main branch."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_mistral) -> Path:
    return hub_layout(tmp_path_factory.mktemp("hub"), tiny_mistral)


@pytest.fixture(scope="module")
def model_with_code(tmp_path_factory, tiny_mistral) -> Path:
    """The tiny model with code of its own, shipped the way remote-code models ship it."""
    model = tmp_path_factory.mktemp("shipped") / "model"
    shutil.copytree(tiny_mistral, model)
    for name, text in SHIPPED_FILES.items():
        (model / name).write_text(text)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_shipped.ShippedConfig",
        "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    return model


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


def two_step_config(folder: Path, model: dict) -> Path:
    """A config that trains 2 steps on the CPU; `model` is its model section."""
    data = write_jsonl(folder / "train.jsonl", as_text(repeat_rows(16, seed=3)))
    tree = {
        "run_name": "tiny",
        "model": model,
        "data": {"train_files": [str(data)], "format": "text", "max_seq_length": 64, "eval_fraction": 0.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"device": "cpu", "max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 2},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_stage(stage: str, config: Path, run_dir: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--config", str(config), "--run-dir", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_train_manifest_records_the_resolved_commit(hub_cache, tmp_path):
    # No revision: the branch's commit is what gets recorded.
    config = two_step_config(tmp_path, {"name_or_path": REPO})
    run_dir = tmp_path / "runs" / "hub"
    run_stage(names.TRAIN, config, run_dir, offline_env(hub_cache))
    inputs = read_manifest(run_dir, names.TRAIN)["inputs"]
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


@pytest.mark.e2e
@pytest.mark.parametrize("opt_in", [False, True])
def test_model_code_runs_in_train_and_merge_only_when_opted_in(model_with_code, tmp_path, opt_in):
    """The real stages on a model that ships code: without the opt-in they train and merge with
    transformers' own Mistral classes and never import it; with it, both stages run it."""
    config = two_step_config(tmp_path, {"name_or_path": str(model_with_code), "trust_remote_code": opt_in})
    log = tmp_path / "imported-by.txt"
    env = {**os.environ, CODE_LOG: str(log), "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    for stage in (names.TRAIN, names.MERGE):
        run_stage(stage, config, tmp_path / "runs" / "hub", env)
    importers = sorted(set(log.read_text().split())) if log.exists() else []
    assert importers == (["stages.merge", "stages.train"] if opt_in else [])


@pytest.mark.parametrize("opt_in", [False, True])
def test_hub_download_fetches_model_code_only_when_it_may_run(model_with_code, tmp_path, monkeypatch, opt_in):
    """A Hub model's code must come down with its weights when it is allowed to run (else loading
    fails on the missing file), and must not otherwise."""
    import huggingface_hub

    cache = hub_layout(tmp_path / "hub", model_with_code)
    real = huggingface_hub.snapshot_download
    asked = {}

    def from_cache(repo_id, **kwargs):  # the real download, answered from the cache (no network here)
        asked.update(kwargs)
        return real(repo_id, cache_dir=cache, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", from_cache)
    resolved = resolve(ModelConfig(name_or_path=REPO, trust_remote_code=opt_in))
    fetched = {f.name for f in resolved.path.iterdir() if any(fnmatch(f.name, p) for p in asked["allow_patterns"])}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= fetched
    assert (set(SHIPPED_FILES) <= fetched) if opt_in else fetched.isdisjoint(SHIPPED_FILES)
