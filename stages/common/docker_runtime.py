"""The Docker runtime: each stage in its own image, artifacts handed over through mounted volumes.

Containers run the same entry point as the local runtime (``python -m stages.<name>``) with the
repository's ``runs/`` and ``cache/`` (and ``data/`` when present) mounted at the same relative
paths under /work, as the invoking user, with a read-only root filesystem and a tmpfs /tmp; the
merge and gguf stages get no network. Secrets (HF_TOKEN) are passed from the environment at run
time only. Images are built with BuildKit by Debian's docker client (20.10), whose built-in
BuildKit needs no buildx plugin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from stages.common import names
from stages.common.errors import StageError
from stages.common.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
# Debian's client speaks BuildKit without buildx; a newer client without the plugin does not.
DOCKER = os.environ.get("KILN_DOCKER", "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")
IMAGES = {"train": "kiln-train", "merge": "kiln-merge", "gguf": "kiln-gguf"}
STAGE_IMAGE = {
    names.PREPARE: "merge",
    names.TRAIN: "train",
    names.MERGE: "merge",
    names.CONVERT: "gguf",
    names.QUANTIZE: "gguf",
    names.SMOKE: "gguf",
    names.EVALUATE: "gguf",
}
OFFLINE = {"merge", "gguf"}  # images whose stages never need the network
LOCAL_BASE = "kiln-base:bookworm"
ROOTFS = "kiln-rootfs:bookworm"
WHEELS = Path(names.CACHE_DIR) / "wheels"


def docker(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], check=check, text=True, capture_output=capture)


def engine_answers() -> bool:
    try:
        return docker("info", capture=True, check=False).returncode == 0
    except FileNotFoundError:
        return False


def image_id(image: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", image, capture=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def has_nvidia_runtime() -> bool:
    proc = docker("info", "--format", "{{json .Runtimes}}", capture=True, check=False)
    return proc.returncode == 0 and "nvidia" in proc.stdout


class DockerRuntime(Runtime):
    """Each stage in the image that holds its dependencies (see STAGE_IMAGE)."""

    name = "docker"

    def available(self) -> bool:
        return engine_answers()

    def describe(self) -> str:
        return f"docker ({DOCKER}; images {', '.join(IMAGES.values())})"

    def identity(self, stage: str) -> str:
        return image_id(IMAGES[STAGE_IMAGE[stage]]) or "missing"

    def command(self, stage: str, args: list[str]) -> list[str]:
        image = IMAGES[STAGE_IMAGE[stage]]
        if image_id(image) is None:
            raise StageError(f"image {image} not found; build it with `invoke build --stage {STAGE_IMAGE[stage]}`")
        cwd = Path.cwd()
        for sub in (names.RUNS_DIR, names.CACHE_DIR):
            (cwd / sub).mkdir(exist_ok=True)
            if not os.access(cwd / sub, os.W_OK):
                raise StageError(f"{cwd / sub} is not writable by uid {os.getuid()}; fix its owner or permissions")
        cmd = [DOCKER, "run", "--rm", "--user", f"{os.getuid()}:{os.getgid()}"]
        cmd += ["--read-only", "--tmpfs", "/tmp:exec", "--workdir", "/work"]
        cmd += [
            "-v",
            f"{cwd / names.RUNS_DIR}:/work/{names.RUNS_DIR}",
            "-v",
            f"{cwd / names.CACHE_DIR}:/work/{names.CACHE_DIR}",
        ]
        if (cwd / "data").is_dir():
            cmd += ["-v", f"{cwd / 'data'}:/work/data:ro"]
        if STAGE_IMAGE[stage] in OFFLINE:
            cmd += ["--network", "none"]
        if stage == names.TRAIN:
            if "HF_TOKEN" in os.environ:
                cmd += ["-e", "HF_TOKEN"]  # the value stays in this process's environment
            if has_nvidia_runtime() and os.environ.get("KILN_GPUS", "all") != "none":
                cmd += ["--gpus", os.environ.get("KILN_GPUS", "all")]
        return [*cmd, image, "python", "-m", f"stages.{stage}", *args]


def build_image(
    image: str,
    *,
    base: str | None = None,
    torch_index_url: str | None = None,
    ca_bundle: Path | None = None,
    jobs: int | None = None,
) -> str:
    """Build one of IMAGES with BuildKit; returns the image ID."""
    if image not in IMAGES:
        raise StageError(f"unknown image {image!r}; expected one of {', '.join(IMAGES)}")
    (REPO / WHEELS).mkdir(parents=True, exist_ok=True)  # bind-mounted by the CPU images, may be empty
    cmd = [DOCKER, "build", "-f", str(REPO / "images" / f"{image}.Dockerfile"), "-t", IMAGES[image]]
    if base:
        cmd += ["--build-arg", f"BASE_IMAGE={base}"]
    if torch_index_url is not None:
        cmd += ["--build-arg", f"TORCH_INDEX_URL={torch_index_url}"]
    if jobs:
        cmd += ["--build-arg", f"JOBS={jobs}"]
    if ca_bundle:
        if not ca_bundle.is_file():
            raise StageError(f"--ca-bundle {ca_bundle} not found; pass the PEM file your proxy's CA is in")
        cmd += ["--secret", f"id=ca,src={ca_bundle}"]  # a BuildKit secret: never in a layer
    cmd.append(str(REPO))
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    subprocess.run(cmd, check=True, env=env)
    return image_id(IMAGES[image]) or ""


def make_base_image(
    tag: str = LOCAL_BASE, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian"
) -> str:
    """A python3 Debian base without any registry: debootstrap, docker import, then python3 + venv."""
    if shutil.which("debootstrap") is None:
        raise StageError("debootstrap not found; apt-get install debootstrap")
    if image_id(ROOTFS) is None:
        with tempfile.TemporaryDirectory() as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", suite, str(rootfs), mirror], check=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run([DOCKER, "import", "-", ROOTFS], stdin=tar.stdout, check=True)
            if tar.wait() != 0:
                raise StageError("tar of the debootstrap rootfs failed")
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    subprocess.run(
        [
            DOCKER,
            "build",
            "-f",
            str(REPO / "images" / "base.Dockerfile"),
            "--build-arg",
            f"ROOTFS_IMAGE={ROOTFS}",
            "-t",
            tag,
            str(REPO),
        ],
        check=True,
        env=env,
    )
    return tag


def image_report() -> dict[str, dict]:
    """Size and user of every built image (for the README's budget table and the tests)."""
    report = {}
    for key, image in IMAGES.items():
        proc = docker("image", "inspect", image, capture=True, check=False)
        if proc.returncode != 0:
            continue
        meta = json.loads(proc.stdout)[0]
        report[key] = {"image": image, "id": meta["Id"], "size_bytes": meta["Size"], "user": meta["Config"].get("User")}
    return report
