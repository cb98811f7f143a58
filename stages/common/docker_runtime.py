"""The Docker runtime: each stage in its own image, artifacts handed over through mounted volumes.

Containers run the same entry point as the local runtime (``python -m stages.<name>``) with the
repository's ``runs/`` and ``cache/`` (and ``data/`` when present) mounted at the same relative
paths under /work, as the invoking user, with a read-only root filesystem and a tmpfs /tmp; the
merge and gguf stages get no network. Secrets (HF_TOKEN) are passed from the environment at run
time only. Images are built with BuildKit by Debian's docker client (20.10), whose built-in
BuildKit needs no buildx plugin.

    build_image("merge", base="kiln-base:bookworm", torch_index_url="", ca_bundle=Path(...))  # invoke build
    make_base_image()                                                                          # invoke base-image
    DockerRuntime().command("merge", ["--config", "runs/demo/config.yaml"])                    # invoke pipeline
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from stages.common import keys, names, specs
from stages.common.artifacts import sha256_file
from stages.common.errors import StageError
from stages.common.runtime import Runtime
from stages.common.specs import StageSpec

REPO = Path(__file__).resolve().parents[2]
# The client: $KILN_DOCKER, else /usr/bin/docker, else the first on PATH. /usr/bin/docker is Debian's
# docker.io client (20.10: the engine's built-in BuildKit, no buildx plugin needed) or Docker CE's
# (with buildx); a client elsewhere on PATH may lack buildx, and then cannot build the images.
DOCKER = os.environ.get("KILN_DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")
IMAGES = {key: f"{names.PROJECT}-{key}" for key in specs.IMAGES}
# Every image ends with the layers that hold stages/ (COPY, then a bytecode compile); the label says
# how many, so that a stage's runtime identity is the layers below (its dependencies): its own code
# is in its key already (keys.py), and a change to another module must not rebuild it.
SOURCE_LAYERS_LABEL = "org.kiln.source-layers"
# The digest of the stages/ tree an image was built from; a stage refuses an image built from other code.
SOURCE_LABEL = "org.kiln.source"
LOCAL_BASE = "kiln-base:bookworm"
ROOTFS = "kiln-rootfs:bookworm"
WHEELS = Path(names.CACHE_DIR) / "wheels"


def docker(*args: str, capture: bool = False, check: bool = True, timeout: float | None = None):
    return subprocess.run([DOCKER, *args], check=check, text=True, capture_output=capture, timeout=timeout)


def engine_answers() -> bool:
    """Whether an engine answers `docker info` within a few seconds (a stuck socket counts as no)."""
    try:
        return docker("info", capture=True, check=False, timeout=15).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def image_meta(image: str) -> dict | None:
    """`docker image inspect` of `image`, or None when there is no such image."""
    proc = docker("image", "inspect", image, capture=True, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def image_id(image: str) -> str | None:
    meta = image_meta(image)
    return meta["Id"] if meta else None


def dependency_layers(meta: dict) -> list[str]:
    """The image's layers below the ones that hold stages/ (see SOURCE_LAYERS_LABEL)."""
    layers = meta["RootFS"]["Layers"]
    source = int((meta["Config"].get("Labels") or {}).get(SOURCE_LAYERS_LABEL, "0"))
    return layers[: len(layers) - source]


def source_digest() -> str:
    """The stages/ tree as `COPY stages` copies it (.dockerignore leaves out __pycache__)."""
    files = sorted(p for p in (REPO / "stages").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return keys.digest({p.relative_to(REPO).as_posix(): sha256_file(p) for p in files})


def gpu_support() -> bool:
    """Whether `--gpus` can work: the engine knows the nvidia runtime, or the toolkit's hook is installed."""
    proc = docker("info", "--format", "{{json .Runtimes}}", capture=True, check=False)
    runtimes = proc.stdout if proc.returncode == 0 else ""
    return "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook") is not None


