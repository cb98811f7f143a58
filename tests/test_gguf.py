"""GGUF stages on real models: convert, quantize and smoke entry points, and the GGUF runtime.

Tiny (seconds): the tiny random Mistral (SentencePiece) from conftest stands in for a merged
checkpoint; the stages run on it in-process, through their main().
Demo (minutes, @pytest.mark.demo): the prepared SmolLM2-135M-Instruct checkpoint, the same way.

Tolerances (stated here, asserted below):
- f16 GGUF in llama.cpp vs the HF model in float32, tiny Mistral: max |Δlogit| <= 2.5e-2 × the
  HF logits' max magnitude on every sequence (measured: 0.6e-2 to 1.0e-2; f16 weights and f16
  activations in llama.cpp's matmuls), and the same argmax at >= 99% of positions (measured 100%).
- Demo, top-1 next-token agreement with the HF model in float32 over held-out positions: f16 >= 99%,
  Q8_0 >= 97% (measured on the base checkpoint: 100% and 98.3%). Each distinct context is counted
  once: every held-out row starts with the same default system prompt, and counting that prefix
  once per row would weight its two near-ties (logit margins 0.1) twelve times each.
- Bits per weight (tensor data): Q8_0 is 8.5 plus the f32 norms; Q4_K_M lies between 4 and Q8_0
  (on a 64-wide model every k-quant tensor falls back to a 32-block type, so it is not 4.89).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_models import WORDS, corpus

from stages import convert, quantize, smoke
from stages.common import llamacpp, names
from stages.common.artifacts import read_manifest, stage_output
from stages.common.chat_template import check_parity
from stages.common.errors import EXIT_STAGE_ERROR, StageError
from stages.common.gguf_runtime import GGUFModel, complete, parse_completion, read_gguf
from stages.common.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
LOGIT_TOL = 2.5e-2
ANSWER = "yes yes"  # what the stopping model below learns to say, then EOS


# --- Helpers ---------------------------------------------------------------------------------


def make_run(root: Path, checkpoint: Path, run_name: str, **sections) -> tuple[Path, Path]:
    """A run folder whose merge output is `checkpoint` (committed with a real manifest), and its config."""
    run_dir = root / "runs" / run_name
    with stage_output(run_dir, names.MERGE, owned=(names.MERGED_DIR,)) as out:
        shutil.copytree(checkpoint, out.path(RunLayout(run_dir, run_name).merged), dirs_exist_ok=True)
        out.commit(inputs={"checkpoint": str(checkpoint)})
    tree = {
        "run_name": run_name,
        "model": {"name_or_path": str(checkpoint)},
        "data": {"train_files": [str(root / "unused.jsonl")]},
        **sections,
        # No adapter here (the checkpoint stands for the merge output): no LoRA GGUF; no held-out
        # rows, so no conversion check (tests/test_e2e_tiny.py runs it).
        "gguf": {"lora_adapter": False, **sections.get("gguf", {})},
        "report": {"enabled": False, **sections.get("report", {})},
    }
    cfg_path = root / f"{run_name}.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    return cfg_path, run_dir


def run(stage, cfg_path: Path, run_dir: Path, *overrides: str) -> int:
    sets = [a for o in overrides for a in ("--set", o)]
    return stage.main(["--config", str(cfg_path), "--run-dir", str(run_dir), *sets])


def one_line(err: str) -> str:
    """stderr with the console's line wrapping (80 columns when not a terminal) undone."""
    return " ".join(err.split())


def texts(n: int, seed: int) -> list[str]:
    lines = corpus(4 * n, seed=seed)
    return [" ".join(lines[4 * i : 4 * i + 4]) for i in range(n)]


