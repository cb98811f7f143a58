"""The train stage's guarantees on the CPU: a non-finite loss stops it cleanly, a killed run resumes
exactly, torn checkpoints are skipped, bad inputs fail with one line and leave nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import as_text, repeat_rows, write_jsonl

from stages.common.artifacts import read_manifest
from stages.common.layout import RunLayout

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
# Resumed vs uninterrupted run, CPU: same data order, RNG and optimizer state, so the adapters agree
# to float32 rounding of the restored optimizer state; stated bound on the largest |difference|.
RESUME_TOL = 1e-5


def make_config(tmp_path: Path, model: Path, **training) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", as_text(repeat_rows(64, seed=3)))
    cfg = {
        "run_name": "t",
        "model": {"name_or_path": str(model)},
        "data": {"train_files": [str(data)], "format": "text", "max_seq_length": 64, "eval_fraction": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "device": "cpu",
            "max_steps": 20,
            "batch_size": 8,
            "learning_rate": 5e-3,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_steps": 10,
            "group_by_length": False,
            **training,
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(cfg: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--config", str(cfg), "--run-dir", str(run)]


def layout(run: Path) -> RunLayout:
    return RunLayout(run, "t")  # make_config's run_name


def adapter_tensors(run: Path):
    from safetensors.torch import load_file

    return load_file(str(layout(run).adapter / "adapter_model.safetensors"))


def losses(run: Path) -> list[float]:
    return [loss for _, loss in read_manifest(run, "train")["metrics"]["loss_curve"]]


def assert_stops_at_non_finite_loss(tmp_path: Path, model: Path, device: str) -> None:
    """A diverging run exits 2 naming the step, with no checkpoint after it and no adapter."""
    cfg = make_config(tmp_path, model, device=device, learning_rate=1e6, max_grad_norm=1e9, save_steps=1)
    proc = subprocess.run(train_cmd(cfg, tmp_path / "run"), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if "training stopped" in x]
    assert line and ("loss became nan" in line[0] or "loss became inf" in line[0]), proc.stderr[-2000:]
    step = int(line[0].split("at step ")[1].split()[0])
    saved = sorted(int(p.name.split("-")[1]) for p in layout(tmp_path / "run").checkpoints.glob("checkpoint-*"))
    assert all(s < step for s in saved), f"checkpoint after the bad step {step}: {saved}"
    assert not layout(tmp_path / "run").adapter.exists()


def test_non_finite_loss_stops_at_that_step(tmp_path, tiny_mistral):
    assert_stops_at_non_finite_loss(tmp_path, tiny_mistral, "cpu")


def test_killed_run_resumes_exactly(tmp_path, tiny_mistral):
    import torch

    # 60 steps, checkpoints every 10: the kill after the first checkpoint lands well before the end.
    cfg = make_config(tmp_path, tiny_mistral, max_steps=60)
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(cfg, whole), check=True, capture_output=True, cwd=ROOT)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(train_cmd(cfg, cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    first = layout(cut).checkpoints / "checkpoint-10" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the checkpoint finish writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not layout(cut).adapter.exists(), "killed before the end: no adapter at the final path"

    # A torn later checkpoint must be skipped, not loaded.
    torn = layout(cut).checkpoints / "checkpoint-55"
    torn.mkdir(exist_ok=True)
    (torn / "trainer_state.json").write_text("{")
    resumed = subprocess.run(train_cmd(cfg, cut), capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping torn checkpoint checkpoint-55" in resumed.stdout + resumed.stderr
    resumed_from = read_manifest(cut, "train")["inputs"]["resumed_from"]
    assert resumed_from in {f"checkpoint-{k}" for k in (10, 20, 30, 40, 50)}

    a, b = adapter_tensors(whole), adapter_tensors(cut)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= RESUME_TOL, worst
    whole_losses, cut_losses = losses(whole), losses(cut)
    # The resumed run carries the steps up to its checkpoint over and logs the rest itself.
    assert len(cut_losses) == len(whole_losses) == 60
    assert cut_losses == pytest.approx(whole_losses, rel=1e-4)
    assert torch.isfinite(torch.tensor(cut_losses)).all()


def test_missing_model_path_is_one_line_and_leaves_nothing(tmp_path):
    cfg = make_config(tmp_path, tmp_path / "no-such-model")
    proc = subprocess.run(train_cmd(cfg, tmp_path / "run"), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "does not exist; set model.name_or_path" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not layout(tmp_path / "run").adapter.exists()


def test_pickle_weights_are_refused_unopened(tmp_path, tiny_mistral):
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_mistral, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    # A pickle whose loading would create `marker`: it must never be unpickled.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (model / "pytorch_model.bin").write_bytes(payload)
    cfg = make_config(tmp_path, model)
    proc = subprocess.run(train_cmd(cfg, tmp_path / "run"), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "holds only pickled weights (pytorch_model.bin)" in proc.stderr
    assert not marker.exists()


def test_fsdp_arguments_reach_the_trainer():
    """training.fsdp: full shard with the decoder layers wrapped, checkpointing by the FSDP plugin
    (the Trainer refuses its own and FSDP's at once). The run itself needs GPUs (README)."""
    from stages.common.config import validate_config
    from stages.train import sft_config

    tree = {"run_name": "t", "model": {"name_or_path": "m"}, "data": {"train_files": ["d"]}}
    tree["training"] = {"fsdp": True, "gpus": 2, "optim": "adamw_torch", "gradient_checkpointing": True}
    args = sft_config(validate_config(tree), Path("unused"), "cpu", False)
    assert args.fsdp and args.fsdp_config["reshard_after_forward"] is True
    assert args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert args.fsdp_config["activation_checkpointing"] is True and args.gradient_checkpointing is False
    tree["training"] = {"gradient_checkpointing": True}
    plain = sft_config(validate_config(tree), Path("unused"), "cpu", False)
    assert not plain.fsdp and plain.gradient_checkpointing is True
