"""Held-out means held out: evaluate (and report) score only rows the adapter never trained on, taken
from the split the real train stage recorded; an imported adapter counts only data.eval_files; with
nothing held out, evaluate is skipped with the reason. Before this, evaluate read
`eval_files or train_files` and scored training rows: the first test fails on that."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import chat_config, copy_run, distinct_rows, stage_cmd

from stages.common import names
from stages.common import pipeline as graph
from stages.common.artifacts import read_manifest
from stages.common.config import load_config
from stages.common.data import load_rows, train_and_held_out
from stages.common.heldout import held_out, row_hash
from stages.common.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]


def trained_hashes(cfg, run_dir: Path) -> set[str]:
    """Every row the train stage fed the trainer, recomputed from the data (not from its record)."""
    record = json.loads(RunLayout(run_dir, cfg.run_name).split.read_text())
    return {row_hash(r) for r in train_and_held_out(cfg.data, record["seed"]).train}


def run_stage_on(stage: str, config: Path, run_dir: Path) -> subprocess.CompletedProcess:
    cmd = stage_cmd(stage, run_dir)
    cmd[cmd.index("--config") + 1] = str(config)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.e2e
def test_evaluate_scores_only_rows_the_adapter_never_trained_on(trained_chat_run, tmp_path, llama_cpp_built):
    config, trained = trained_chat_run
    run_dir = copy_run(trained, tmp_path / "run")
    cfg = load_config(config)
    for stage in (names.MERGE, names.CONVERT, names.QUANTIZE, names.EVALUATE):  # the real stages, in order
        proc = run_stage_on(stage, config, run_dir)
        assert proc.returncode == 0, (stage, proc.stderr[-2000:])
    scored = json.loads(RunLayout(run_dir, cfg.run_name).exact_match.read_text())["examples"]
    prompts = [json.dumps(e["messages"], sort_keys=True) for e in scored]
    trained_prompts = {json.dumps(r["prompt"], sort_keys=True) for r in train_and_held_out(cfg.data, 42).train}
    assert len(scored) == 8  # every held-out row: evaluate scores at least 10 where there are
    assert not set(prompts) & trained_prompts, "evaluate scored a row the adapter trained on"
    # The old behaviour, `eval_files or train_files`, would have scored the training file's first rows.
    old = [json.dumps(r["prompt"], sort_keys=True) for r in load_rows(cfg.data.train_files, cfg.data)[0][:4]]
    assert set(old) & trained_prompts

    # The same GGUFs from an imported adapter (no recorded split, no data.eval_files): evaluate and
    # report are skipped with the reason, and the earlier score does not linger.
    graph.import_adapter(run_dir, RunLayout(trained, cfg.run_name).adapter)
    for stage in (names.REPORT, names.EVALUATE):
        proc = run_stage_on(stage, config, run_dir)
        assert proc.returncode == 0, (stage, proc.stderr[-2000:])
        assert f"{stage} skipped" in proc.stderr
        assert "--adapter" in read_manifest(run_dir, stage)["metrics"]["skipped"]
    assert not RunLayout(run_dir, cfg.run_name).exact_match.exists()


def test_split_record_and_held_out_rows(trained_chat_run):
    config, run_dir = trained_chat_run
    cfg = load_config(config)
    layout = RunLayout(run_dir, cfg.run_name)
    manifest = read_manifest(run_dir, names.TRAIN)
    assert layout.rel(layout.split) in manifest["outputs"]
    record = json.loads(layout.split.read_text())
    assert (record["seed"], record["source"], record["train_rows"], record["held_out_rows"]) == (
        42, "data.eval_fraction=0.25", 24, 8)  # fmt: skip
    held = held_out(cfg, layout)
    assert len(held.rows) == 8 and "held out by the train stage" in held.source
    assert not {row_hash(r) for r in held.rows} & trained_hashes(cfg, run_dir)


def test_imported_adapter_counts_only_eval_files(trained_chat_run, tmp_path):
    config, trained = trained_chat_run
    cfg = load_config(config)
    run_dir = copy_run(trained, tmp_path / "run")  # an old split.json that must not survive the import
    graph.import_adapter(run_dir, RunLayout(trained, cfg.run_name).adapter)
    layout = RunLayout(run_dir, cfg.run_name)
    assert not layout.split.exists(), "importing an adapter removes the previous adapter's split"
    held = held_out(cfg, layout)
    assert held.rows == [] and "--adapter" in held.reason and "data.eval_files" in held.reason

    proc = run_stage_on(names.EVALUATE, config, run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluate skipped" in proc.stderr
    manifest = read_manifest(run_dir, names.EVALUATE)
    assert "--adapter" in manifest["metrics"]["skipped"] and manifest["outputs"] == {}
    assert not layout.exact_match.exists()

    eval_file = tmp_path / "held.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in distinct_rows(5, seed=99)))
    cfg.data.eval_files = [str(eval_file)]
    held = held_out(cfg, layout)
    assert len(held.rows) == 5 and held.source.startswith("data.eval_files")


def test_nothing_held_out_skips_evaluate_with_the_reason(tmp_path, tiny_mistral):
    config = chat_config(tmp_path, tiny_mistral, distinct_rows(8, seed=6), data={"eval_fraction": 0.0},
                         training={"max_steps": 1, "eval_steps": None})  # fmt: skip
    run_dir = tmp_path / "runs" / "chat"
    for stage in (names.TRAIN, names.EVALUATE):
        cmd = stage_cmd(stage, run_dir)
        cmd[cmd.index("--config") + 1] = str(config)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
    reason = read_manifest(run_dir, names.EVALUATE)["metrics"]["skipped"]
    assert reason.startswith("the train stage held out no rows (data.eval_fraction=0.0)")
    assert not (run_dir / names.EVAL_DIR).exists()
