"""One declaration per stage (stages/common/specs.py), and the keys derived from it.

Everything that lists stages elsewhere is checked against the specs here: the stage modules, the
images' Dockerfiles and compose services, which stages need llama.cpp. The build keys see a
stage's real code (its module and what it imports, transitively) and the content of the files it
reads from outside the run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import StandInRuntime

from stages.common import keys, names, specs
from stages.common import pipeline as graph
from stages.common.config import validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_is_a_module_with_an_entry_point_in_its_image():
    for spec in specs.STAGES:
        source = (ROOT / "stages" / f"{spec.name}.py").read_text()
        assert "def main(argv: list[str] | None = None) -> int:" in source, spec.name
        assert "raise SystemExit(main())" in source, spec.name
        assert spec.image in specs.IMAGES
    for image in specs.IMAGES:
        # Each image's last build step imports exactly the stages that run in it.
        dockerfile = (ROOT / "images" / f"{image}.Dockerfile").read_text()
        smoke = dockerfile[dockerfile.index("COPY stages /work/stages") :].splitlines()
        imported = set(re.findall(r"stages\.(\w+)", next(line for line in smoke if line.startswith("RUN"))))
        assert imported == {s.name for s in specs.STAGES if s.image == image}, image


def test_llama_cpp_flag_matches_the_code():
    """A stage is marked as needing llama.cpp exactly when its code reaches the llama.cpp module."""
    for spec in specs.STAGES:
        uses = ROOT / "stages" / "common" / "llamacpp.py" in keys.code_files(spec.module)
        assert spec.llama_cpp == uses, spec.name


def test_compose_services_run_the_images():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    images = {svc["image"] for svc in compose["services"].values()}
    assert images == {f"{names.PROJECT}-{key}" for key in specs.IMAGES}


def test_each_stage_docstring_shows_its_local_and_container_commands():
    """The usage lines open the stage file; the container one names the compose service it runs in."""
    from stages.common.containers import service_for

    for spec in specs.STAGES:
        usage = ast.get_docstring(ast.parse((ROOT / "stages" / f"{spec.name}.py").read_text()))
        run = f"python -m stages.{spec.name} --config "
        assert re.search(rf"^    {re.escape(run)}", usage, re.M), f"{spec.name}: no local command"
        container = f"    docker compose run --rm {service_for(spec).name} {run}"
        assert container in usage, f"{spec.name}: no `{container.strip()}...` line"


def test_unknown_stage_names_the_stages():
    with pytest.raises(ValueError, match=r"unknown stage 'mrege'; expected one of prepare, train, merge"):
        specs.spec("mrege")


# --- Code keys --------------------------------------------------------------------------------


def test_code_key_covers_what_a_stage_imports_and_nothing_else():
    evaluate = {p.relative_to(ROOT).as_posix() for p in keys.code_files("stages.evaluate")}
    # evaluate makes the base GGUF with convert's and quantize's functions
    assert {"stages/evaluate.py", "stages/convert.py", "stages/quantize.py", "stages/common/llamacpp.py"} <= evaluate
    train = {p.relative_to(ROOT).as_posix() for p in keys.code_files("stages.train")}
    assert "stages/common/docker_runtime.py" not in train and "stages/common/pipeline.py" not in train
    assert "stages/common/lora_math.py" not in train  # the merge's arithmetic


def test_code_key_changes_with_an_imported_helper_only(tmp_path, monkeypatch):
    """In a copy of stages/: editing convert.py changes evaluate's code key; editing the Docker
    runtime changes no stage's key."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(keys, "REPO_ROOT", tmp_path)

    def digests() -> dict[str, str]:
        keys.code_files.cache_clear()
        return {s.name: keys.digest(keys.code_digest(s.module)) for s in specs.STAGES}

    before = digests()
    with (tmp_path / "stages" / "common" / "docker_runtime.py").open("a") as fh:
        fh.write("\n# an edit\n")
    assert digests() == before
    with (tmp_path / "stages" / "convert.py").open("a") as fh:
        fh.write("\n# an edit\n")
    after = digests()
    keys.code_files.cache_clear()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {names.CONVERT, names.EVALUATE}


# --- Input keys: the content of files outside the run -------------------------------------------

STANDIN = """
import sys
from pathlib import Path
from stages.common.artifacts import stage_output
stage, run_dir = sys.argv[1], Path(sys.argv[5])
with stage_output(run_dir, stage) as out:
    out.path(f"{stage}/out.txt").write_text(stage)
    out.commit(inputs={})
"""


@pytest.fixture
def local_model_run(tmp_path, monkeypatch):
    monkeypatch.setenv(names.ENV_CACHE, str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    cfg = validate_config(
        {
            "run_name": "t",
            "model": {"name_or_path": str(model)},
            "data": {"train_files": [str(data)]},
            "gguf": {"quant_types": ["Q4_K_M"]},
            "report": {"enabled": False},
        }
    )
    run_dir = tmp_path / "runs" / "t"
    graph.run_pipeline(cfg, run_dir, StandInRuntime(STANDIN), announce=lambda _: None)
    return cfg, run_dir, model, data


def _stale(cfg, run_dir) -> dict[str, str]:
    states = {s.name: graph.stage_state(s, cfg, run_dir, StandInRuntime(STANDIN)) for s in specs.enabled(cfg)}
    return {name: st.why for name, st in states.items() if st.state != "up to date"}


def test_editing_the_base_models_config_in_place_makes_train_and_merge_stale(local_model_run):
    cfg, run_dir, model, _ = local_model_run
    assert _stale(cfg, run_dir) == {}
    (model / "config.json").write_text(json.dumps({"hidden_size": 16}))
    stale = _stale(cfg, run_dir)
    assert {names.TRAIN, names.MERGE} <= set(stale) and "inputs" in stale[names.TRAIN]


def test_replacing_a_shard_with_one_of_the_same_size_makes_train_and_merge_stale(local_model_run):
    cfg, run_dir, model, _ = local_model_run
    (model / "model.safetensors").write_bytes(b"\1" * 64)
    assert {names.TRAIN, names.MERGE} <= set(_stale(cfg, run_dir))


def test_editing_a_data_file_makes_train_stale_not_merge(local_model_run):
    cfg, run_dir, _, data = local_model_run
    data.write_text('{"text": "b"}\n')
    stale = _stale(cfg, run_dir)
    assert names.TRAIN in stale and names.MERGE not in stale


def test_file_hashes_are_remembered_by_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 10)
    hashes = keys.FileHashes(tmp_path / "hashes.json")
    first = hashes.sha256(f)
    hashes.save()
    again = keys.FileHashes(tmp_path / "hashes.json")
    again.known[str(f)][3] = "remembered"  # a second read trusts the cache
    assert again.sha256(f) == "remembered"
    f.write_bytes(b"y" * 10)  # same size, new mtime: hashed again
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a second later, whatever the clock's tick
    assert again.sha256(f) != first and again.sha256(f) != "remembered"