def teach_to_stop(base: Path, out_dir: Path, steps: int = 40) -> Path:
    """Fine-tune the tiny model in full to answer every "[INST] ... [/INST]" with ANSWER, then EOS
    (measured: loss 2e-4 after 40 steps, and the answer on 5 of 5 unseen prompts in HF)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(base, out_dir)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        prompt = f"[INST] {' '.join(rng.choices(WORDS, k=rng.randint(1, 6)))} [/INST]"
        n_prompt, full = len(tok(prompt).input_ids), tok(f"{prompt} {ANSWER}").input_ids
        assert full[:n_prompt] == tok(prompt).input_ids
        rows.append(([*full, tok.eos_token_id], n_prompt))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.eos_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (seq, n_prompt) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    # One thread: a 64-wide model gains nothing from more, and where other processes share the
    # cores two threads ran 10x slower (6 s vs 58 s for 150 steps on the 2-core host).
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05, f"the tiny model did not learn to stop (loss {loss.item():.3f})"
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# --- Tiny Mistral: convert, quantize ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_mistral, llama_cpp_built):
    root = tmp_path_factory.mktemp("gguf-tiny")
    cfg_path, run_dir = make_run(
        root,
        tiny_mistral,
        "tiny",
        gguf={"outtype": "f16", "quant_types": ["Q8_0", "Q4_K_M"]},
        smoke={"prompts": ["the model learns"], "quant_type": "Q8_0", "max_tokens": 4},
    )
    assert run(convert, cfg_path, run_dir) == 0
    assert run(quantize, cfg_path, run_dir) == 0
    return cfg_path, run_dir, tiny_mistral


def layout(run_dir: Path) -> RunLayout:
    return RunLayout(run_dir, run_dir.name)  # make_run puts each run at runs/<run_name>


def test_convert_manifest_metadata_and_special_tokens(tiny_run):
    from transformers import AutoTokenizer

    _, run_dir, checkpoint = tiny_run
    m = read_manifest(run_dir, names.CONVERT)
    assert m[names.M_LLAMA_CPP]["commit"] == llamacpp.COMMIT
    assert sorted(m[names.M_OUTPUTS]) == ["gguf/chat_parity.json", "gguf/tiny.f16.gguf"]
    assert m[names.M_METRICS]["file_type"] == "MOSTLY_F16"
    assert 16.0 <= m[names.M_METRICS]["bits_per_weight"] < 16.2  # f16 matrices, f32 norms

    info = read_gguf(layout(run_dir).gguf("f16"))
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert info.get("general.name") == "tiny"
    assert info.get("general.basename") == checkpoint.name
    assert info.get("general.base_model.0.name") == checkpoint.name
    assert info.get("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert info.get("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert info.get("tokenizer.ggml.add_bos_token") is (tok("a").input_ids[0] == tok.bos_token_id)
    assert info.get("tokenizer.chat_template") == tok.chat_template


def test_convert_refuses_a_gguf_whose_eos_is_not_the_models(tiny_run, tmp_path):
    _, run_dir, checkpoint = tiny_run
    wrong = tmp_path / "wrong-eos"
    shutil.copytree(checkpoint, wrong)
    for name in ("config.json", "generation_config.json"):
        tree = json.loads((wrong / name).read_text())
        tree["eos_token_id"] = 7
        (wrong / name).write_text(json.dumps(tree))
    with pytest.raises(StageError, match=r"eos_token_id is 2, but the merged model declares EOS \[7\]"):
        convert.check_special_tokens(read_gguf(layout(run_dir).gguf("f16")), wrong)


CONVERSATION = [
    {"role": "user", "content": "repeat c"},
    {"role": "assistant", "content": "c c"},
    {"role": "user", "content": "dates 1 2"},
]


def test_tokenization_and_chat_template_match_hf(tiny_run):
    from transformers import AutoTokenizer

    _, run_dir, checkpoint = tiny_run
    # The checkpoint's own tokenizer, legacy like Mistral's v1 (mistral-common writes "<s> [INST]":
    # "▁" after a control token, as llama.cpp does).
    tok = AutoTokenizer.from_pretrained(checkpoint)
    # No sample starts with a space: there HF's fast (Metaspace) tokenizer adds no "▁" dummy prefix
    # while SentencePiece itself and llama.cpp do, a known HF difference, not a conversion error.
    samples = [*texts(3, seed=7), "digits 2024 07 31", "bytes outside the vocab: é ☃ 🙂", "two  spaces\n\nnew line"]
    with GGUFModel(layout(run_dir).gguf("f16"), n_ctx=256) as gguf:
        for text in samples:
            assert gguf.tokenize(text) == tok(text).input_ids, text
        rendered = gguf.chat_prompt(CONVERSATION)
        got = gguf.prompt_tokens(rendered)
    assert rendered == tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert got == tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got.count(tok.bos_token_id) == 1
    assert tok.convert_ids_to_tokens(got[1])[0] == "▁"  # "<s> [INST]", not "<s>[INST]"


def test_convert_checked_chat_template_parity(tiny_run):
    """The convert stage's own parity check ran on the fixed, smoke and held-out conversations."""
    _, run_dir, _ = tiny_run
    parity = json.loads(layout(run_dir).chat_parity.read_text())
    assert parity["checked"] and len(parity["conversations"]) == 2  # the fixed ones: no smoke messages here
    assert parity["hf"] == parity["gguf"] == {"eos_token_id": 2, "bos_token_id": 1, "add_bos": True}
    assert all(c["bos"] == 1 for c in parity["conversations"])


