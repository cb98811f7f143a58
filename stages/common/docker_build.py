"""Building the stage images, the one thing that goes through the docker CLI and not the SDK.

    build_image("merge", client="/usr/bin/docker", base="kiln-base:bookworm")  # invoke build
    compose_build(["merge"], client="docker")                                   # invoke build --compose
    make_base_image(client="/usr/bin/docker")                                   # invoke base-image

Why the CLI: the Dockerfiles need BuildKit (`RUN --mount=type=cache|secret|bind`) and the CA bundle of
a TLS-intercepting proxy goes in as a BuildKit secret, never into a layer. The SDK's builder is the
engine's classic /build endpoint: no BuildKit session, so no secrets and no `RUN --mount`.

Which client builds (invoke's kiln.docker.client, `--client`): Docker CE's `docker` with the buildx
plugin, or Debian's docker.io client (20.10, /usr/bin/docker), which drives the engine's built-in
BuildKit without a plugin. A newer client without buildx fails ("buildx component is missing");
docs/containers.md says which host needs which. `docker compose build` needs buildx too: without it,
Compose falls back to the classic builder and fails at the first `RUN --mount`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from stages.common import names
from stages.common.containers import BUILD_ARGS, IMAGES, SERVICES
from stages.common.docker_runtime import image_meta, source_digest
from stages.common.errors import StageError

REPO = Path(__file__).resolve().parents[2]
LOCAL_BASE = "kiln-base:bookworm"
ROOTFS = "kiln-rootfs:bookworm"
WHEELS = Path(names.CACHE_DIR) / "wheels"  # bind-mounted by the CPU images: local torch wheels, may be empty


def build_args(image: str, *, base: str | None, torch_index_url: str | None, jobs: int | None = None) -> dict:
    """The build arguments `image`'s Dockerfile declares, with these values (None: the Dockerfile's default)."""
    values = {"BASE_IMAGE": base, "TORCH_INDEX_URL": torch_index_url, "KILN_SOURCE": source_digest()}
    args = {k: v for k, v in values.items() if v is not None and image in BUILD_ARGS[k][2]}
    if jobs and image == "gguf":
        args["JOBS"] = str(jobs)
    return args


def _run(cmd: list[str], what: str, **kwargs) -> None:
    try:
        subprocess.run(cmd, check=True, **kwargs)
    except FileNotFoundError:
        raise StageError(f"docker client {cmd[0]!r} not found; pass --client with the path of one") from None
    except subprocess.CalledProcessError as exc:
        raise StageError(
            f"{what} failed (exit {exc.returncode}); its output is above. A client without the buildx plugin "
            "fails with 'buildx component is missing': install buildx, or pass --client /usr/bin/docker "
            "(Debian's docker.io 20.10, built-in BuildKit)"
        ) from None


def _check_ca(ca_bundle: Path | None) -> None:
    if ca_bundle and not ca_bundle.is_file():
        raise StageError(f"--ca-bundle {ca_bundle} not found; pass the PEM file your proxy's CA is in")


def build_command(
    image: str,
    *,
    client: str = "docker",
    base: str | None = None,
    torch_index_url: str | None = None,
    ca_bundle: Path | None = None,
    jobs: int | None = None,
) -> list[str]:
    """The `docker build` command line that builds one of IMAGES (run with DOCKER_BUILDKIT=1)."""
    if image not in IMAGES:
        raise StageError(f"unknown image {image!r}; expected one of {', '.join(IMAGES)}")
    _check_ca(ca_bundle)
    cmd = [client, "build", "-f", str(REPO / "images" / f"{image}.Dockerfile"), "-t", IMAGES[image]]
    for arg, value in build_args(image, base=base, torch_index_url=torch_index_url, jobs=jobs).items():
        cmd += ["--build-arg", f"{arg}={value}"]
    if ca_bundle:
        cmd += ["--secret", f"id=ca,src={ca_bundle}"]  # a BuildKit secret: never in a layer
    return [*cmd, str(REPO)]


def build_image(image: str, **options) -> str:
    """Build one of IMAGES with BuildKit (options: as build_command's); returns the image ID."""
    cmd = build_command(image, **options)
    (REPO / WHEELS).mkdir(parents=True, exist_ok=True)
    _run(cmd, f"`{cmd[0]} build` of {IMAGES[image]}", env={**os.environ, "DOCKER_BUILDKIT": "1"})
    meta = image_meta(IMAGES[image])
    return meta["Id"] if meta else ""


def compose_build(
    images: list[str],
    *,
    client: str = "docker",
    base: str | None = None,
    torch_index_url: str | None = None,
    ca_bundle: Path | None = None,
) -> None:
    """`docker compose build` of the services that build `images`, with the variables compose.yaml reads."""
    _check_ca(ca_bundle)
    (REPO / WHEELS).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KILN_SOURCE": source_digest()}
    for arg, value in (("BASE_IMAGE", base), ("TORCH_INDEX_URL", torch_index_url)):
        if value is not None:
            env[BUILD_ARGS[arg][0]] = value
    if ca_bundle:
        env["KILN_CA_BUNDLE"] = str(ca_bundle.resolve())
    services = [s.name for s in SERVICES.values() if s.image in images and s.name == s.image]
    _run([client, "compose", "build", *services], f"`{client} compose build`", env=env, cwd=REPO)


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
    tag: str = LOCAL_BASE,
    *,
    client: str = "docker",
    suite: str = "bookworm",
    mirror: str = "http://deb.debian.org/debian",
) -> str:
    """A python3 Debian base without any registry: debootstrap, `docker import`, then python3 + venv.

    The rootfs (ROOTFS) is made once and reused; delete that image to make it again.
    """
    if image_meta(ROOTFS) is None:
        if shutil.which("debootstrap") is None:
            raise StageError("debootstrap not found; apt-get install debootstrap")
        with tempfile.TemporaryDirectory() as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", suite, str(rootfs), mirror], check=True)
            _slim_rootfs(rootfs, suite, mirror)
            tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            _run([client, "import", "--change", 'CMD ["bash"]', "-", ROOTFS], f"`{client} import`", stdin=tar.stdout)
            if tar.wait() != 0:
                raise StageError("tar of the debootstrap rootfs failed")
    cmd = [client, "build", "-f", str(REPO / "images" / "base.Dockerfile"), "--build-arg", f"ROOTFS_IMAGE={ROOTFS}"]
    _run([*cmd, "-t", tag, str(REPO)], f"`{client} build` of {tag}", env={**os.environ, "DOCKER_BUILDKIT": "1"})
    return tag
