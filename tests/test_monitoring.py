"""Where users look during training: TensorBoard event files from the real train stage, the loss-curve
PNG in the run summary, progress that turns into plain lines off a terminal, and a CPU start
without bitsandbytes' alarming notice about an optional package."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from stages.common import names
from stages.common import pipeline as graph
from stages.common.config import load_config
from stages.common.layout import RunLayout
from stages.common.monitoring import BNB_OPTIONAL_KERNEL, loss_points
from stages.common.progress import Progress, heartbeat

PNG = b"\x89PNG\r\n\x1a\n"


def test_tensorboard_event_files_under_the_run(trained_chat_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, run_dir = trained_chat_run
    board = RunLayout(run_dir, load_config(config).run_name).tensorboard
    events = sorted(board.rglob("events.out.tfevents.*"))
    assert events, f"no event files under {board}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_tensorboard_is_off_by_default():
    from stages.common.config import TrainingConfig

    assert TrainingConfig().report_to == "none"


def test_run_summary_has_a_loss_curve_png(trained_chat_run, tmp_path):
    from conftest import copy_run

    config, trained = trained_chat_run
    run_dir = copy_run(trained, tmp_path / "run")
    cfg = load_config(config)
    train, evals = loss_points(RunLayout(run_dir, cfg.run_name))
    assert [s for s, _ in train] == [1, 2, 3, 4] and [s for s, _ in evals] == [2, 4, 4]  # the final evaluate too
    summary = graph.summarize(cfg, run_dir, [graph.StageResult(names.TRAIN, "ran", 1.0)])
    png = run_dir / summary["loss_curve"]
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    assert f"]({names.LOSS_CURVE_PNG})" in (run_dir / names.SUMMARY_MD).read_text()


def test_cpu_start_has_no_optional_kernel_notice(trained_chat_run):
    config, _ = trained_chat_run
    seen = (config.parent / "train.stderr").read_text()
    assert "bitsandbytes_backend" not in seen  # (the manifest's key, not output)
    assert BNB_OPTIONAL_KERNEL not in seen and "kernels-community" not in seen
    # Where this CPU makes bitsandbytes look for the optional package, importing it bare says so.
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    if "kernels-community" in bare.stderr:
        assert BNB_OPTIONAL_KERNEL in bare.stderr


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_progress_becomes_plain_lines_off_a_terminal():
    console, buf = plain_console()
    with Progress(console=console, interval=3600) as progress:
        task = progress.add_task("merging 40 tensors", total=40)
        for _ in range(40):
            progress.update(task, advance=1)
    lines = [ln for ln in buf.getvalue().splitlines() if ln]
    assert lines[0].startswith("merging 40 tensors: 1/40 (2%)")
    assert lines[-1].startswith("merging 40 tensors: 40/40 (100%)")
    assert 10 <= len(lines) <= 12 and "\r" not in buf.getvalue() and "━" not in buf.getvalue()


def test_heartbeat_lines_while_a_step_runs(monkeypatch):
    import time

    from stages.common import progress

    console, buf = plain_console()
    monkeypatch.setattr(progress, "console", console)
    with heartbeat("llama-perplexity", interval=0.05, detail=lambda: "3 chunks scored"):
        time.sleep(0.3)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "llama-perplexity ..." and lines[-1].startswith("llama-perplexity: done in")
    assert any(ln.startswith("llama-perplexity: 3 chunks scored, still running") for ln in lines[1:-1])


def test_converter_bars_become_lines_when_piped():
    """convert._stream, on a child drawing a tqdm-style bar with carriage returns, piped."""
    bar = "import sys\nfor i in range(3):\n    sys.stdout.write(f'\\rWriting: {i}/3'); sys.stdout.flush()\nprint()"
    parent = (
        f"import sys; from stages.convert import _stream; sys.exit(_stream([sys.executable, '-c', {bar!r}], {{}})[0])"
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == ["Writing:", "0/3", "Writing:", "1/3", "Writing:", "2/3"]
    assert b"\r" not in out.stdout