def test_non_legacy_tokenizer_fails_parity_with_the_first_differing_token(tiny_run, tmp_path):
    """transformers' non-legacy SentencePiece writes no "▁" after <s>; llama.cpp does. A model
    saved that way would see another prompt in llama.cpp: convert's check must say so."""
    from transformers import LlamaTokenizer

    _, run_dir, checkpoint = tiny_run
    other = tmp_path / "nonlegacy"
    shutil.copytree(checkpoint, other)
    LlamaTokenizer.from_pretrained(checkpoint, legacy=False).save_pretrained(other)
    with GGUFModel(layout(run_dir).gguf("f16"), n_ctx=256) as gguf, pytest.raises(StageError, match="from token 1 on"):
        check_parity(other, gguf, [CONVERSATION])


def test_f16_logits_match_hf_float32(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, checkpoint = tiny_run
    tok = AutoTokenizer.from_pretrained(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    same = total = 0
    with GGUFModel(layout(run_dir).gguf("f16"), n_ctx=256, logits_all=True) as gguf:
        for text in texts(4, seed=123):
            ids = tok(text).input_ids
            with torch.no_grad():
                want = hf(torch.tensor([ids])).logits[0].numpy()
            got = gguf.logits(ids)
            rel = np.abs(got - want).max() / np.abs(want).max()
            assert rel <= LOGIT_TOL, f"max |Δlogit| = {rel:.4f} × max |logit| on {len(ids)} tokens"
            same += int((got.argmax(-1) == want.argmax(-1)).sum())
            total += len(ids)
    assert total >= 200
    assert same / total >= 0.99, f"argmax agrees at {same}/{total}"


def test_quantized_files_sizes_and_bits_per_weight(tiny_run):
    _, run_dir, _ = tiny_run
    m = read_manifest(run_dir, names.QUANTIZE)
    assert m[names.M_LLAMA_CPP]["commit"] == llamacpp.COMMIT
    types = m[names.M_METRICS]["types"]
    assert set(types) == {"Q8_0", "Q4_K_M"}
    for kind, meta in types.items():
        path = layout(run_dir).gguf(kind)
        assert meta["size_bytes"] == path.stat().st_size == m[names.M_OUTPUTS][f"gguf/{path.name}"][names.M_SIZE]
        assert read_gguf(path).bits_per_weight == pytest.approx(meta["bits_per_weight"], abs=1e-3)
    assert types["Q8_0"]["file_type"] == "MOSTLY_Q8_0"
    assert types["Q4_K_M"]["file_type"] == "MOSTLY_Q4_K_M"
    assert 8.5 <= types["Q8_0"]["bits_per_weight"] < 8.7
    assert 4.0 < types["Q4_K_M"]["bits_per_weight"] < types["Q8_0"]["bits_per_weight"]
    assert layout(run_dir).gguf("f16").stat().st_size > types["Q8_0"]["size_bytes"] > types["Q4_K_M"]["size_bytes"]


def test_unknown_quant_type_fails_before_any_work(tmp_path, tiny_mistral, capsys):
    cfg_path, run_dir = make_run(tmp_path, tiny_mistral, "badq", gguf={"quant_types": ["Q4_K_M", "Q4_K_X"]})
    assert run(quantize, cfg_path, run_dir) == EXIT_STAGE_ERROR
    err = one_line(capsys.readouterr().err)
    assert "'Q4_K_X' is not a quant type" in err and "Q8_0" in err  # names the bad one and the valid ones
    assert "convert" not in err  # refused before looking for the f16 file
    assert not layout(run_dir).gguf_dir.exists()


# --- Smoke -----------------------------------------------------------------------------------


def test_smoke_fails_when_the_model_never_stops(tiny_run, capsys):
    cfg_path, run_dir, _ = tiny_run
    assert run(smoke, cfg_path, run_dir) == EXIT_STAGE_ERROR
    err = one_line(capsys.readouterr().err)
    assert "no EOS within 4 tokens for 'the model learns'" in err
    assert not layout(run_dir).manifest(names.SMOKE).exists()
    assert not layout(run_dir).smoke.exists()
    assert not list(run_dir.glob(f"{names.TMP_PREFIX}*"))


@pytest.fixture(scope="module")
def stopping_run(tmp_path_factory, tiny_mistral, llama_cpp_built):
    root = tmp_path_factory.mktemp("gguf-stop")
    checkpoint = teach_to_stop(tiny_mistral, root / "stops")
    cfg_path, run_dir = make_run(
        root,
        checkpoint,
        "stops",
        gguf={"outtype": "f16", "quant_types": ["Q8_0"]},
        smoke={"prompts": ["[INST] colours and animals [/INST]"], "messages": ["dates 1 2 3"], "max_tokens": 8},
    )
    assert run(convert, cfg_path, run_dir) == 0
    assert run(quantize, cfg_path, run_dir) == 0
    return cfg_path, run_dir


def test_smoke_passes_when_the_model_answers_and_stops(stopping_run):
    cfg_path, run_dir = stopping_run
    assert run(smoke, cfg_path, run_dir) == 0
    answers = read_manifest(run_dir, names.SMOKE)[names.M_METRICS]["answers"]
    assert [(a["kind"], a["output"].strip(), a["stopped_at_eos"]) for a in answers] == [
        ("prompt", ANSWER, True),
        ("message", ANSWER, True),  # rendered with the GGUF's own [INST] template
    ]
    assert json.loads(layout(run_dir).smoke.read_text())["answers"] == answers


@pytest.mark.parametrize("which", ["stops", "rambles"])
def test_llama_completion_parse_agrees_with_token_level_eos(which, stopping_run, tiny_run):
    """The binary's " [end of text]" line and the bindings' token-level EOG test give the same verdict
    and the same greedy text, on a model that stops and on one that does not."""
    run_dir = stopping_run[1] if which == "stops" else tiny_run[1]
    path = layout(run_dir).gguf("Q8_0")
    prompt = "[INST] numbers and places [/INST]"
    cli = complete(path, prompt=prompt, max_tokens=8)
    with GGUFModel(path, n_ctx=256) as gguf:
        ref = gguf.generate(gguf.prompt_tokens(prompt), 8)
    assert cli.stopped_at_eos is ref.stopped_at_eos is (which == "stops")
    assert cli.text == ref.text
    if which == "stops":  # llama.cpp's own Jinja engine renders the GGUF's template to the same effect
        turn = complete(path, message="numbers and places", max_tokens=8)
        assert (turn.text.strip(), turn.stopped_at_eos) == (ANSWER, True)


def test_parse_completion():
    assert parse_completion("yes yes [end of text]\n\n\n") == ("yes yes", True)
    assert parse_completion("it goes on\n\n") == ("it goes on", False)
    assert parse_completion(" [end of text]\n\n\n") == ("", True)


# --- Demo model: SmolLM2-135M-Instruct, prepared by stages/prepare.py ------------------------

SMOLLM2 = ROOT / "cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, llama_cpp_built):
    if not (SMOLLM2 / "model.safetensors").is_file():
        pytest.skip(f"{SMOLLM2} is not prepared; run `python -m stages.prepare --config configs/demo.yaml`")
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    root = tmp_path_factory.mktemp("gguf-demo")
    cfg_path, run_dir = make_run(
        root,
        SMOLLM2,
        "smol",
        # The demo's own GGUF settings (f16 token embeddings: its output layer is tied to them).
        gguf={**demo["gguf"], "quant_types": ["Q8_0", "Q4_K_M"]},
        # Questions the base model answers briefly; the demo's own smoke message is for the fine-tuned
        # model (tests/test_demo.py): the base rambles about it for 58 of the 64 tokens allowed.
        smoke={
            "messages": ["What is 2 + 2?", "Write one word: yes or no."],
            "quant_type": "Q4_K_M",
            "max_tokens": demo["smoke"]["max_tokens"],
        },
    )
    assert run(convert, cfg_path, run_dir) == 0
    assert run(quantize, cfg_path, run_dir) == 0
    return cfg_path, run_dir


@pytest.fixture(scope="module")
def demo_reference(demo_run):
    """Held-out rows of the demo data, their token ids and the HF float32 logits' argmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.prepare import demo_dates_rows

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    hf = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    rows = demo_dates_rows(16, seed=1235)  # the first rows of the demo's held-out split (prepare: seed + 1)
    seqs = [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in rows]
    with torch.no_grad():
        want = [hf(torch.tensor([ids])).logits[0].argmax(-1).numpy() for ids in seqs]
    return seqs, want


def distinct_positions(seqs: list[list[int]]) -> list[np.ndarray]:
    """Per sequence, the positions whose context no earlier sequence already had."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for ids in seqs:
        keep = [i for i in range(len(ids)) if tuple(ids[: i + 1]) not in seen]
        seen.update(tuple(ids[: i + 1]) for i in range(len(ids)))
        out.append(np.array(keep, dtype=int))
    return out


@pytest.mark.demo
@pytest.mark.parametrize(("kind", "floor"), [("f16", 0.99), ("Q8_0", 0.97)])
def test_demo_top1_agreement_with_hf(demo_run, demo_reference, kind, floor):
    _, run_dir = demo_run
    seqs, want = demo_reference
    same = total = 0
    with GGUFModel(layout(run_dir).gguf(kind), n_ctx=512, logits_all=True) as gguf:
        for ids, ref, keep in zip(seqs, want, distinct_positions(seqs), strict=True):
            got = gguf.logits(ids).argmax(-1)
            same += int((got[keep] == ref[keep]).sum())
            total += len(keep)
    print(f"{kind}: top-1 agreement {same}/{total} = {same / total:.2%}")
    assert total >= 200
    assert same / total >= floor, f"{kind}: {same}/{total}"


@pytest.mark.demo
def test_demo_smoke_passes_on_q4_k_m(demo_run):
    cfg_path, run_dir = demo_run
    assert run(smoke, cfg_path, run_dir) == 0
    smoke_manifest = read_manifest(run_dir, names.SMOKE)
    assert smoke_manifest["inputs"]["gguf"] == "smol.Q4_K_M.gguf"
    assert all(a["stopped_at_eos"] and a["output"].strip() for a in smoke_manifest[names.M_METRICS]["answers"])


@pytest.mark.demo
def test_demo_chat_tokens_and_special_tokens_match_hf(demo_run):
    """SmolLM2 (BPE, ChatML template with a default system prompt): the GGUF's template, rendered and
    tokenized by llama.cpp's rules, gives HF's apply_chat_template ids; its special tokens are HF's."""
    from transformers import AutoTokenizer

    _, run_dir = demo_run
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    info = read_gguf(layout(run_dir).gguf("Q4_K_M"))
    assert info.get("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert info.get("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert info.get("tokenizer.ggml.add_bos_token") is (tok("a").input_ids[0] == tok.bos_token_id)
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [
            {"role": "system", "content": "Answer with the date only."},
            {"role": "user", "content": "Rewrite in ISO 8601: March 7, 2021"},
            {"role": "assistant", "content": "2021-03-07"},
            {"role": "user", "content": "And the 4th of July, 1999?"},
        ],
    ]
    with GGUFModel(layout(run_dir).gguf("Q4_K_M"), n_ctx=512) as gguf:
        for conversation in conversations:
            want = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert gguf.prompt_tokens(gguf.chat_prompt(conversation)) == want
