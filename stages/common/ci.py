"""What the GitHub workflows run besides the pipeline: the run report, runner disk, release matrix and notes.

    invoke ci-report --run runs/gpu     invoke ci-free-disk
    invoke release-matrix --registry ghcr.io/OWNER
    invoke release-notes --registry ghcr.io/OWNER --tag v1.2.0 [--publish]

Tooling for tasks.py; no stage imports it. The tasks run the commands; this module decides what to
collect and renders what is written, so it runs offline in tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from stages.common import names

# Toolchains preinstalled on GitHub's Ubuntu runners that nothing here uses (about 30 GB together).
RUNNER_BLOAT = (
    "/usr/share/dotnet",
    "/usr/local/lib/android",
    "/opt/ghc",
    "/usr/local/.ghcup",
    "/opt/hostedtoolcache/CodeQL",
    "/usr/local/share/boost",
    "/usr/share/swift",
)
RUN_FILES = (names.SUMMARY_MD, names.SUMMARY_JSON, names.RUN_CONFIG, names.SMOKE_FILE)
RUN_FOLDERS = (names.MANIFESTS_DIR, names.LOGS_DIR, names.EVAL_DIR)


def on_github() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def append_github_file(variable: str, text: str) -> None:
    """Append to the file a GitHub Actions variable names (GITHUB_OUTPUT, GITHUB_STEP_SUMMARY), if set."""
    if os.environ.get(variable):
        with open(os.environ[variable], "a") as fh:
            fh.write(text)


def collect_run(run_dir: Path, dest: Path, images: dict[str, dict[str, Any]] | None) -> str:
    """Copy a run's summary, config, manifests, logs and scores into `dest` (emptied first), with
    images.json when `images` is given; returns the Markdown summary for the workflow page."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for item in RUN_FILES:
        if (run_dir / item).is_file():
            shutil.copy2(run_dir / item, dest / item)
    for folder in RUN_FOLDERS:
        if (run_dir / folder).is_dir():
            shutil.copytree(run_dir / folder, dest / folder)
    summary = (dest / names.SUMMARY_MD).read_text() if (dest / names.SUMMARY_MD).is_file() else ""
    if images is not None:
        (dest / "images.json").write_text(json.dumps(images, indent=2) + "\n")
        rows = "".join(f"| {v['image']} | {v['size_bytes'] / 1e9:.2f} GB | {v['user']} |\n" for v in images.values())
        summary += f"\n## Images\n\n| image | size | user |\n|---|---|---|\n{rows}"
    return summary or f"No {names.SUMMARY_MD} in {run_dir}: the pipeline stopped early; see the logs.\n"


# --- Release ---------------------------------------------------------------------------------------


def registry_refs(registry: str, images: dict[str, str]) -> dict[str, str]:
    """image key -> registry reference, e.g. train -> ghcr.io/owner/kiln-train (registries want lowercase)."""
    return {key: f"{registry.rstrip('/').lower()}/{name}" for key, name in images.items()}


def release_matrix(refs: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The release workflow's build matrix: one row per image with its Dockerfile and reference."""
    return {"include": [{"image": k, "file": f"images/{k}.Dockerfile", "ref": ref} for k, ref in refs.items()]}


def release_notes(refs: dict[str, str], digests: dict[str, str], version: str, commit: str, repo: str) -> str:
    """Markdown notes: each image's tag and digest, and how to verify its attestation."""
    rows = [f"| {key} | `{ref}:{version}` | `{digests[key]}` |" for key, ref in refs.items()]
    verify = [f"gh attestation verify oci://{ref}@{digests[key]} -R {repo}" for key, ref in refs.items()]
    return (
        f"## Images\n\nBuilt from {commit}. Pull by digest to get exactly these bytes:\n\n"
        "| stage image | tag | digest |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Each image carries an SBOM and SLSA provenance (BuildKit attestations, `docker buildx imagetools "
        "inspect REF --format '{{ json .Provenance }}'`) and a signed GitHub build attestation:\n\n"
        "```\n" + "\n".join(verify) + "\n```\n"
    )
