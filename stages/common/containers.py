"""Each stage's container, defined once: the Docker runtime starts it from here, and compose.yaml is
written from here (`invoke compose`; tests/test_docker_runtime.py fails when the file differs).

    service = containers.service_for(specs.spec("merge"))   # the "merge" service: user, mounts, network...
    containers.compose_text()                                # compose.yaml, as `invoke compose` writes it
    containers.parse_limits(["16g", "merge=24g"], ["4"])     # per-stage memory and CPU limits (host settings)

One compose service per image (train, merge, gguf), plus train-cpu (the train service without the GPU
reservation) and prepare (the merge image with network, for Hub downloads); a stage runs in its
service with ``python -m stages.<name> ARGS`` as the command.
What a service gets:

- the invoking user (compose: ``$UID:$GID``), so runs/ stays the user's;
- a read-only root filesystem and a tmpfs /tmp (HOME and the caches point there, see the Dockerfiles);
- ./runs and ./cache read-write and ./data read-only, at the same relative paths under /work, so
  paths in configs and manifests mean the same inside and outside;
- no network unless one of its stages may download (StageSpec.network), then HF_TOKEN by name;
- for the train image: GPUs (all, when the engine has NVIDIA support) and an 8 GiB /dev/shm;
- ``init``: python is not PID 1, so `docker stop` and Ctrl-C reach it and zombies are reaped.

Memory and CPU limits are not here: they describe the host, not the stage, so they come from invoke's
configuration and flags (``invoke pipeline --memory 16g``) and never reach a build key. A memory limit
always turns swap off (memswap_limit == mem_limit): a stage that swaps takes hours, one that is
killed says so at once.

Nothing here imports the Docker SDK: this is the table, docker_runtime.py is what starts containers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from stages.common import names, specs
from stages.common.errors import StageError
from stages.common.specs import StageSpec

WORKDIR = "/work"
IMAGES = {key: f"{names.PROJECT}-{key}" for key in specs.IMAGES}
GPU_IMAGES = (specs.TRAIN_IMAGE,)  # the CUDA wheels are in the train image only
TRAIN_CPU = "train-cpu"  # the train service without the GPU reservation
SHM_SIZE = "8gb"  # NCCL and DataLoader workers share memory through /dev/shm (64 MB by default)
TMPFS = ("/tmp:exec",)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1"}
# Passed by name: compose and the runtime read the value from the caller's environment at run time.
PASSTHROUGH = ("HF_TOKEN",)
# Compose's user: bash sets UID but not GID and exports neither (`export UID GID=$(id -g)`).
COMPOSE_USER = "${UID:-1000}:${GID:-1000}"


@dataclass(frozen=True)
class Mount:
    source: str  # a folder of the project, relative to its root
    read_only: bool = False

    @property
    def target(self) -> str:
        return f"{WORKDIR}/{self.source}"


MOUNTS = (Mount(names.RUNS_DIR), Mount(names.CACHE_DIR), Mount(names.DATA_DIR, read_only=True))


@dataclass(frozen=True)
class Service:
    """One image's container settings, shared by every stage that runs in that image."""

    name: str
    image: str  # a key of IMAGES
    stages: tuple[str, ...]
    network: bool
    gpus: bool  # reserve GPUs (compose: deploy.resources.reservations; the runtime: a DeviceRequest)
    shm_size: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    passthrough: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = MOUNTS
    tmpfs: tuple[str, ...] = TMPFS
    read_only: bool = True
    init: bool = True
    workdir: str = WORKDIR

    @property
    def image_name(self) -> str:
        return IMAGES[self.image]

    def entrypoint(self, spec: StageSpec) -> list[str]:
        return ["python", "-m", spec.module]


