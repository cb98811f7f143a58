"""The train stage on a CUDA GPU (skipped without one): the demo config trains through the real stage
on bitsandbytes' CUDA kernels with a falling loss, and a non-finite loss stops it at that step with no
later checkpoint, as on the CPU (tests/test_train.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_train import assert_stops_at_non_finite_loss, train_cmd

from stages.common import names
from stages.common.artifacts import read_manifest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "cache" / "models" / "SmolLM2-135M-Instruct"
DEMO_DATA = ROOT / "cache" / "data" / "demo-dates" / "train.jsonl"


def test_demo_config_trains_on_cuda(tmp_path):
    if not (DEMO_MODEL / "config.json").is_file() or not DEMO_DATA.is_file():
        pytest.skip("demo model or data not prepared; run `invoke stage prepare` first")
    run = tmp_path / "run"
    cmd = [*train_cmd(ROOT / "configs" / "demo.yaml", run), "--set", "training.device=cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_manifest(run, names.TRAIN)["metrics"]
    print(
        f"demo on CUDA: {metrics['steps']} steps, loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.4f}, "
        f"eval {metrics['eval_loss']:.4f}, {metrics['tokens_per_s']} tok/s, {metrics['train_runtime_s']:.1f} s"
    )
    assert metrics["device"] == "cuda"
    assert metrics["bitsandbytes_backend"] == "CUDA"
    # The CPU demo falls from ~1.5 to ~0.01 over its 50 steps; a tenth is a wide margin that still fails
    # when nothing is learned.
    assert metrics["final_loss"] < 0.1 * metrics["first_loss"], metrics["loss_curve"]
    assert metrics["eval_loss"] < 0.1


def test_non_finite_loss_stops_at_that_step_on_cuda(tmp_path, tiny_mistral):
    assert_stops_at_non_finite_loss(tmp_path, tiny_mistral, "cuda")
