"""Crash-safe stage outputs: staging, commit, manifest verification, leftover recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages.common import names
from stages.common.artifacts import (
    check_free_disk,
    manifest_path,
    read_manifest,
    stage_output,
    verify_manifest,
)
from stages.common.errors import StageError


def test_commit_moves_outputs_and_writes_manifest_last(tmp_path: Path):
    with stage_output(tmp_path, names.TRAIN, owned=(names.ADAPTER_DIR,)) as out:
        out.path("adapter/weights.bin").write_bytes(b"w" * 100)
        out.path("adapter/config.json").write_text("{}")
        assert not (tmp_path / "adapter").exists(), "nothing at the final path before commit"
        manifest = out.commit(inputs={"x": 1}, metrics={"loss": 0.5})
    assert (tmp_path / "adapter/weights.bin").read_bytes() == b"w" * 100
    assert manifest["outputs"]["adapter/weights.bin"]["size"] == 100
    assert verify_manifest(tmp_path, names.TRAIN)["metrics"] == {"loss": 0.5}
    assert not list(tmp_path.glob(names.TMP_PREFIX + "*")), "staging removed"


def test_failure_leaves_nothing_at_final_path(tmp_path: Path):
    with pytest.raises(RuntimeError), stage_output(tmp_path, names.MERGE, owned=(names.MERGED_DIR,)) as out:
        out.path("merged/model.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert not (tmp_path / "merged").exists()
    assert read_manifest(tmp_path, names.MERGE) is None
    assert not list(tmp_path.glob(names.TMP_PREFIX + "*"))


def test_rerun_replaces_owned_dir_whole(tmp_path: Path):
    for payload in (b"first", b"second"):
        with stage_output(tmp_path, names.TRAIN, owned=(names.ADAPTER_DIR,)) as out:
            out.path(f"adapter/{payload.decode()}.bin").write_bytes(payload)
            out.commit(inputs={})
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["second.bin"]


def test_shared_dir_keeps_other_stages_files(tmp_path: Path):
    with stage_output(tmp_path, names.CONVERT) as out:
        out.path("gguf/m.f16.gguf").write_bytes(b"f16")
        out.commit(inputs={})
    with stage_output(tmp_path, names.QUANTIZE) as out:
        out.path("gguf/m.Q4_K_M.gguf").write_bytes(b"q4")
        out.commit(inputs={})
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["m.Q4_K_M.gguf", "m.f16.gguf"]
    verify_manifest(tmp_path, names.CONVERT)
    verify_manifest(tmp_path, names.QUANTIZE)


def test_verify_names_the_tampered_file(tmp_path: Path):
    with stage_output(tmp_path, names.MERGE, owned=(names.MERGED_DIR,)) as out:
        out.path("merged/a.safetensors").write_bytes(b"abc")
        out.commit(inputs={})
    (tmp_path / "merged/a.safetensors").write_bytes(b"abd")
    with pytest.raises(StageError, match=r"merged/a\.safetensors does not match its manifest sha256"):
        verify_manifest(tmp_path, names.MERGE)
    (tmp_path / "merged/a.safetensors").write_bytes(b"ab")
    with pytest.raises(StageError, match="wrong size"):
        verify_manifest(tmp_path, names.MERGE, deep=False)


def test_missing_manifest_is_refused(tmp_path: Path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(StageError, match="no complete manifest"):
        verify_manifest(tmp_path, names.TRAIN)


def test_leftover_staging_of_a_killed_run_is_removed(tmp_path: Path):
    leftover = tmp_path / f"{names.TMP_PREFIX}{names.TRAIN}-99999"
    (leftover / "adapter").mkdir(parents=True)
    with stage_output(tmp_path, names.TRAIN, owned=(names.ADAPTER_DIR,)) as out:
        assert not leftover.exists()
        out.path("adapter/x").write_text("x")
        out.commit(inputs={})


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from stages.common.artifacts import stage_output
    run = Path(sys.argv[1])
    with stage_output(run, "merge", owned=("merged",)) as out:
        for i in range(200):
            with out.path(f"merged/part-{i}.bin").open("wb") as fh:
                fh.write(os.urandom(64 * 1024))
            if i == 5:
                print("writing", flush=True)
        time.sleep(30)
        out.commit(inputs={})
    """
)


def test_sigkill_mid_write_keeps_previous_complete_output(tmp_path: Path):
    with stage_output(tmp_path, names.MERGE, owned=(names.MERGED_DIR,)) as out:
        out.path("merged/old.bin").write_bytes(b"old")
        out.commit(inputs={})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["old.bin"]
    verify_manifest(tmp_path, names.MERGE)
    assert list(tmp_path.glob(names.TMP_PREFIX + "merge-*")), "the killed run's staging is still there"
    with stage_output(tmp_path, names.MERGE, owned=(names.MERGED_DIR,)) as out:
        out.path("merged/new.bin").write_bytes(b"new")
        out.commit(inputs={})
    assert not list(tmp_path.glob(names.TMP_PREFIX + "*")), "the next run removed the leftovers"
    assert json.loads(manifest_path(tmp_path, names.MERGE).read_text())["outputs"].keys() == {"merged/new.bin"}


def test_free_disk_shortfall_names_the_numbers(tmp_path: Path):
    with pytest.raises(StageError, match=r"not enough disk for the test: .* GiB free at .* GiB needed"):
        check_free_disk(tmp_path / "not" / "yet", 1 << 60, "the test")


def test_outputs_dropped_from_a_rerun_are_removed_from_a_shared_dir(tmp_path: Path):
    """quantize made Q4_K_M and Q5_K_M, then only Q4_K_M: Q5_K_M must not stay beside it."""
    run_dir = tmp_path / "run"
    for types in (("Q4_K_M", "Q5_K_M"), ("Q4_K_M",)):
        with stage_output(run_dir, "quantize") as out:
            for t in types:
                out.path(f"gguf/m.{t}.gguf").write_text(t)
            out.commit(inputs={})
    with stage_output(run_dir, "convert") as out:  # another stage's file in the same folder stays
        out.path("gguf/m.f16.gguf").write_text("f16")
        out.commit(inputs={})
    assert sorted(p.name for p in (run_dir / "gguf").iterdir()) == ["m.Q4_K_M.gguf", "m.f16.gguf"]
    assert list(verify_manifest(run_dir, "quantize")[names.M_OUTPUTS]) == ["gguf/m.Q4_K_M.gguf"]


def test_sweep_removes_dead_stages_staging_and_keeps_a_live_ones(tmp_path: Path):
    from stages.common.artifacts import sweep_leftovers

    run_dir = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / f".tmp-merge-{dead.stdout.strip()}").mkdir(parents=True)
    (run_dir / f".tmp-report-{dead.stdout.strip()}-scratch-x1").mkdir()
    live = run_dir / f".tmp-convert-{os.getppid()}"  # a process that is running: this test's parent
    live.mkdir()
    removed = sweep_leftovers(run_dir)
    assert sorted(removed) == sorted(
        [f".tmp-merge-{dead.stdout.strip()}", f".tmp-report-{dead.stdout.strip()}-scratch-x1"]
    )
    assert [p.name for p in run_dir.iterdir()] == [live.name]
