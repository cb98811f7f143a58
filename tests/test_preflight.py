"""Memory preflight: the shortfall message, the estimates against what the stages really use,
and a stage that stops before its heavy work when the host is short."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from stages.common import names, preflight
from stages.common.artifacts import read_manifest
from stages.common.errors import StageError
from stages.common.layout import RunLayout


def test_shortfall_names_the_numbers_and_the_way_out(monkeypatch):
    monkeypatch.delenv(preflight.ENV_SKIP, raising=False)
    available = psutil.virtual_memory().available
    with pytest.raises(StageError) as err:
        preflight.check_free_memory(available + (64 << 30), "the streaming merge")
    msg = str(err.value)
    assert msg.startswith("not enough memory for the streaming merge: it needs about ")
    assert f"{(available + (64 << 30)) / 2**30:.1f} GiB" in msg and preflight.ENV_SKIP in msg
    preflight.check_free_memory(1 << 20, "a small step")  # enough: no error
    monkeypatch.setenv(preflight.ENV_SKIP, "1")
    preflight.check_free_memory(available + (64 << 30), "anything")  # skipped on request


def test_estimates_read_the_checkpoint_headers(tiny_mistral):
    from safetensors.torch import load_file

    named = {k: t for f in sorted(tiny_mistral.glob("*.safetensors")) for k, t in load_file(f).items()}
    largest = max(t.numel() * t.element_size() for t in named.values())
    assert preflight.largest_tensor_bytes(tiny_mistral) == largest
    layer = sum(t.numel() * t.element_size() for k, t in named.items() if k.startswith("model.layers.1."))
    assert preflight.largest_layer_bytes(tiny_mistral) == layer
    assert preflight.convert_peak(tiny_mistral) == 4 * layer + 4 * largest + (768 << 20)
    size = sum(f.stat().st_size for f in tiny_mistral.glob("*.safetensors"))
    # hidden 64, 4 heads, 2 layers, vocab 320; batch 4 of 64 tokens in 16 bits: per layer
    # 64*4*64*(34 + 5*4*64/64) = 884,736 bytes; logits 12*4*64*320 = 983,040.
    acts = 2 * 884_736 + 983_040
    assert preflight.train_peak(tiny_mistral, "cpu", 4, 64, half=True) == int(1.5 * size) + acts + (1 << 30)
    assert preflight.train_peak(tiny_mistral, "cpu", 4, 64, half=False) == int(1.5 * size) + acts + 2 * 884_736 + (
        1 << 30
    )
    # On a GPU the activations are not in host RAM: one shard at a time.
    assert preflight.train_peak(tiny_mistral, "cuda", 4, 64, half=True) == size + (1 << 30)


def test_merge_estimate_bounds_the_measured_peak(tiny_run_for_preflight):
    """The estimate against the merge stage's own measurements, from its run: its tensor term covers
    the bound the stage's write is held to (4 × largest tensor + adapter; tests/test_merge.py checks
    the write's growth against it on a model where tensors dominate), and the whole estimate covers
    the peak. On this tiny model the write's growth is fixed costs (library pages, the writer
    thread: ~4 MiB against a 0.3 MB tensor term), which only the interpreter allowance covers."""
    run_dir, base = tiny_run_for_preflight
    m = read_manifest(run_dir, names.MERGE)["metrics"]
    estimate = preflight.merge_peak(base, RunLayout(run_dir, "p").adapter)
    assert estimate - preflight.INTERPRETER >= 4 * m["largest_tensor_bytes"] + m["adapter_bytes"]
    assert estimate >= m["write_peak_rss_gib"] * 2**30, (estimate, m["rss_start_gib"], m["write_peak_rss_gib"])


@pytest.mark.parametrize(
    ("stage", "what"),
    [(names.QUANTIZE, "llama-quantize"), (names.TRAIN, "loading the base model and training on the cpu")],
)
def test_stage_stops_before_its_work_when_memory_is_short(tiny_run_for_preflight, monkeypatch, capsys, stage, what):
    """A stage on a host 'with 1 MiB free': exit 2, one line with the numbers, nothing written."""
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    run_dir, _ = tiny_run_for_preflight
    before = read_manifest(run_dir, stage)

    class Short:
        available = 1 << 20

    monkeypatch.delenv(preflight.ENV_SKIP, raising=False)
    monkeypatch.setattr(preflight.psutil, "virtual_memory", lambda: Short())
    code = module.main(["--config", str(RunLayout(run_dir, "p").config), "--run-dir", str(run_dir)])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"not enough memory for {what}: it needs about" in err and "0.0 GiB is available" in err
    assert read_manifest(run_dir, stage) == before
    assert not list(run_dir.glob(f"{names.TMP_PREFIX}*"))


@pytest.fixture(scope="module")
def tiny_run_for_preflight(tmp_path_factory, tiny_mistral, llama_cpp_built) -> tuple[Path, Path]:
    """train (2 steps), merge, convert and quantize of the tiny model, for the checks above."""
    from conftest import repeat_rows, tiny_pipeline

    _, run_dir, results = tiny_pipeline(
        tmp_path_factory.mktemp("preflight"),
        "p",
        tiny_mistral,
        repeat_rows(16, seed=4),
        data={"eval_fraction": 0.25},
        training={"device": "cpu", "max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 2},
        gguf={"quant_types": ["Q8_0"], "lora_adapter": False},
        report={"enabled": False},
        smoke={"prompts": ["a"], "max_tokens": 2},
    )
    # smoke may fail (2 steps teach the model nothing about EOS); what the checks read is there.
    assert {r.stage: r.status for r in results}[names.QUANTIZE] == "ran"
    return run_dir, tiny_mistral
