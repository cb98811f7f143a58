"""End to end on a tiny random Mistral with a SentencePiece tokenizer: the real stage entry points,
run as processes by the local runtime, then numbers checked against peft, transformers and llama.cpp.

Tolerances (stated here, asserted below):
- merged vs base + adapter (peft, unmerged), both evaluated in float32: max |Δlogit| <= 2e-2 × the
  logits' max magnitude; the only difference is rounding the merged weights to float16.
- f16 GGUF in llama.cpp vs the merged HF model in float32: max |Δlogit| <= 3e-2 × max magnitude, and
  the same argmax at >= 98% of positions (f16 activations and a different kernel order).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import copy_run, distinct_rows, repeat_rows, run_stage, tiny_pipeline

from stages.common import names, specs
from stages.common import pipeline as graph
from stages.common.artifacts import read_manifest, verify_manifest
from stages.common.config import KeepConfig
from stages.common.errors import StageError
from stages.common.layout import RunLayout
from stages.common.runtime import LocalRuntime

pytestmark = pytest.mark.e2e

MERGE_TOL = 2e-2
GGUF_TOL = 3e-2


def tiny(run_dir: Path) -> RunLayout:
    """The layout of a copy of the tiny run (run_name tiny)."""
    return RunLayout(run_dir, "tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_mistral, llama_cpp_built):
    # The `text` format, as in the reference recipe: HF and llama.cpp's SentencePiece tokenizers
    # agree on plain text, so the smoke prompt below reaches the model as the training rows did.
    cfg, run_dir, results = tiny_pipeline(
        tmp_path_factory.mktemp("tiny-run"),
        "tiny",
        tiny_mistral,
        repeat_rows(96, seed=1),
        distinct_rows(16, seed=2),  # held out: none of them is a training row
        lora={
            "r": 16,
            "alpha": 32,
            "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        training={
            "device": "cpu",
            "max_steps": 60,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "logging_steps": 10,
            "save_steps": 30,
        },
        merge={"dtype": "float16"},
        gguf={"outtype": "f16", "quant_types": ["Q8_0", "Q4_K_M"]},
        smoke={"prompts": ["[INST] repeat c [/INST]"], "quant_type": "Q8_0", "max_tokens": 16},
        # 16 held-out rows are ~350 tokens: chunks of 64 (llama-perplexity needs two). A 64-wide
        # model quantizes far worse than a real one (measured KL vs f16: Q8_0 0.011, Q4_K_M
        # 0.38); the gate's defaults are for real models, so this run sets its own.
        report={"ctx": 64, "max_kl": {"Q8_0": 0.05, "Q4_K_M": 1.0}},
    )
    return cfg, run_dir, results, tiny_mistral


def test_every_stage_ran(tiny_run):
    _, _, results, _ = tiny_run
    assert [(r.stage, r.status) for r in results] == [
        (s, "ran") for s in ("train", "merge", "convert", "quantize", "report", "smoke")
    ]


def test_train_loss_goes_down(tiny_run):
    _, run_dir, _, _ = tiny_run
    m = read_manifest(run_dir, names.TRAIN)["metrics"]
    curve = [loss for _, loss in m["loss_curve"]]
    assert len(curve) == 6
    assert curve[-1] < 0.3 * curve[0], curve
    # The held-out rows repeat two-letter words the run never trained on (single letters only), so
    # their loss measures whether the copy pattern carries over: 2.64 against a first loss of 3.53
    # (0.75) when they became truly held out; repeated training rows had measured under 0.5.
    assert m["eval_loss"] < 0.85 * curve[0], (m["eval_loss"], curve[0])


def _token_batch(tokenizer):
    texts = ["repeat a", "the model learns to answer questions about dates", "quantization merges adapters 1 2 3"]
    return [tokenizer(t).input_ids for t in texts]


def test_merged_logits_equal_base_plus_adapter(tiny_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _, base_dir = tiny_run
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, tiny(run_dir).adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(tiny(run_dir).merged, dtype=torch.float32).eval()
    with torch.no_grad():
        for ids in _token_batch(tok):
            x = torch.tensor([ids])
            want, got = ref(x).logits, merged(x).logits
            scale = want.abs().max()
            assert (want - got).abs().max() <= MERGE_TOL * scale
            assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_f16_gguf_logits_match_merged_hf(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.common.gguf_runtime import GGUFModel

    _, run_dir, _, _ = tiny_run
    merged_dir = tiny(run_dir).merged
    tok = AutoTokenizer.from_pretrained(merged_dir)
    hf = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    gguf = GGUFModel(tiny(run_dir).gguf("f16"), n_ctx=128, logits_all=True)
    same = total = 0
    for ids in _token_batch(tok):
        assert gguf.tokenize(tok.decode(ids, skip_special_tokens=True)) == ids, "same tokens in HF and llama.cpp"
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        got = gguf.logits(ids)
        scale = abs(want).max()
        assert abs(want - got).max() <= GGUF_TOL * scale
        same += int((want.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
    gguf.close()
    assert same / total >= 0.98


def test_quantized_files_and_bits_per_weight(tiny_run):
    _, run_dir, _, _ = tiny_run
    types = read_manifest(run_dir, names.QUANTIZE)["metrics"]["types"]
    assert set(types) == {"Q8_0", "Q4_K_M"}
    assert types["Q4_K_M"]["size_bytes"] < types["Q8_0"]["size_bytes"]
    for qtype in types:
        assert tiny(run_dir).gguf(qtype).is_file()


def test_smoke_answered_and_stopped_at_eos(tiny_run):
    _, run_dir, _, _ = tiny_run
    answers = read_manifest(run_dir, names.SMOKE)["metrics"]["answers"]
    assert answers[0]["stopped_at_eos"] is True
    # The tiny model learns the answer's form (one letter, four times, then EOS) within 60 steps;
    # copying the right letter is beyond it, so the form is what is asserted.
    assert re.fullmatch(r"([a-h])( \1){3}", answers[0]["output"].strip()), answers[0]["output"]


def test_llama_cpp_commit_recorded(tiny_run):
    _, run_dir, _, _ = tiny_run
    for stage in (names.CONVERT, names.QUANTIZE, names.REPORT, names.SMOKE):
        assert read_manifest(run_dir, stage)[names.M_LLAMA_CPP]["commit"] == "0c1e57098"


def test_second_run_is_up_to_date(tiny_run):
    cfg, run_dir, _, _ = tiny_run
    results = graph.run_pipeline(cfg, run_dir, LocalRuntime(), announce=print)
    assert {r.status for r in results} == {"up to date"}


def test_intermediates_are_removed_and_remade_when_needed(tiny_run, tmp_path):
    """With the default keep settings, the merged weights and the f16 GGUF go once every stage that
    reads them has run; a later change that needs the f16 GGUF again remakes it, byte for byte."""
    cfg, run_dir, _, _ = tiny_run
    copy = copy_run(run_dir, tmp_path / "runs" / "tiny")
    lean = cfg.model_copy(update={"keep": KeepConfig()})
    layout = tiny(copy)
    f16 = layout.rel(layout.gguf("f16"))
    made = read_manifest(copy, names.CONVERT)[names.M_OUTPUTS][f16][names.M_SHA256]

    results = graph.run_pipeline(lean, copy, LocalRuntime(), announce=print)
    assert {r.status for r in results} == {"up to date"}
    assert not list(layout.merged.glob("*.safetensors")) and (layout.merged / "config.json").is_file()
    assert not layout.gguf("f16").exists()
    assert f16 in read_manifest(copy, names.CONVERT)[names.M_PRUNED]
    with pytest.raises(StageError, match="was removed once the stages that read it had run"):
        verify_manifest(copy, names.CONVERT)

    more = lean.model_copy(deep=True)
    more.gguf.quant_types = ["Q8_0", "Q4_K_M", "Q5_K_M"]
    results = graph.run_pipeline(more, copy, LocalRuntime(), announce=print)
    assert [r.stage for r in results if r.status == "ran"] == ["merge", "convert", "quantize", "report", "smoke"]
    assert read_manifest(copy, names.CONVERT)[names.M_OUTPUTS][f16][names.M_SHA256] == made
    assert layout.gguf("Q5_K_M").is_file() and not layout.gguf("f16").exists()
    assert {r.status for r in graph.run_pipeline(more, copy, LocalRuntime(), announce=print)} == {"up to date"}


def test_smoke_fails_without_eos(tiny_run, tmp_path):
    """An untrained random model rambles: the smoke stage must fail, non-zero, with one line."""

    def no_eos(tree):
        tree["smoke"] = {"prompts": ["dates numbers colours"], "quant_type": "Q8_0", "max_tokens": 4}

    copy = copy_run(tiny_run[1], tmp_path / "runs" / "tiny", no_eos)
    tiny(copy).manifest(names.SMOKE).unlink()
    proc = run_stage(names.SMOKE, copy)
    assert proc.returncode == 2
    assert "no EOS within 4 tokens" in proc.stderr
    assert not tiny(copy).manifest(names.SMOKE).exists()


# --- Quality report, gate, LoRA GGUF -----------------------------------------------------------


def test_report_measures_every_type(tiny_run):
    cfg, run_dir, results, _ = tiny_run
    report = json.loads(tiny(run_dir).report_json.read_text())
    rows = {r["type"]: r for r in report["types"]}
    assert list(rows) == ["f16", "Q8_0", "Q4_K_M"]
    assert rows["f16"]["kl_mean"] is None
    # Fewer bits, more change: KL vs f16 and top-1 agreement order the types by size.
    assert 0 <= rows["Q8_0"]["kl_mean"] < rows["Q4_K_M"]["kl_mean"]
    # 0.9498 measured once the held-out rows stopped being copies of training rows (0.95 before).
    assert rows["Q8_0"]["top1_agreement"] >= 0.94
    assert rows["Q4_K_M"]["size_bytes"] < rows["Q8_0"]["size_bytes"] < rows["f16"]["size_bytes"]
    assert all(r["prompt_tokens_per_s"] > 0 and r["gen_tokens_per_s"] > 0 for r in rows.values())
    # convert's check: the merged HF model on the same tokens and chunks, one layer at a time.
    conv = report["conversion"]
    assert conv == read_manifest(run_dir, names.CONVERT)[names.M_METRICS]["conversion"]
    assert conv["hf_dtype"] == "float32" and conv["positions"] == conv["chunks"] * (64 - 1 - 32)
    assert abs(conv["relative_delta"]) <= 0.005 and conv["top1_agreement"] >= 0.99, conv
    assert report["text"]["chunks"] >= 2
    assert tiny(run_dir).report_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = tiny(run_dir).report_md.read_text()
    assert "| Q4_K_M |" in md and "report.png" in md
    graph.summarize(cfg, run_dir, results)
    assert f"(gguf/{names.REPORT_MD})" in tiny(run_dir).summary_md.read_text()


def test_model_card_and_modelfile(tiny_run):
    _, run_dir, _, _ = tiny_run
    card = tiny(run_dir).model_card.read_text()
    train = read_manifest(run_dir, names.TRAIN)
    for sha in train["inputs"]["data"].values():
        assert sha in card
    assert f"final {train['metrics']['final_loss']:.4f}" in card
    assert '"r": 16' in card and "| Q8_0 |" in card
    modelfile = tiny(run_dir).modelfile.read_text()
    assert modelfile.startswith("FROM ./tiny.Q8_0.gguf\n")
    # Derived from the checkpoint's own [INST] template; BOS left to llama.cpp; stops at </s>.
    assert '{{ if eq $prev "" }}[INST] {{ else if eq $prev "assistant" }}</s>[INST] {{ end }}' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    assert "<s>" not in modelfile


def test_quality_gate_fails_with_the_numbers_and_keeps_the_report(tiny_run, tmp_path):
    def strict(tree):
        tree["report"]["max_kl"] = {"Q4_K_M": 1e-9}

    copy = copy_run(tiny_run[1], tmp_path / "runs" / "tiny", strict)
    before = tiny(copy).report_json.read_bytes()
    proc = run_stage(names.REPORT, copy)
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert "quality gate: Q4_K_M mean KL vs f16 is" in err and "report.max_kl.Q4_K_M=1e-09" in err
    assert tiny(copy).report_json.read_bytes() == before  # the last good report
    assert json.loads(tiny(copy).failed_report(names.REPORT).read_text())["types"]
    assert not list(copy.glob(f"{names.TMP_PREFIX}*"))


def test_conversion_gate_fails_convert_with_the_numbers(tiny_run, tmp_path):
    """An f16 file that misses the conversion gate is not published: convert exits 2 with the figures."""

    def strict(tree):
        tree["report"]["max_conversion_ppl_delta"] = 0.0

    copy = copy_run(tiny_run[1], tmp_path / "runs" / "tiny", strict)
    before = read_manifest(copy, names.CONVERT)
    proc = run_stage(names.CONVERT, copy)
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert "conversion check: tiny.f16.gguf perplexity" in err and "report.max_conversion_ppl_delta=0.0" in err
    assert read_manifest(copy, names.CONVERT) == before  # the previous f16 file and manifest stay
    assert json.loads(tiny(copy).failed_report(names.CONVERT).read_text())["hf_perplexity"] > 0
    assert not list(copy.glob(f"{names.TMP_PREFIX}*"))


def test_lora_gguf_on_the_base_matches_the_merged_gguf(tiny_run, tmp_path):
    """llama.cpp with the base f16 GGUF and the adapter as a LoRA GGUF computes what the merged
    f16 GGUF computes: logits within the f16 tolerance, the same greedy answer."""
    from stages.common.gguf_runtime import GGUFModel
    from stages.convert import convert_checkpoint

    _, run_dir, _, base_dir = tiny_run
    base = tmp_path / "base.f16.gguf"
    convert_checkpoint(base_dir, base, "f16", "base")
    lora = tiny(run_dir).lora_gguf
    with (
        GGUFModel(base, n_ctx=128, logits_all=True, lora=lora) as with_lora,
        GGUFModel(tiny(run_dir).gguf("f16"), n_ctx=128, logits_all=True) as merged,
    ):
        for prompt in ["[INST] repeat c [/INST]", "[INST] repeat f [/INST]", "the model learns"]:
            ids = merged.tokenize(prompt)
            want, got = merged.logits(ids), with_lora.logits(ids)
            assert abs(want - got).max() <= GGUF_TOL * abs(want).max()
            assert (want.argmax(-1) == got.argmax(-1)).all()
            assert with_lora.generate(ids, 12).tokens == merged.generate(ids, 12).tokens


def test_imatrix_quantization(tiny_run, tmp_path):
    """gguf.imatrix: llama-imatrix on the training text, then every type quantized with it."""
    _, run_dir, _, _ = tiny_run

    def with_imatrix(tree):
        tree["gguf"] |= {"imatrix": True, "imatrix_chunks": 2}

    copy = copy_run(run_dir, tmp_path / "runs" / "tiny", with_imatrix)
    proc = run_stage(names.QUANTIZE, copy)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_manifest(copy, names.QUANTIZE)
    assert m["inputs"]["imatrix"] == names.IMATRIX_FILE
    assert tiny(copy).rel(tiny(copy).imatrix) in m[names.M_OUTPUTS]

    # The importance weights change what the k-quants round to; Q8_0 does not use them.
    assert tiny(copy).gguf("Q4_K_M").read_bytes() != tiny(run_dir).gguf("Q4_K_M").read_bytes()


def _status(run_dir: Path, *sets: str) -> dict[str, str]:
    """`invoke status` as a user runs it: stage -> the rest of its table row."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "status", "--run", str(run_dir), "--runtime", "local", *args],
        cwd=root,
        env={**os.environ, "COLUMNS": "250"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] in specs.NAMES:
            rows[cells[0]] = " ".join(cells[1:])
    return rows


def test_status_command_reports_each_stage(tiny_run, tmp_path):
    copy = copy_run(tiny_run[1], tmp_path / "runs" / "tiny")
    rows = _status(copy)
    assert list(rows) == ["train", "merge", "convert", "quantize", "report", "smoke"]
    assert all(r.startswith("up to date") for r in rows.values()), rows
    # A training setting: train is stale because of its config; the rest waits on its outputs.
    rows = _status(copy, "training.learning_rate=0.005")
    assert rows["train"].startswith("stale") and "config" in rows["train"]
    # An output changed on disk: named as such.
    q8 = tiny(copy).gguf("Q8_0")
    q8.write_bytes(q8.read_bytes()[:-1])
    assert _status(copy)["quantize"].startswith("stale")
    # A stage whose manifest is gone but whose log is there failed; without a log it is missing.
    tiny(copy).manifest(names.SMOKE).unlink()
    assert _status(copy)["smoke"].startswith("failed")
    tiny(copy).log(names.SMOKE).unlink()
    assert _status(copy)["smoke"].startswith("missing")