def _service(image: str, name: str | None = None, gpus: bool | None = None, network: bool | None = None) -> Service:
    """The service of `image`'s stages that agree on network access (`network`; None: all of them)."""
    stages = [s for s in specs.STAGES if s.image == image and network in (None, s.network)]
    if len({s.network for s in stages}) != 1:
        # A stage that needs other settings than its image-mates needs its own service (a row in
        # SERVICES below), or the others would get its network too.
        mixed = ", ".join(f"{s.name} (network={s.network})" for s in stages)
        raise StageError(f"the stages of image {image} disagree on network access: {mixed}; give one its own service")
    online = stages[0].network
    return Service(
        name=name or image,
        image=image,
        stages=tuple(s.name for s in stages),
        network=online,
        gpus=image in GPU_IMAGES if gpus is None else gpus,
        shm_size=SHM_SIZE if image in GPU_IMAGES else None,
        env={} if online else dict(OFFLINE_ENV),
        passthrough=PASSTHROUGH if online else (),
    )


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        _service(specs.TRAIN_IMAGE),
        _service(specs.TRAIN_IMAGE, name=TRAIN_CPU, gpus=False),
        # prepare fetches Hub models and datasets; merge, in the same image, stays offline.
        _service(specs.MERGE_IMAGE, name=names.PREPARE, network=True),
        _service(specs.MERGE_IMAGE, network=False),
        _service(specs.GGUF_IMAGE),
    )
}


def service_for(spec: StageSpec) -> Service:
    """The service a stage runs in (the runtime drops the GPUs where the engine has none)."""
    return next(s for s in SERVICES.values() if spec.name in s.stages and s.name != TRAIN_CPU)


# --- Limits: host settings, per stage --------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'16g' -> bytes, in Docker's units (k, m, g, t are powers of 1024; 'gb' and 'gib' are accepted)."""
    match = _SIZE.match(str(text))
    if not match:
        raise StageError(f"memory limit {text!r} is not a size; expected a number with k, m, g or t, e.g. 16g")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes; swap off (memswap_limit == mem_limit)
    cpus: float | None = None

    def describe(self) -> str:
        parts = []
        if self.memory:
            parts.append(f"memory {human_bytes(self.memory)}, swap off")
        if self.cpus:
            parts.append(f"{self.cpus:g} CPUs")
        return "; ".join(parts) or "no limits"


def _per_stage(values: list[str] | str | None, what: str) -> dict[str, str]:
    """['16g', 'merge=24g'] -> {'*': '16g', 'merge': '24g'}; a later value beats an earlier one."""
    if values is None:
        return {}
    found: dict[str, str] = {}
    for raw in [values] if isinstance(values, str) else values:
        stage, sep, value = str(raw).rpartition("=")
        if sep:
            try:
                stage = specs.spec(stage.strip()).name
            except ValueError as exc:
                raise StageError(f"--{what} {raw}: {exc}") from None
        found[stage or "*"] = value.strip()
    return found


def parse_limits(memory: list[str] | str | None = None, cpus: list[str] | str | None = None) -> dict[str, Limits]:
    """Each stage's Limits from values such as '16g' (every stage) and 'merge=24g' (one stage)."""
    mem, cpu = _per_stage(memory, "memory"), _per_stage(cpus, "cpus")
    limits = {}
    for spec in specs.STAGES:
        m, c = mem.get(spec.name, mem.get("*")), cpu.get(spec.name, cpu.get("*"))
        try:
            cpus_value = float(c) if c else None
        except ValueError:
            raise StageError(f"--cpus {c!r} is not a number of CPUs, e.g. 4 or 1.5") from None
        if cpus_value is not None and cpus_value <= 0:
            raise StageError(f"--cpus {c!r} must be above 0")
        limits[spec.name] = Limits(parse_size(m) if m else None, cpus_value)
    return limits


# --- compose.yaml --------------------------------------------------------------------------------

# Build arguments as compose passes them: (the variable compose reads, its default, the images that
# declare the ARG). `invoke build` passes the same arguments with values from invoke's configuration.
BUILD_ARGS = {
    "BASE_IMAGE": ("KILN_BASE_IMAGE", "python:3.11-slim-bookworm", specs.IMAGES),
    "TORCH_INDEX_URL": ("KILN_TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu", ("merge", "gguf")),
    "KILN_SOURCE": ("KILN_SOURCE", "unknown", specs.IMAGES),
}
CA_SECRET = "ca"
NO_EXTRA_CA = "images/no-extra-ca.pem"  # empty: the Dockerfiles add a CA only from a non-empty secret

