"""The build graph's logic, isolated: which stages rerun when what changes.

The stages here are stand-ins (a few lines that write outputs derived from their config
section), run by a test runtime; the real stages are exercised by the end-to-end tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import StandInRuntime

from stages.common import names, specs
from stages.common import pipeline as graph
from stages.common.config import validate_config
from stages.common.layout import RunLayout

STANDIN = """
import sys, yaml
from pathlib import Path
from stages.common.artifacts import stage_output
stage, cfg_path, run_dir = sys.argv[1], sys.argv[3], Path(sys.argv[5])
cfg = yaml.safe_load(open(cfg_path))
section = {"train": cfg["training"], "merge": cfg["merge"], "convert": cfg["gguf"]["outtype"],
           "quantize": cfg["gguf"], "report": cfg["report"], "smoke": cfg["smoke"]}[stage]
with stage_output(run_dir, stage) as out:
    out.path(f"{stage}/out.txt").write_text(repr(section) if stage != "merge" else "merged-constant")
    out.commit(inputs={})
"""


def make_cfg(**training):
    return validate_config(
        {
            "run_name": "t",
            "model": {"name_or_path": "m"},
            "data": {"train_files": ["d.jsonl"]},
            "training": {"max_steps": 3, **training},
            "gguf": {"quant_types": ["Q4_K_M"]},
        }
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "t"


def run(cfg, run_dir, **kw):
    rt = StandInRuntime(STANDIN)
    results = graph.run_pipeline(cfg, run_dir, rt, announce=lambda _: None, **kw)
    return rt.ran, results


def test_first_run_runs_everything_second_run_nothing(run_dir, monkeypatch):
    """An up-to-date run starts no stage and reads no output's content (sizes only), so its cost does
    not grow with the artifacts' size."""
    from stages.common import artifacts, keys

    cfg = make_cfg()
    ran, _ = run(cfg, run_dir)
    assert ran == ["train", "merge", "convert", "quantize", "report", "smoke"]
    hashed: list[Path] = []

    def spy(path: Path) -> str:
        hashed.append(path)
        return real(path)

    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", spy)
    monkeypatch.setattr(keys, "sha256_file", spy)
    ran, results = run(cfg, run_dir)
    assert ran == []
    assert {r.status for r in results} == {"up to date"}
    assert not [p for p in hashed if Path(p).resolve().is_relative_to(run_dir.resolve())], hashed


def test_gguf_change_reruns_only_gguf_stages(run_dir):
    run(make_cfg(), run_dir)
    cfg = make_cfg()
    cfg.gguf.quant_types = ["Q4_K_M", "Q8_0"]
    ran, _ = run(cfg, run_dir)
    assert ran == ["quantize", "report", "smoke"]


def test_training_change_reruns_train_and_what_its_outputs_feed(run_dir):
    run(make_cfg(), run_dir)
    ran, _ = run(make_cfg(learning_rate=1e-4), run_dir)
    # merge's and convert's stand-ins write the same bytes whatever their input, so what only they
    # feed (quantize, smoke) stays up to date: keys follow content, as in Bazel. convert (LoRA GGUF)
    # and report (model card) read the adapter's manifest too. With the real stages, new adapter
    # weights change everything.
    assert ran == ["train", "merge", "convert", "report"]


def test_force_one_stage(run_dir):
    cfg = make_cfg()
    run(cfg, run_dir)
    ran, _ = run(cfg, run_dir, force={"convert"})
    assert ran == ["convert"]


def test_status_says_why_a_stage_is_stale(run_dir):
    run(make_cfg(), run_dir)
    cfg = make_cfg(learning_rate=1e-4)
    states = {s.name: graph.stage_state(s, cfg, run_dir, StandInRuntime(STANDIN)) for s in specs.enabled(cfg)}
    assert states["train"].state == "stale" and "config" in states["train"].why
    assert states["merge"].state == "up to date"
    (run_dir / "quantize/out.txt").write_text("torn")
    states = {s.name: graph.stage_state(s, cfg, run_dir, StandInRuntime(STANDIN)) for s in specs.enabled(cfg)}
    assert states["quantize"].state == "stale" and "wrong size" in states["quantize"].why


def test_failed_stage_stops_the_pipeline_and_is_reported(run_dir):
    cfg = make_cfg()
    cfg.smoke.max_tokens = 5
    rt = StandInRuntime(STANDIN)
    rt.command = lambda spec, args: [sys.executable, "-c", "raise SystemExit(3)"]  # type: ignore[method-assign]
    results = graph.run_pipeline(cfg, run_dir, rt, announce=lambda _: None)
    assert [(r.stage, r.status) for r in results] == [("train", "failed")]
    state = graph.stage_state(specs.spec(names.TRAIN), cfg, run_dir, rt)
    assert state.state == "failed"


def test_import_adapter_refuses_a_folder_that_is_not_an_adapter(tmp_path):
    (tmp_path / "notadapter").mkdir()
    (tmp_path / "notadapter" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(graph.StageError, match="is not a PEFT adapter: adapter_config.json"):
        graph.import_adapter(tmp_path / "run", tmp_path / "notadapter")
    assert not RunLayout(tmp_path / "run", "t").adapter.exists()
