"""The Docker runtime: each stage in its own container, started through the Docker SDK for Python.

    rt = DockerRuntime(limits=containers.parse_limits("16g"))   # invoke pipeline --runtime docker --memory 16g
    rt.run_stage(specs.spec("merge"), ["--config", "runs/demo/config.yaml", "--run-dir", "runs/demo"], log)

A stage's container has its service's settings (containers.py, the one definition that compose.yaml
is written from), runs ``python -m stages.<name> ARGS`` in /work, streams its output live into the
console and the stage log with the stage's name in front, and is removed when the stage ends, however
it ends:

- Ctrl-C or SIGTERM to the orchestrator: the container gets SIGTERM, STOP_GRACE_S seconds to exit,
  then SIGKILL, and is removed before the orchestrator exits. What the stage had written stays in its
  staging folder, which the next run sweeps (artifacts.py): nothing partial lands.
- Killed by its memory limit: one line with the stage, the limit and the flag that changes it.
- The engine stops answering: one line, naming the container that may still run.
- An orchestrator killed outright (SIGKILL) leaves its container; the next run of that run removes it.

The engine is whichever DOCKER_HOST (or the default socket) names. Image builds are not here:
the SDK's builder has no BuildKit secrets, so docker_build.py drives the docker CLI for them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from math import ceil
from pathlib import Path
from typing import Any

import docker
import requests
import urllib3
from docker.errors import APIError, DockerException, NotFound
from docker.types import DeviceRequest, Mount

from stages.common import containers, keys, names
from stages.common.artifacts import sha256_file
from stages.common.containers import IMAGES, Limits, human_bytes
from stages.common.errors import StageError
from stages.common.runtime import Runtime
from stages.common.specs import StageSpec

REPO = Path(__file__).resolve().parents[2]
# Every image ends with the layers that hold stages/ (COPY, then a bytecode compile); the label says
# how many, so that a stage's runtime identity is the layers below (its dependencies): its own code
# is in its key already (keys.py), and a change to another module must not rebuild it.
SOURCE_LAYERS_LABEL = "org.kiln.source-layers"
# The digest of the stages/ tree an image was built from; a stage refuses an image built from other code.
SOURCE_LABEL = "org.kiln.source"
# What the runtime labels its containers with: which stage of which run (the run folder's absolute path).
STAGE_LABEL, RUN_LABEL = "org.kiln.stage", "org.kiln.run"
STOP_GRACE_S = 5  # SIGTERM, then SIGKILL: within the 10 s a user waits after Ctrl-C
API_TIMEOUT_S = 60  # per engine call; the log stream and the wait have none
# How a lost engine shows: requests' errors for calls, the socket's or urllib3's in a stream being read.
ENGINE_GONE = (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a stage's container ran; its container is gone when this propagates."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signame = signal.Signals(signum).name


def connect(timeout: float = API_TIMEOUT_S) -> docker.DockerClient:
    """A client of the engine DOCKER_HOST names (else the default socket); StageError when none answers."""
    try:
        return docker.from_env(timeout=timeout)
    except DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "the default socket")
        raise StageError(
            f"no Docker engine answers at {where} ({_reason(exc)}); start one (`bash .ci/start-docker.sh` on "
            "Debian), or run with --runtime local"
        ) from None


def engine_answers(timeout: float = 10) -> bool:
    """Whether an engine answers a ping within `timeout` seconds (a stuck socket counts as no)."""
    try:
        return bool(connect(timeout).ping())
    except (StageError, DockerException, *ENGINE_GONE):
        return False


def _reason(exc: BaseException) -> str:
    """The root cause of an SDK or requests error, in a few words: requests wraps urllib3, which wraps the
    socket's error (e.g. "No such file or directory" for a socket that is gone, "Connection refused")."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        inner = [a for a in exc.args if isinstance(a, BaseException)]
        exc = inner[0] if inner else exc.__cause__
    root = seen[-1]
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    text = str(root).strip().splitlines()[-1] if str(root).strip() else type(root).__name__
    return re.sub(r"\s+", " ", text)[:200]


def image_meta(image: str, client: docker.DockerClient | None = None) -> dict | None:
    """The engine's inspection of `image`, or None when there is no such image."""
    try:
        return (client or connect()).api.inspect_image(image)
    except NotFound:
        return None


def dependency_layers(meta: dict) -> list[str]:
    """The image's layers below the ones that hold stages/ (see SOURCE_LAYERS_LABEL)."""
    layers = meta["RootFS"]["Layers"]
    source = int((meta["Config"].get("Labels") or {}).get(SOURCE_LAYERS_LABEL, "0"))
    return layers[: len(layers) - source]


