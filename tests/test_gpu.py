"""The train stage on a CUDA GPU (skipped without one): the demo config trains through the real stage
on bitsandbytes' CUDA kernels with a falling loss, and a non-finite loss stops it at that step with no
later checkpoint, as on the CPU (tests/test_train.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import make_config, train_cmd

from stages.common import names

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "cache" / "models" / "SmolLM2-135M-Instruct"
DEMO_DATA = ROOT / "cache" / "data" / "demo-dates" / "train.jsonl"


def test_demo_config_trains_on_cuda(tmp_path):
    if not (DEMO_MODEL / "config.json").is_file() or not DEMO_DATA.is_file():
        pytest.skip("demo model or data not prepared; run `invoke stage prepare` first")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "stages.train", "--config", str(ROOT / "configs" / "demo.yaml"), "--run-dir", str(run)]
    proc = subprocess.run([*cmd, "--set", "training.device=cuda"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "manifests" / "train.json").read_text())["metrics"]
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
    cfg = make_config(tmp_path, tiny_mistral, device="cuda", learning_rate=1e6, max_grad_norm=1e9, save_steps=1)
    proc = subprocess.run(train_cmd(cfg, tmp_path / "run"), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if "training stopped" in x]
    assert line and ("loss became nan" in line[0] or "loss became inf" in line[0]), proc.stderr[-2000:]
    step = int(line[0].split("at step ")[1].split()[0])
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / names.CHECKPOINTS_DIR).glob("checkpoint-*"))
    assert all(s < step for s in saved), f"checkpoint after the bad step {step}: {saved}"
    assert not (tmp_path / "run" / names.ADAPTER_DIR).exists()
