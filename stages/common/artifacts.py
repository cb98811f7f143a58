"""Crash-safe stage outputs and their manifests.

A stage never writes at its final path. It writes into a staging folder beside the run
(``runs/<run>/.tmp-<stage>-<pid>/``), mirroring the final layout. On commit the old manifest is
removed first, every file is fsynced and renamed into place, and the new manifest (sha256 and
size of every output file) is written last, atomically. So at any moment a stage's outputs are
either described by a complete manifest whose hashes match, or they count as missing. A stage
that fails or is killed leaves only its staging folder, which the next run of that stage removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from stages.common import names
from stages.common.errors import StageError
from stages.common.layout import manifest_path

HASH_CHUNK = 8 << 20
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "safetensors",
    "gguf",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe_files(root: Path, rel_to: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root`, keyed by path relative to `rel_to`."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {
        p.relative_to(rel_to).as_posix(): {names.M_SHA256: sha256_file(p), names.M_SIZE: p.stat().st_size}
        for p in paths
    }


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{names.TMP_PREFIX}{path.name}.{os.getpid()}")
    with tmp.open("w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def read_manifest(run_dir: Path, stage: str) -> dict[str, Any] | None:
    path = manifest_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def verify_manifest(run_dir: Path, stage: str, *, deep: bool = True, allow_pruned: bool = False) -> dict[str, Any]:
    """The stage's manifest, after checking every listed file. StageError names the first bad file.

    `deep` re-hashes the files; without it only presence and size are checked (cheap, for status).
    Files pruned after their consumers ran (M_PRUNED) count as present only with `allow_pruned`.
    """
    manifest = read_manifest(run_dir, stage)
    if manifest is None:
        raise StageError(
            f"{stage} output in {run_dir} has no complete manifest ({manifest_path(run_dir, stage)}); "
            f"run the {stage} stage first"
        )
    pruned = set(manifest.get(names.M_PRUNED, []))
    for rel, meta in manifest.get(names.M_OUTPUTS, {}).items():
        path = run_dir / rel
        if rel in pruned:
            if allow_pruned:
                continue
            raise StageError(
                f"{stage} output {path} was removed once the stages that read it had run (the config's keep "
                f"section keeps it); `invoke pipeline` remakes it, or rerun the {stage} stage"
            )
        if not path.is_file():
            raise StageError(f"{stage} output {path} listed in its manifest is missing; rerun the {stage} stage")
        if path.stat().st_size != meta[names.M_SIZE]:
            raise StageError(f"{stage} output {path} has the wrong size (torn write?); rerun the {stage} stage")
        if deep and sha256_file(path) != meta[names.M_SHA256]:
            raise StageError(f"{stage} output {path} does not match its manifest sha256; rerun the {stage} stage")
    return manifest


def prune_outputs(run_dir: Path, stage: str, rels: list[str]) -> int:
    """Remove these outputs of `stage` (its manifest says so first, so a kill between the two leaves
    a file the manifest calls pruned, never a manifest that lists a missing file); returns bytes freed."""
    manifest = read_manifest(run_dir, stage)
    if manifest is None or not rels:
        return 0
    manifest[names.M_PRUNED] = sorted(set(manifest.get(names.M_PRUNED, [])) | set(rels))
    write_json_atomic(manifest_path(run_dir, stage), manifest)
    freed = 0
    for rel in rels:
        path = run_dir / rel
        if path.is_file():
            freed += path.stat().st_size
            path.unlink()
    return freed


def remove_leftovers(run_dir: Path, stage: str) -> None:
    """Delete staging folders a killed run of `stage` left behind."""
    for leftover in run_dir.glob(f"{names.TMP_PREFIX}{stage}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def sweep_leftovers(run_dir: Path) -> list[str]:
    """Delete every staging folder (``.tmp-<stage>-<pid>...``) whose process is gone, including those
    of stages that will not rerun because their previous output is intact; returns their names."""
    removed = []
    for leftover in sorted(run_dir.glob(f"{names.TMP_PREFIX}*")) if run_dir.is_dir() else []:
        parts = leftover.name[len(names.TMP_PREFIX) :].split("-")
        pid = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        if pid is not None and pid != os.getpid() and psutil.pid_exists(pid):
            continue  # a stage running now
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        removed.append(leftover.name)
    return removed


class StageOutput:
    """The staging area of one stage run; see the module docstring for the protocol."""

    def __init__(self, run_dir: Path, stage: str, owned: tuple[str, ...]):
        self.run_dir = run_dir
        self.stage = stage
        self.owned = owned  # top-level entries this stage replaces whole (e.g. "adapter")
        self.staging = run_dir / f"{names.TMP_PREFIX}{stage}-{os.getpid()}"
        # The stage's duration is its process's: some stages open their staging area only to commit.
        self.started = psutil.Process().create_time()
        self.started_at = datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds")

    def path(self, final: str | Path) -> Path:
        """Where to write what will end up at `final`: a path in the run folder (a RunLayout path) or
        one relative to it."""
        final = Path(final)
        if final.is_relative_to(self.run_dir):
            final = final.relative_to(self.run_dir)
        target = self.staging / final
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(
        self,
        *,
        inputs: dict[str, Any],
        metrics: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        files = sorted(p for p in self.staging.rglob("*") if p.is_file())
        outputs = {}
        for p in files:
            _fsync_path(p)
            outputs[p.relative_to(self.staging).as_posix()] = {
                names.M_SHA256: sha256_file(p),
                names.M_SIZE: p.stat().st_size,
            }
        manifest = {
            names.M_STAGE: self.stage,
            names.M_STATUS: "complete",
            names.M_STARTED: self.started_at,
            names.M_DURATION: round(time.time() - self.started, 3),
            names.M_INPUTS: inputs,
            names.M_OUTPUTS: outputs,
            names.M_METRICS: metrics or {},
            names.M_VERSIONS: package_versions(),
            **(extra or {}),
        }
        mpath = manifest_path(self.run_dir, self.stage)
        previous = (read_manifest(self.run_dir, self.stage) or {}).get(names.M_OUTPUTS) or {}
        mpath.unlink(missing_ok=True)
        _fsync_path(mpath.parent) if mpath.parent.exists() else None
        # What this stage wrote last time and not now goes (a quant type dropped from the config):
        # a shared folder such as gguf/ must not keep another run's file as if it were current.
        for rel in sorted(set(previous) - set(outputs)):
            (self.run_dir / rel).unlink(missing_ok=True)
        for entry in sorted(self.staging.iterdir()):
            final = self.run_dir / entry.name
            if entry.name in self.owned or entry.is_file():
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)
                os.replace(entry, final)
            else:  # a folder shared with other stages (gguf/): move file by file
                final.mkdir(parents=True, exist_ok=True)
                for p in sorted(entry.rglob("*")):
                    if p.is_file():
                        dest = final / p.relative_to(entry)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(p, dest)
        _fsync_path(self.run_dir)
        write_json_atomic(mpath, manifest)
        shutil.rmtree(self.staging, ignore_errors=True)
        return manifest


@contextmanager
def stage_output(run_dir: Path, stage: str, owned: tuple[str, ...] = ()) -> Iterator[StageOutput]:
    """Staging area for `stage`; removed on any failure, so no partial artifact reaches a final path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(run_dir, stage)
    out = StageOutput(run_dir, stage, owned)
    out.staging.mkdir()
    try:
        yield out
    finally:
        shutil.rmtree(out.staging, ignore_errors=True)


@contextmanager
def new_folder(final: Path) -> Iterator[Path]:
    """A folder written beside `final` (``.tmp-<name>-<pid>``) that becomes `final` in one rename when
    the block succeeds, its files fsynced first; on any failure it is deleted. `final` must not exist."""
    if final.exists():
        raise StageError(f"output folder {final} exists; remove it or choose another folder")
    staging = final.parent / f"{names.TMP_PREFIX}{final.name}-{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        yield staging
        for p in staging.rglob("*"):
            if p.is_file():
                _fsync_path(p)
        staging.rename(final)
        _fsync_path(final.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_free_disk(path: Path, needed_bytes: int, what: str) -> None:
    """Refuse to start when the filesystem holding `path` has less than `needed_bytes` free."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise StageError(
            f"not enough disk for {what}: {free / 2**30:.1f} GiB free at {probe}, "
            f"{needed_bytes / 2**30:.1f} GiB needed; free space or point runs/ elsewhere"
        )


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