def source_digest() -> str:
    """The stages/ tree as `COPY stages` copies it (.dockerignore leaves out __pycache__)."""
    files = sorted(p for p in (REPO / "stages").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return keys.digest({p.relative_to(REPO).as_posix(): sha256_file(p) for p in files})


def image_report() -> dict[str, dict]:
    """Size and user of every built image (for the README's budget table and the tests)."""
    client = connect()
    report = {}
    for key, image in IMAGES.items():
        meta = image_meta(image, client)
        if meta is not None:
            report[key] = {"image": image, "id": meta["Id"], "size_bytes": meta["Size"], "user": meta["Config"]["User"]}
    return report


@contextmanager
def _signals(handler) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` inside the block (only the main thread can take signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _docker_size(n: int) -> str:
    """Bytes as a --memory value, rounded up: 1g, 768m."""
    return f"{ceil(n / (1 << 30))}g" if n >= 1 << 30 else f"{ceil(n / (1 << 20))}m"


class DockerRuntime(Runtime):
    """Each stage in the image that holds its dependencies (StageSpec.image), as its service says."""

    name = "docker"

    def __init__(
        self,
        limits: dict[str, Limits] | None = None,
        gpus: str = "all",
        user: str | None = None,
        images: dict[str, str] | None = None,
    ):
        """limits: per stage (containers.parse_limits); gpus: 'all', 'none' or device ids '0,1' for the
        services that reserve GPUs; user: 'UID:GID' (default: the invoking user); images: image key ->
        name, for images under other names (default: containers.IMAGES)."""
        self.limits = limits or {}
        self.gpus = str(gpus)
        self.user = user or f"{os.getuid()}:{os.getgid()}"
        self.images = {**IMAGES, **(images or {})}
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = connect()
        return self._client

    def available(self) -> bool:
        return engine_answers()

    def describe(self) -> str:
        try:
            engine = "engine " + self.client.version().get("Version", "?")
        except (StageError, DockerException, *ENGINE_GONE) as exc:
            where = os.environ.get("DOCKER_HOST", "the default socket")
            return f"docker: no engine answers at {where} ({_reason(exc.__context__ or exc)})"
        shown = {stage: limits.describe() for stage, limits in self.limits.items()}
        common = max(set(shown.values()), key=list(shown.values()).count) if shown else Limits().describe()
        extra = "".join(f"; {stage}: {text}" for stage, text in shown.items() if text != common)
        return f"docker ({engine}; {common}{extra})"

    def identity(self, spec: StageSpec) -> str:
        """The image's dependency layers: limits, GPUs and the user are host settings, not in any key."""
        meta = image_meta(self.images[spec.image], self.client)
        return keys.digest(dependency_layers(meta)) if meta else "missing"

    def command(self, spec: StageSpec, args: list[str]) -> list[str]:
        """The container's command: the same entry point as the local runtime's."""
        return [*containers.service_for(spec).entrypoint(spec), *args]

    def gpu_support(self) -> bool:
        """Whether a GPU request can work: the engine knows the nvidia runtime, or the toolkit's hook is installed."""
        runtimes = self.client.info().get("Runtimes") or {}
        return "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook") is not None

    # --- One stage's container -------------------------------------------------------------------

    def container_config(self, spec: StageSpec, args: list[str], run: Path, *, gpus: bool) -> dict[str, Any]:
        """The arguments of `containers.create` for `spec`: its service's settings, this host's limits."""
        service = containers.service_for(spec)
        root = Path.cwd()
        limits = self.limits.get(spec.name, Limits())
        env = {**service.env, **{k: os.environ[k] for k in service.passthrough if k in os.environ}}
        config: dict[str, Any] = {
            "image": self.images[service.image],
            "command": self.command(spec, args),
            "name": re.sub(r"[^A-Za-z0-9_.-]", "-", f"{names.PROJECT}-{run.name}-{spec.name}-{uuid.uuid4().hex[:8]}"),
            "labels": {STAGE_LABEL: spec.name, RUN_LABEL: str(run)},
            "user": self.user,
            "working_dir": service.workdir,
            "init": service.init,
            "read_only": service.read_only,
            "tmpfs": list(service.tmpfs),
            "mounts": [
                Mount(m.target, str(root / m.source), type="bind", read_only=m.read_only) for m in service.mounts
            ],
            "environment": env,
            "detach": True,
        }
        if not service.network:
            config["network_mode"] = "none"
        if service.shm_size:
            config["shm_size"] = service.shm_size
        if gpus:
            ids = {} if self.gpus == "all" else {"device_ids": self.gpus.split(",")}
            count = {"count": -1} if self.gpus == "all" else {}
            config["device_requests"] = [DeviceRequest(driver="nvidia", capabilities=[["gpu"]], **count, **ids)]
        if limits.memory:
            config["mem_limit"] = config["memswap_limit"] = limits.memory  # equal: no swap
        if limits.cpus:
            config["nano_cpus"] = int(limits.cpus * 1e9)
        return config

    def run_stage(self, spec: StageSpec, args: list[str], log_path: Path) -> int:
        service = containers.service_for(spec)
        self._check_image(service.image)
        self._check_mount_sources(service)
        run = log_path.resolve().parents[1]  # layout.log_path: <run>/logs/<stage>.log
        self.remove_leftovers(run)
        gpus = service.gpus and self.gpus != "none" and self.gpu_support()
        config = self.container_config(spec, args, run, gpus=gpus)
        limits = self.limits.get(spec.name, Limits())
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log, _signals(_raise_interrupted):
            where = f"[{config['name']} {config['image']}; {limits.describe()}]"
            log.write(f"$ {where} " + " ".join(config["command"]) + "\n")
            log.flush()
            done = removed = False
            try:
                container = self.client.containers.create(**config)
                container.start()
                self._stream(container, f"{spec.name} | ", log)
                status = container.wait()["StatusCode"]
                done = True
                if self.client.api.inspect_container(container.id)["State"].get("OOMKilled"):
                    raise StageError(self._oom_message(spec, limits, status))
                return status
            except Interrupted as exc:
                took, removed = self._remove(config["name"], stop=True), True
                line = f"✗ {spec.name}: interrupted by {exc.signame}; container {config['name']} "
                line += f"stopped and removed in {took:.1f} s" if took is not None else "could not be removed"
                self._emit(line + "; the next run starts the stage afresh", "", log)
                raise
            except ENGINE_GONE as exc:
                raise StageError(
                    f"the Docker engine stopped answering while stage {spec.name} ran ({_reason(exc)}); its "
                    f"container {config['name']} may still be running: the next `invoke pipeline` removes it "
                    "once the engine is back"
                ) from None
            except APIError as exc:
                why = exc.explanation
                raise StageError(f"the Docker engine refused stage {spec.name}'s container: {why}") from None
            finally:
                if not removed:
                    self._remove(config["name"], stop=not done)

    def _check_image(self, key: str) -> None:
        image = self.images[key]
        meta = image_meta(image, self.client)
        if meta is None:
            raise StageError(f"image {image} not found; build it with `invoke build --stage {key}`")
        built_from = (meta["Config"].get("Labels") or {}).get(SOURCE_LABEL)
        if built_from != source_digest():
            raise StageError(
                f"image {image} holds other code than stages/ here (built from {str(built_from)[:12]}); "
                f"rebuild it with `invoke build --stage {key}`"
            )

    def _check_mount_sources(self, service: containers.Service) -> None:
        """Mount sources exist (the engine would create them as root) and the writable ones are writable."""
        for mount in service.mounts:
            path = Path.cwd() / mount.source
            path.mkdir(exist_ok=True)
            if not mount.read_only and not os.access(path, os.W_OK):
                raise StageError(f"{path} is not writable by uid {os.getuid()}; fix its owner or permissions")

    def remove_leftovers(self, run: Path) -> None:
        """Containers of this run left by an orchestrator that was killed outright: still writing, so removed."""
        for old in self.client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run}"}):
            old.remove(force=True)
            print(f"removed container {old.name}, left running by an earlier run of {run.name}")

    def _remove(self, name: str, *, stop: bool) -> float | None:
        """Stop (SIGTERM, STOP_GRACE_S, SIGKILL) and remove container `name`; the seconds it took, or None
        when the engine did not answer. A second Ctrl-C does not cut this short."""
        t0 = time.monotonic()
        with _signals(signal.SIG_IGN):
            try:
                container = self.client.containers.get(name)
                if stop:
                    container.stop(timeout=STOP_GRACE_S)
                container.remove(force=True)
            except NotFound:
                pass
            except (DockerException, *ENGINE_GONE):
                return None
        return time.monotonic() - t0

    @staticmethod
    def _emit(text: str, prefix: str, log) -> None:
        line = f"{prefix}{text}\n"
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()

    def _stream(self, container, prefix: str, log) -> None:
        """The container's stdout and stderr, as they come, line by line with `prefix`."""
        pending = b""
        try:
            for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._emit(line.decode("utf-8", "replace").rstrip("\r"), prefix, log)
        finally:  # an unfinished last line, also when interrupted
            if pending:
                self._emit(pending.decode("utf-8", "replace").rstrip("\r"), prefix, log)

    @staticmethod
    def _oom_message(spec: StageSpec, limits: Limits, status: int) -> str:
        if limits.memory:
            more = _docker_size(2 * limits.memory)
            return (
                f"stage {spec.name} ran out of memory: the kernel killed its container at its "
                f"{human_bytes(limits.memory)} limit (swap off; exit {status}); give it more with "
                f"`invoke pipeline --memory {spec.name}={more}` (or kiln.docker.memory in invoke.yaml), "
                "or make the stage need less (a smaller batch, a smaller model)"
            )
        return (
            f"stage {spec.name} ran out of memory: the kernel killed its container (exit {status}) with no "
            "container limit set, so the host itself ran out; free memory, or make the stage need less"
        )