COMPOSE_HEADER = """\
# GENERATED by `invoke compose` from stages/common/containers.py: edit that file, then run
# `invoke compose`; tests/test_docker_runtime.py fails when this file and the runtime differ.
#
# kiln's stage images as services, with the settings `invoke pipeline --runtime docker` gives each
# stage's container: the invoking user, a read-only root and a tmpfs /tmp, ./runs and ./cache
# read-write and ./data read-only under /work, no network for merge and gguf, GPUs for train.
# docs/containers.md says more.
#
# Build (hosts with BuildKit through buildx; elsewhere `invoke build`, see docs/containers.md):
#   mkdir -p runs cache/wheels data && invoke build --compose     # or: docker compose build
# Run one stage (containers write as UID:GID; bash sets UID but not GID and exports neither):
#   export UID GID=$(id -g)
#   docker compose run --rm train     python -m stages.train --config runs/demo/config.yaml
#   docker compose run --rm train-cpu python -m stages.train --config runs/demo/config.yaml
#   docker compose run --rm merge     python -m stages.merge --config runs/demo/config.yaml
#   docker compose run --rm gguf      python -m stages.convert --config runs/demo/config.yaml
#
# Build variables: KILN_BASE_IMAGE, KILN_TORCH_INDEX_URL ('' = PyPI only), KILN_CA_BUNDLE (a PEM file
# for TLS-intercepting proxies, passed as a BuildKit secret), KILN_SOURCE (set by `invoke build
# --compose`; images without it are refused by `invoke pipeline`, which runs only current code).
"""


def _compose_build(image: str) -> dict:
    args = {
        arg: f"${{{var}-{default}}}" if arg == "TORCH_INDEX_URL" else f"${{{var}:-{default}}}"
        for arg, (var, default, images) in BUILD_ARGS.items()
        if image in images
    }  # TORCH_INDEX_URL: `-`, not `:-`, so that an empty value (PyPI only) stays empty
    return {"context": ".", "dockerfile": f"images/{image}.Dockerfile", "args": args, "secrets": [CA_SECRET]}


def compose_service(service: Service, build: bool) -> dict:
    svc: dict = {"image": service.image_name}
    if build:
        svc["build"] = _compose_build(service.image)
    svc |= {
        "user": COMPOSE_USER,
        "working_dir": service.workdir,
        "init": service.init,
        "read_only": service.read_only,
        "tmpfs": list(service.tmpfs),
        "volumes": [f"./{m.source}:{m.target}" + (":ro" if m.read_only else "") for m in service.mounts],
    }
    if not service.network:
        svc["network_mode"] = "none"
    if service.env or service.passthrough:
        svc["environment"] = [*(f"{k}={v}" for k, v in service.env.items()), *service.passthrough]
    if service.shm_size:
        svc["shm_size"] = service.shm_size
    if service.gpus:
        gpu = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
        svc["deploy"] = {"resources": {"reservations": {"devices": [gpu]}}}
    return svc


def compose_dict() -> dict:
    built: set[str] = set()
    services = {}
    for name, service in SERVICES.items():
        # One `build:` per image: compose builds every service that has one, even for the same tag.
        services[name] = compose_service(service, build=service.image not in built)
        built.add(service.image)
    secrets = {CA_SECRET: {"file": f"${{KILN_CA_BUNDLE:-./{NO_EXTRA_CA}}}"}}
    return {"name": names.PROJECT, "services": services, "secrets": secrets}


def compose_text() -> str:
    body = yaml.safe_dump(compose_dict(), sort_keys=False, default_flow_style=False, width=120)
    return COMPOSE_HEADER + "\n" + body
