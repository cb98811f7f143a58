"""Shared fixtures: tiny real models built here, and the pinned llama.cpp when it is built."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_mistral

from stages.common import llamacpp
from stages.common.runtime import Runtime


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    return build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def llama_cpp_built() -> Path:
    if not llamacpp.is_built():
        pytest.skip("pinned llama.cpp (this version and patch) not built; run `invoke llama-cpp` (the CI builds it)")
    return llamacpp.home()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def repeat_rows(n: int, seed: int = 0) -> list[dict]:
    """A chat task a tiny model learns in a few dozen steps: echo a letter four times."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.choice("abcdefgh")
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"repeat {a}"},
                    {"role": "assistant", "content": f"{a} {a} {a} {a}"},
                ]
            }
        )
    return rows


def distinct_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` chat rows of the repeat task with pairwise different prompts (two letters, up to 64)."""
    pairs = [a + b for a in "abcdefgh" for b in "abcdefgh"]
    random.Random(seed).shuffle(pairs)
    return [
        {"messages": [{"role": "user", "content": f"repeat {p}"}, {"role": "assistant", "content": f"{p} {p} {p} {p}"}]}
        for p in pairs[:n]
    ]


def as_text(rows: list[dict]) -> list[dict]:
    """The same rows in the reference recipe's `text` format (Llama-2 [INST] prompts, as guanaco-llama2-1k)."""
    return [{"text": f"[INST] {r['messages'][0]['content']} [/INST] {r['messages'][1]['content']}"} for r in rows]


def tiny_pipeline(
    root: Path, run_name: str, model: Path, train_rows: list[dict], held_rows: list[dict] | None = None, **sections
):
    """Run the real pipeline (local runtime) on a tiny model and `text` rows written under `root`;
    `sections` replace the config's sections; intermediates are kept unless `keep` says otherwise
    (tests read the merged checkpoint and the f16 GGUF). Returns (config, run folder, stage results)."""
    import yaml

    from stages.common import pipeline as graph
    from stages.common.config import load_config
    from stages.common.runtime import LocalRuntime

    data = {"train_files": [str(write_jsonl(root / "train.jsonl", as_text(train_rows)))]}
    if held_rows:
        data["eval_files"] = [str(write_jsonl(root / "eval.jsonl", as_text(held_rows)))]
    tree = {
        "run_name": run_name,
        "model": {"name_or_path": str(model)},
        "data": {**data, "format": "text", "max_seq_length": 64, **sections.pop("data", {})},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "keep": {"merged": True, "outtype_gguf": True},
        **sections,
    }
    cfg_path = root / f"{run_name}.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    cfg = load_config(cfg_path)
    run_dir = root / "runs" / run_name
    return cfg, run_dir, graph.run_pipeline(cfg, run_dir, LocalRuntime(), announce=print)


def stage_cmd(stage: str, run_dir: Path) -> list[str]:
    """One stage as its own process, on a run's frozen config."""
    import sys

    from stages.common import names

    return [
        sys.executable,
        "-m",
        f"stages.{stage}",
        "--config",
        str(run_dir / names.RUN_CONFIG),
        "--run-dir",
        str(run_dir),
    ]


def copy_run(run_dir: Path, dest: Path, edit=None) -> Path:
    """A copy of a finished run at `dest`, its frozen config passed through `edit(tree)` if given."""
    import shutil

    import yaml

    from stages.common import names

    shutil.copytree(run_dir, dest)
    if edit is not None:
        cfg_path = dest / names.RUN_CONFIG
        tree = yaml.safe_load(cfg_path.read_text())
        edit(tree)
        cfg_path.write_text(yaml.safe_dump(tree))
    return dest


def run_stage(stage: str, run_dir: Path):
    """stage_cmd, run to completion; the CompletedProcess with text output."""
    import subprocess

    return subprocess.run(stage_cmd(stage, run_dir), capture_output=True, text=True, cwd=Path(__file__).parents[1])


class StandInRuntime(Runtime):
    """Runs `script` (python -c SCRIPT STAGE ARGS...) in place of each stage and records which stages
    it started: the build graph's logic without the real stages."""

    name = "standin-test"

    def __init__(self, script: str):
        self.script = script
        self.ran: list[str] = []

    def available(self) -> bool:
        return True

    def describe(self) -> str:
        return "stand-in stages"

    def identity(self, spec) -> str:
        return "v1"

    def command(self, spec, args: list[str]) -> list[str]:
        self.ran.append(spec.name)
        return [sys.executable, "-c", self.script, spec.name, *args]


def chat_config(folder: Path, model: Path, rows: list[dict], run_name: str = "chat", **sections) -> Path:
    """A config training a few CPU steps on chat `rows` (written under `folder`), evaluating exact
    match at Q8_0 (the only type a 64-wide model takes); `sections` update its sections."""
    import yaml

    tree = {
        "run_name": run_name,
        "model": {"name_or_path": str(model)},
        "data": {"train_files": [str(write_jsonl(folder / "train.jsonl", rows))], "format": "chat",
                 "max_seq_length": 64, "eval_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"device": "cpu", "max_steps": 4, "batch_size": 4, "logging_steps": 1, "save_steps": 4,
                     "eval_steps": 2},
        "gguf": {"quant_types": ["Q8_0"], "lora_adapter": False},
        "report": {"enabled": False},
        "smoke": {"messages": ["repeat a"], "max_tokens": 8},
        "eval": {"exact_match": True, "quant_type": "Q8_0", "max_examples": 4, "max_tokens": 8},
    }  # fmt: skip
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    path = folder / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="session")
def trained_chat_run(tmp_path_factory, tiny_mistral) -> tuple[Path, Path]:
    """(config, run folder) after the real train stage: 32 distinct chat rows, a quarter held out by
    data.eval_fraction, TensorBoard on, eval loss every 2 of 4 steps. Its output is in
    train.stderr beside the config."""
    import subprocess

    folder = tmp_path_factory.mktemp("trained-chat")
    config = chat_config(folder, tiny_mistral, distinct_rows(32, seed=5), training={"report_to": "tensorboard"})
    run_dir = folder / "runs" / "chat"
    cmd = stage_cmd("train", run_dir)
    cmd[cmd.index("--config") + 1] = str(config)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder / "train.stderr").write_text(proc.stderr)  # what a user sees, for the tests to read
    return config, run_dir