class DockerRuntime(Runtime):
    """Each stage in the image that holds its dependencies (StageSpec.image)."""

    name = "docker"

    def available(self) -> bool:
        return engine_answers()

    def describe(self) -> str:
        return f"docker ({DOCKER}; images {', '.join(IMAGES.values())})"

    def identity(self, spec: StageSpec) -> str:
        meta = image_meta(IMAGES[spec.image])
        return keys.digest(dependency_layers(meta)) if meta else "missing"

    def command(self, spec: StageSpec, args: list[str]) -> list[str]:
        key = spec.image
        image = IMAGES[key]
        meta = image_meta(image)
        if meta is None:
            raise StageError(f"image {image} not found; build it with `invoke build --stage {key}`")
        built_from = (meta["Config"].get("Labels") or {}).get(SOURCE_LABEL)
        if built_from != source_digest():
            raise StageError(
                f"image {image} holds other code than stages/ here (built from {str(built_from)[:12]}); "
                f"rebuild it with `invoke build --stage {key}`"
            )
        cwd = Path.cwd()
        for sub in (names.RUNS_DIR, names.CACHE_DIR):
            (cwd / sub).mkdir(exist_ok=True)
            if not os.access(cwd / sub, os.W_OK):
                raise StageError(f"{cwd / sub} is not writable by uid {os.getuid()}; fix its owner or permissions")
        # --init: python is not PID 1, so docker stop and Ctrl-C reach it; --read-only: only the mounts
        # and /tmp are writable (HOME and the caches point there, see the Dockerfiles).
        cmd = [DOCKER, "run", "--rm", "--init", "--user", f"{os.getuid()}:{os.getgid()}"]
        cmd += ["--read-only", "--tmpfs", "/tmp:exec", "--workdir", "/work"]
        for sub in (names.RUNS_DIR, names.CACHE_DIR):
            cmd += ["-v", f"{cwd / sub}:/work/{sub}"]
        if (cwd / "data").is_dir():
            cmd += ["-v", f"{cwd / 'data'}:/work/data:ro"]
        if spec.offline:
            cmd += ["--network", "none", "-e", "HF_HUB_OFFLINE=1"]
        if key == specs.TRAIN_IMAGE:
            cmd += ["--shm-size", "8g"]  # NCCL and DataLoader workers share memory through /dev/shm (64 MB)
            if "HF_TOKEN" in os.environ:
                cmd += ["-e", "HF_TOKEN"]  # by name: the value stays in this process's environment
            gpus = os.environ.get("KILN_GPUS", "all")
            if gpus != "none" and gpu_support():
                cmd += ["--gpus", gpus]
        return [*cmd, image, "python", "-m", spec.module, *args]


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
    cmd += ["--build-arg", f"KILN_SOURCE={source_digest()}"]
    if ca_bundle:
        if not ca_bundle.is_file():
            raise StageError(f"--ca-bundle {ca_bundle} not found; pass the PEM file your proxy's CA is in")
        cmd += ["--secret", f"id=ca,src={ca_bundle}"]  # a BuildKit secret: never in a layer
    cmd.append(str(REPO))
    subprocess.run(cmd, check=True, env=_buildkit_env())
    return image_id(IMAGES[image]) or ""


def _buildkit_env() -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "1"}


# What Debian's own container images (debuerreotype's "slim" variant) set in the rootfs: no docs, man
# pages or translations from later installs, and apt keeps no package files or caches in a layer.
SLIM_FILES = {
    "etc/dpkg/dpkg.cfg.d/kiln-slim": (
        "path-exclude /usr/share/doc/*\n"
        "path-include /usr/share/doc/*/copyright\n"
        "path-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/info/*\n"
        "path-exclude /usr/share/locale/*\n"
        "path-exclude /usr/share/lintian/*\n"
    ),
    "etc/apt/apt.conf.d/kiln-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\n'
        'Dir::Cache::srcpkgcache "";\n'
        'Acquire::Languages "none";\n'
    ),
}
SLIM_GLOBS = ("usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "var/cache/apt/*.bin")


def _slim_rootfs(rootfs: Path, suite: str, mirror: str) -> None:
    """Apply SLIM_FILES, drop what they would have kept out, and add the suite's updates and security."""
    for rel, text in SLIM_FILES.items():
        (rootfs / rel).write_text(text)
    doomed = [path for pattern in SLIM_GLOBS for path in rootfs.glob(pattern)]
    doomed += [doc for doc in rootfs.glob("usr/share/doc/*/*") if doc.name != "copyright"]
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):  # files only: apt needs partial/ and lock
        doomed += [path for path in (rootfs / folder).glob("*") if path.is_file() and path.name != "lock"]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)  # doc folders may be symlinks to one another
    security = mirror.rstrip("/").removesuffix("/debian") + "/debian-security"
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {mirror} {suite} main\ndeb {mirror} {suite}-updates main\ndeb {security} {suite}-security main\n"
    )


def make_base_image(
    tag: str = LOCAL_BASE, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian"
) -> str:
    """A python3 Debian base without any registry: debootstrap, docker import, then python3 + venv.

    The rootfs (ROOTFS) is made once and reused; delete that image to make it again.
    """
    if image_id(ROOTFS) is None:
        if shutil.which("debootstrap") is None:
            raise StageError("debootstrap not found; apt-get install debootstrap")
        with tempfile.TemporaryDirectory() as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", suite, str(rootfs), mirror], check=True)
            _slim_rootfs(rootfs, suite, mirror)
            tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run([DOCKER, "import", "--change", 'CMD ["bash"]', "-", ROOTFS], stdin=tar.stdout, check=True)
            if tar.wait() != 0:
                raise StageError("tar of the debootstrap rootfs failed")
    cmd = [DOCKER, "build", "-f", str(REPO / "images" / "base.Dockerfile"), "--build-arg", f"ROOTFS_IMAGE={ROOTFS}"]
    subprocess.run([*cmd, "-t", tag, str(REPO)], check=True, env=_buildkit_env())
    return tag


def image_report() -> dict[str, dict]:
    """Size and user of every built image (for the README's budget table and the tests)."""
    report = {}
    for key, image in IMAGES.items():
        meta = image_meta(image)
        if meta is None:
            continue
        report[key] = {"image": image, "id": meta["Id"], "size_bytes": meta["Size"], "user": meta["Config"].get("User")}
    return report
