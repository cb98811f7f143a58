"""Crash safety of the real stages: each is SIGKILLed at several moments of a rerun over a complete
previous output, and the run must hold either that previous output, intact, or no output for the
stage (no manifest: consumers refuse it by name); the next `invoke pipeline` must then recover by
itself (leftover staging removed, the stage run again, its output verified).

Moments: fractions of the stage's own measured duration, from process start, so that the kills
land in loading, computing and committing alike.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import distinct_rows, repeat_rows, stage_cmd, tiny_pipeline

from stages.common import names
from stages.common import pipeline as graph
from stages.common.artifacts import read_manifest, verify_manifest
from stages.common.errors import StageError
from stages.common.runtime import LocalRuntime

pytestmark = pytest.mark.e2e

STAGES = (names.TRAIN, names.MERGE, names.CONVERT, names.QUANTIZE, names.REPORT)
FRACTIONS = (0.25, 0.6, 0.9)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_mistral, llama_cpp_built):
    cfg, run_dir, results = tiny_pipeline(
        tmp_path_factory.mktemp("kill"),
        "k",
        tiny_mistral,
        repeat_rows(32, seed=5),
        distinct_rows(12, seed=6),  # held out: none of them is a training row
        training={"device": "cpu", "max_steps": 6, "batch_size": 4, "logging_steps": 1, "save_steps": 3},
        gguf={"quant_types": ["Q8_0", "Q4_K_M"]},
        report={"ctx": 32, "max_kl": {"Q8_0": 10.0, "Q4_K_M": 10.0}},
        smoke={"prompts": ["a"], "max_tokens": 2},  # fails (no EOS learnt); not under test
    )
    statuses = {r.stage: r.status for r in results}
    assert all(statuses[s] == "ran" for s in STAGES), statuses
    return cfg, run_dir


def outcome(run_dir: Path, stage: str, previous: dict) -> str:
    """'previous' (the old output, intact) or 'none' (no manifest, refused by name); else fail."""
    manifest = read_manifest(run_dir, stage)
    if manifest is None:
        with pytest.raises(StageError, match=stage):
            verify_manifest(run_dir, stage)
        return "none"
    verify_manifest(run_dir, stage, deep=True)  # every listed file there, with its sha256
    if manifest[names.M_OUTPUTS] == previous[names.M_OUTPUTS]:
        return "previous"
    return "new"  # the rerun finished before the kill: also complete and verified


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_leaves_a_complete_output_or_none_and_the_pipeline_recovers(run, stage):
    cfg, run_dir = run

    def fresh() -> None:
        # train would resume from its last checkpoint and not train at all: start it from scratch,
        # so that the kills land in training and in checkpoint writes (resume has its own test).
        if stage == names.TRAIN:
            shutil.rmtree(run_dir / names.CHECKPOINTS_DIR, ignore_errors=True)

    # The stage's own duration, rerun over its complete output (what the kills interrupt).
    fresh()
    t0 = time.monotonic()
    subprocess.run(stage_cmd(stage, run_dir), cwd=ROOT, check=True, capture_output=True)
    duration = time.monotonic() - t0
    previous = read_manifest(run_dir, stage)
    seen = []
    for fraction in FRACTIONS:
        fresh()
        proc = subprocess.Popen(
            stage_cmd(stage, run_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = outcome(run_dir, stage, previous)
        seen.append(state)
        # Recovery: the pipeline reruns what is missing or stale and removes the staging leftovers.
        results = {r.stage: r.status for r in graph.run_pipeline(cfg, run_dir, LocalRuntime(), announce=print)}
        assert results[stage] in ("ran", "up to date"), results
        assert all(results[s] != "failed" for s in STAGES), results  # smoke: 6 steps do not teach EOS
        verify_manifest(run_dir, stage, deep=True)
        assert not list(run_dir.glob(f"{names.TMP_PREFIX}{stage}-*"))
        previous = read_manifest(run_dir, stage)
    print(f"{stage}: {duration:.1f} s; after kills at {FRACTIONS} of it: {seen}")
