"""The merge stage against peft, on tiny models built here and adapters made with peft itself.

Bound asserted (stated in docs/merge.md): every merged tensor is bit-identical to peft's
``PeftModel.from_pretrained(base loaded in D).merge_and_unload()`` for D in float16 and bfloat16
(0 ulp), for plain LoRA, rsLoRA, rank/alpha patterns, modules_to_save, LoRA on embeddings,
fan_in_fan_out and DoRA. Tied embeddings are the one deliberate difference: when the adapter
changes one of the pair, the stage unties them, so the untouched one stays the base's (asserted
below), where peft's in-place merge changes both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import merge
from stages.common import merge_checks, merge_plan, merge_write, names
from stages.common.artifacts import read_manifest
from stages.common.layout import RunLayout

# peft warns about tied embeddings in adapters; those cases are what the tied tests are about.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VARIANTS = {
    "lora": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
    "rslora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True, r=8, lora_alpha=16),
    "patterns": dict(
        target_modules=["q_proj", "k_proj", "down_proj"],
        rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 8},
        alpha_pattern={"down_proj": 3, "layers.0.self_attn.q_proj": 32},
    ),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
    "dora": dict(target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    "dora_embedding": dict(target_modules=["embed_tokens", "o_proj"], use_dora=True),
}
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # Conv1D layers, stored (in, out)


# --- Tiny models and adapters ------------------------------------------------------------------


def build_tiny_llama_tied(out_dir: Path) -> Path:
    """A Llama with tied input/output embeddings (like SmolLM2), bf16 on disk, SentencePiece tokenizer."""
    import torch
    from tiny_models import train_sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out_dir.mkdir(parents=True)
    train_sentencepiece(out_dir)
    tok = LlamaTokenizer.from_pretrained(out_dir, legacy=False)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(3)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_tiny_gpt2(out_dir: Path) -> Path:
    """GPT-2 keeps its projections in Conv1D, (in, out): peft needs fan_in_fan_out=True for them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)
    GPT2LMHeadModel(cfg).save_pretrained(out_dir)
    return out_dir


def make_adapter(base: Path, out: Path, seed: int = 1, **lora) -> Path:
    """A random adapter as training leaves it: B != 0, DoRA magnitudes and saved modules moved off the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **lora}
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype: str) -> dict:
    """The reference: what peft's merge_and_unload gives for the base loaded in `dtype`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_all(folder: Path) -> dict:
    from stages.common.safetensors_io import CheckpointReader

    with CheckpointReader(folder) as reader:
        return {k: reader.get(k) for k in reader.names()}


def run_merge(base: Path, adapter: Path, out: Path, *extra: str) -> int:
    return merge.main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), *extra])


def assert_bit_identical(ours: dict, ref: dict, skip_ref: set[str] = frozenset()) -> None:
    import torch

    assert set(ref) - set(ours) <= set(skip_ref), f"missing from ours: {set(ref) - set(ours) - set(skip_ref)}"
    assert set(ours) <= set(ref), f"not in peft's model: {set(ours) - set(ref)}"
    differ = [k for k in ours if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k], ref[k])]
    assert not differ, f"{len(differ)} tensors differ from peft, first: {differ[:3]}"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_mistral):
    root = tmp_path_factory.mktemp("merge-models")
    return {
        "mistral": tiny_mistral,
        "llama_tied": build_tiny_llama_tied(root / "llama-tied"),
        "gpt2": build_tiny_gpt2(root / "gpt2"),
    }


@pytest.fixture(scope="module")
def adapter_for(tmp_path_factory, models):
    """adapter_for(model, name, **lora): build once per module, reuse across tests."""
    root = tmp_path_factory.mktemp("merge-adapters")
    made: dict[str, Path] = {}

    def get(model: str, name: str, **lora) -> Path:
        if name not in made:
            made[name] = make_adapter(models[model], root / name, **lora)
        return made[name]

    return get


# --- Exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bit_identical_to_peft(variant, dtype, models, adapter_for, tmp_path):
    adapter = adapter_for("mistral", variant, **VARIANTS[variant])
    assert run_merge(models["mistral"], adapter, tmp_path / "out", "--dtype", dtype) == 0
    assert_bit_identical(read_all(tmp_path / "out"), peft_merged(models["mistral"], adapter, dtype))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == dtype


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fan_in_fan_out_gpt2(dora, models, adapter_for, tmp_path):
    lora = dict(target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_dora=dora)
    adapter = adapter_for("gpt2", f"gpt2-fifo-{dora}", **lora)
    assert run_merge(models["gpt2"], adapter, tmp_path / "out") == 0
    # GPT-2 ties lm_head to wte and its checkpoint stores wte only; the adapter touches neither.
    assert_bit_identical(
        read_all(tmp_path / "out"), peft_merged(models["gpt2"], adapter, "float16"), {"lm_head.weight"}
    )


def test_adapter_copy_of_embedding_base_is_used(models, adapter_for, tmp_path):
    """peft saves embed_tokens.base_layer.weight with an embedding LoRA (vocabularies get resized);
    loading the adapter puts it into the model, so the merge must start from it, not the base."""
    import torch
    from safetensors.torch import load_file, save_file

    src = adapter_for("mistral", "embedding", **VARIANTS["embedding"])
    adapter = tmp_path / "adapter"
    shutil.copytree(src, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key] + 0.05 * torch.randn_like(tensors[key])
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    assert run_merge(models["mistral"], adapter, tmp_path / "out") == 0
    assert_bit_identical(read_all(tmp_path / "out"), peft_merged(models["mistral"], adapter, "float16"))


def test_bf16_base_cast_to_fp16_exact(models, adapter_for, tmp_path):
    """A bf16 checkpoint merged to fp16: the cast happens before the merge, as in from_pretrained(dtype=fp16)."""
    adapter = adapter_for("llama_tied", "tied-untouched", target_modules=["q_proj", "gate_proj"])
    assert run_merge(models["llama_tied"], adapter, tmp_path / "out", "--dtype", "float16") == 0
    ours = read_all(tmp_path / "out")
    assert "lm_head.weight" not in ours  # untouched tied pair stays tied, one tensor on disk
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert_bit_identical(ours, peft_merged(models["llama_tied"], adapter, "float16"), {"lm_head.weight"})


# --- Tied embeddings ---------------------------------------------------------------------------


def test_tied_saved_head_matches_peft(models, adapter_for, tmp_path):
    """modules_to_save=lm_head on a tied model: peft unties too; every tensor equal."""
    adapter = adapter_for("llama_tied", "tied-saved-head", target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert run_merge(models["llama_tied"], adapter, tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert_bit_identical(read_all(tmp_path / "out"), peft_merged(models["llama_tied"], adapter, "float16"))


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_tied_lora_unties_and_keeps_base_plus_adapter(target, models, adapter_for, tmp_path):
    """LoRA on one of a tied pair: the changed tensor equals peft's, the other one stays the base's,
    and the merged model computes what base + adapter computed (verify runs the whole model)."""
    import torch
    from safetensors.torch import load_file

    adapter = adapter_for("llama_tied", f"tied-lora-{target}", target_modules=[target, "q_proj"])
    out = tmp_path / "out"
    assert (
        run_merge(models["llama_tied"], adapter, out, "--verify", "full", "--metrics-json", str(tmp_path / "m.json"))
        == 0
    )
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ours, ref = read_all(out), peft_merged(models["llama_tied"], adapter, "float16")
    changed = "model.embed_tokens.weight" if target == "embed_tokens" else "lm_head.weight"
    other = "lm_head.weight" if target == "embed_tokens" else "model.embed_tokens.weight"
    assert torch.equal(ours[changed], ref[changed])
    base_embed = load_file(models["llama_tied"] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(ours[other], base_embed.to(torch.float16))
    assert not torch.equal(ref[other], base_embed.to(torch.float16)), "peft changes both tied tensors"
    verify = json.loads((tmp_path / "m.json").read_text())["verify"]
    assert verify["passed"] and verify["mode"] == "full"


# --- Verification -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_verify_full_logits(dtype, models, adapter_for, tmp_path):
    adapter = adapter_for("mistral", "dora", **VARIANTS["dora"])
    metrics = tmp_path / "m.json"
    assert (
        run_merge(
            models["mistral"], adapter, tmp_path / "out", "--dtype", dtype, "--verify", "--metrics-json", str(metrics)
        )
        == 0
    )
    v = json.loads(metrics.read_text())["verify"]
    assert v["mode"] == "full" and v["passed"]
    assert v["max_rel_logit_diff"] <= merge_checks.LOGIT_TOL[dtype]
    assert v["top1_agreement"] >= 0.95


@pytest.mark.parametrize(
    ("model", "variant", "lora"),
    [
        ("mistral", "patterns", VARIANTS["patterns"]),
        ("mistral", "dora", VARIANTS["dora"]),
        ("mistral", "dora_embedding", VARIANTS["dora_embedding"]),
        ("mistral", "embedding", VARIANTS["embedding"]),
        (
            "gpt2",
            "gpt2-fifo-True",
            dict(target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_dora=True),
        ),
    ],
)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_verify_layers_within_rounding_bound(model, variant, lora, dtype, models, adapter_for, tmp_path):
    """The large-model check, run on a tiny model: every sampled layer within its rounding bound."""
    adapter = adapter_for(model, variant, **lora)
    metrics = tmp_path / "m.json"
    assert (
        run_merge(
            models[model],
            adapter,
            tmp_path / "out",
            "--dtype",
            dtype,
            "--verify",
            "layers",
            "--metrics-json",
            str(metrics),
        )
        == 0
    )
    v = json.loads(metrics.read_text())["verify"]
    assert v["mode"] == "layers" and v["passed"] and v["untouched_exact"]
    assert 0 < v["max_bound_ratio"] <= 1.0
    assert v["modules"]


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_verify_catches_a_wrong_merge(mode, models, adapter_for, tmp_path, monkeypatch, capsys):
    """A merge that is off by 1% of the delta must fail verification and publish nothing."""
    adapter = adapter_for("mistral", "lora", **VARIANTS["lora"])
    real = merge_plan.merge_linear

    def off(weight, a, b, scaling, fan_in_fan_out, magnitude=None):
        return real(weight, a, b, scaling * 1.01, fan_in_fan_out, magnitude)

    monkeypatch.setattr(merge_plan, "merge_linear", off)
    out = tmp_path / "out"
    assert run_merge(models["mistral"], adapter, out, "--verify", mode) == 2
    assert "--verify failed" in " ".join(capsys.readouterr().err.split())
    assert not out.exists() and not list(tmp_path.glob(f"{names.TMP_PREFIX}*"))


# --- Onto the NF4-dequantized base ---------------------------------------------------------------


def bnb_dequantized(base: Path) -> dict:
    """What bitsandbytes gives the adapter in QLoRA training: the loaded 4-bit weights, dequantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=q, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    return {
        f"{n}.weight": F.dequantize_4bit(m.weight.data, m.weight.quant_state)
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_onto_dequantized_is_exact(dtype, models, adapter_for, tmp_path):
    """Onto dequantized = the weights bitsandbytes trained against (every quantized Linear, no others),
    then the same peft arithmetic: bit-identical to peft merging onto those weights."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = models["mistral"]
    adapter = adapter_for("mistral", "lora", **VARIANTS["lora"])
    out = tmp_path / "out"
    assert (
        run_merge(
            base, adapter, out, "--dtype", dtype, "--onto", "dequantized", "--metrics-json", str(tmp_path / "m.json")
        )
        == 0
    )
    dq = bnb_dequantized(base)
    ours = read_all(out)
    original = load_file(base / "model.safetensors")
    changed = {k for k in ours if not torch.equal(ours[k], original[k].to(getattr(torch, dtype)))}
    assert changed == set(dq), "exactly the bitsandbytes-quantized weights change"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for key, w in dq.items():
            model.get_parameter(key).data = w.to(getattr(torch, dtype))
    ref = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    assert_bit_identical(ours, ref)
    assert json.loads((tmp_path / "m.json").read_text())["tensors_dequantized"] == len(dq)


def test_compare_onto_reports_logit_difference(models, adapter_for, tmp_path):
    adapter = adapter_for("mistral", "lora", **VARIANTS["lora"])
    metrics = tmp_path / "m.json"
    assert (
        run_merge(models["mistral"], adapter, tmp_path / "out", "--compare-onto", "--metrics-json", str(metrics)) == 0
    )
    c = json.loads(metrics.read_text())["compare_onto"]
    assert c["mode"] == "full" and c["this"] == "original" and c["other"] == "dequantized"
    assert 0 < c["mean_abs_logit_diff"] <= c["max_abs_logit_diff"]
    assert 0.0 <= c["top1_agreement"] <= 1.0


def test_compare_onto_layers_mode(models, adapter_for, tmp_path, monkeypatch):
    """Beyond the whole-model size the comparison is per layer; force that path on the tiny model."""
    monkeypatch.setattr(merge_checks, "FULL_CHECK_MAX_BYTES", 0)
    adapter = adapter_for("mistral", "lora", **VARIANTS["lora"])
    metrics = tmp_path / "m.json"
    args = ("--onto", "dequantized", "--compare-onto", "--verify", "--metrics-json", str(metrics))
    assert run_merge(models["mistral"], adapter, tmp_path / "out", *args) == 0
    m = json.loads(metrics.read_text())
    assert m["verify"]["mode"] == "layers" and m["verify"]["passed"]
    c = m["compare_onto"]
    assert c["mode"] == "layers" and c["modules"] and 0 < c["mean_rel_output_diff"] < 1


# --- Output format -------------------------------------------------------------------------------


def test_sharded_output_with_index_and_side_files(models, adapter_for, tmp_path):
    """Shards bounded by --shard-size, an index naming every tensor, config/generation/tokenizer files,
    and transformers loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_for("mistral", "lora", **VARIANTS["lora"])
    out = tmp_path / "out"
    assert run_merge(models["mistral"], adapter, out, "--shard-size", "0.0001") == 0  # 100 kB shards
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    assert set(index["weight_map"]) == set(model.state_dict())
    assert AutoTokenizer.from_pretrained(out)("repeat a").input_ids


# --- Bad input: one line, exit 2, nothing at the output -----------------------------------------


def expect_failure(capsys, out: Path, rc: int, *fragments: str) -> str:
    # rich wraps long lines at 80 columns when stderr is not a terminal; the message is one line before that.
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2
    assert err.count("✗ merge") == 1, err
    line = err.split("✗ merge", 1)[1]
    for fragment in fragments:
        assert fragment in line, err
    assert not out.exists()
    assert not list(out.parent.glob(f"{names.TMP_PREFIX}{out.name}*"))
    return line


def test_not_an_adapter(models, tmp_path, capsys):
    folder = tmp_path / "nope"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    expect_failure(capsys, out, run_merge(models["mistral"], folder, out), "is not a PEFT adapter", "notes.txt")


def test_adapter_for_another_base_lists_mismatches(models, tmp_path, capsys):
    from tiny_models import build_tiny_mistral

    other = build_tiny_mistral(tmp_path / "other", hidden=32, layers=3)
    adapter = make_adapter(other, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    rc = run_merge(models["mistral"], adapter, out)
    expect_failure(
        capsys,
        out,
        rc,
        "does not fit the base",
        "model.layers.0.self_attn.q_proj.weight: base [64, 64], adapter B[32, 4] @ A[4, 32]",
        "model.layers.2.self_attn.q_proj.weight: not in the base checkpoint",
    )


def test_pickled_adapter_refused(models, adapter_for, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_for("mistral", "lora", **VARIANTS["lora"]), adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    out = tmp_path / "out"
    expect_failure(capsys, out, run_merge(models["mistral"], adapter, out), "pickled adapter", "refusing")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("peft_type", "IA3", "not LORA"),
        ("lora_bias", True, "lora_bias"),
        ("init_lora_weights", "pissa", "residual model"),
        ("use_dora", False, "use_dora is False"),
    ],
)
def test_unsupported_adapters_refused(key, value, message, models, adapter_for, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_for("mistral", "dora", **VARIANTS["dora"]), adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    expect_failure(capsys, out, run_merge(models["mistral"], adapter, out), message)


def test_quantized_base_refused(models, adapter_for, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(models["mistral"], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    rc = run_merge(base, adapter_for("mistral", "lora", **VARIANTS["lora"]), out)
    expect_failure(capsys, out, rc, "quantized checkpoint")


def test_existing_output_refused(models, adapter_for, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc = run_merge(models["mistral"], adapter_for("mistral", "lora", **VARIANTS["lora"]), out)
    assert rc == 2 and "exists" in capsys.readouterr().err
    assert out.is_dir() and not any(out.iterdir())


def test_not_enough_disk(models, adapter_for, tmp_path, capsys, monkeypatch):
    import shutil as sh

    from stages.common import artifacts

    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    out = tmp_path / "out"
    rc = run_merge(models["mistral"], adapter_for("mistral", "lora", **VARIANTS["lora"]), out)
    expect_failure(capsys, out, rc, "not enough disk")


def test_crash_mid_write_leaves_nothing(models, adapter_for, tmp_path, monkeypatch):
    real, calls = merge_write.build_tensor, []

    def flaky(plan, key, onto=None):
        calls.append(key)
        if len(calls) == 7:
            raise MemoryError("simulated")
        return real(plan, key, onto)

    monkeypatch.setattr(merge_write, "build_tensor", flaky)
    out = tmp_path / "out"
    with pytest.raises(MemoryError):
        run_merge(models["mistral"], adapter_for("mistral", "lora", **VARIANTS["lora"]), out)
    assert not out.exists() and not list(tmp_path.glob(f"{names.TMP_PREFIX}*"))


def test_cli_error_is_one_line(models, tmp_path):
    """Through the real command line: exit 2, one line on stderr, no traceback."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.merge", "--base", models["mistral"], "--adapter", tmp_path, "--output", out],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "COLUMNS": "500"},  # rich wraps at 80 columns when not on a terminal
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    failures = [ln for ln in proc.stderr.splitlines() if "✗ merge" in ln]
    assert len(failures) == 1 and "is not a PEFT adapter" in failures[0]
    assert not out.exists()


# --- Pipeline mode ------------------------------------------------------------------------------


def pipeline_run(tmp_path: Path, base: Path, adapter: Path, **merge_cfg) -> tuple[Path, Path]:
    import yaml

    from stages.common.pipeline import import_adapter

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_name": "t",
                "model": {"name_or_path": str(base)},
                "data": {"train_files": [str(tmp_path / "unused.jsonl")]},
                "merge": {"dtype": "float16", **merge_cfg},
            }
        )
    )
    run_dir = tmp_path / "runs" / "t"
    import_adapter(run_dir, adapter)  # writes the train manifest the merge checks first
    return cfg, run_dir


def test_pipeline_mode_writes_manifest(models, adapter_for, tmp_path):
    cfg, run_dir = pipeline_run(tmp_path, models["mistral"], adapter_for("mistral", "dora", **VARIANTS["dora"]))
    assert merge.main(["--config", str(cfg), "--run-dir", str(run_dir)]) == 0
    manifest = read_manifest(run_dir, names.MERGE)
    assert manifest[names.M_INPUTS]["train_manifest_sha256"]
    (base_files,) = manifest[names.M_INPUTS]["base_fingerprint"].values()
    assert "config.json" in base_files and any(f.endswith(".safetensors") for f in base_files)
    metrics = manifest[names.M_METRICS]
    assert metrics["tensors_lora_merged"] == 6 and metrics["peak_rss_gib"] > 0 and metrics["wall_s"] > 0
    layout = RunLayout(run_dir, "t")
    assert any(k.startswith(f"{layout.rel(layout.merged)}/model") for k in manifest[names.M_OUTPUTS])
    assert_bit_identical(read_all(layout.merged), peft_merged(models["mistral"], layout.adapter, "float16"))


def test_pipeline_mode_onto_dequantized_and_damaged_adapter(models, adapter_for, tmp_path, capsys):
    cfg, run_dir = pipeline_run(
        tmp_path, models["mistral"], adapter_for("mistral", "lora", **VARIANTS["lora"]), onto="dequantized"
    )
    assert merge.main(["--config", str(cfg), "--run-dir", str(run_dir)]) == 0
    metrics = read_manifest(run_dir, names.MERGE)[names.M_METRICS]
    assert metrics["tensors_dequantized"] > 0
    # A damaged train output is caught before anything is read, and the old merge output stays whole.
    with (RunLayout(run_dir, "t").adapter / "adapter_model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\1")
    assert merge.main(["--config", str(cfg), "--run-dir", str(run_dir)]) == 2
    assert "does not match its manifest" in " ".join(capsys.readouterr().err.split())
    assert read_manifest(run_dir, names.MERGE) is not None


# --- Slower: memory bound and llama.cpp ---------------------------------------------------------


@pytest.mark.e2e
def test_memory_stays_bounded(tmp_path):
    """The merge's write adds at most 4 × its largest tensor plus the adapter to the RSS it started
    from, both read by the stage in its own process (VmRSS before, VmHWM reset and read after); on a
    ~0.27B model (530 MB bf16) that bound is a fifth of the model, so RSS cannot follow model size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_merge", Path(__file__).parents[1] / "benchmarks" / "merge.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "results"
    argv = ["--size", "small", "--reference", "no", "--workdir", str(tmp_path / "w"), "--results", str(results)]
    assert bench.main(argv) == 0
    (result,) = [json.loads(p.read_text()) for p in results.glob("*.json")]
    m = result["ours"]["stage_metrics"]
    assert m["write_peak_rss_gib"] is not None, "the kernel refused to reset VmHWM (/proc/self/clear_refs)"
    grew = (m["write_peak_rss_gib"] - m["rss_start_gib"]) * 2**30
    bound = 4 * m["largest_tensor_bytes"] + m["adapter_bytes"]
    assert 0 < grew <= bound, (grew, bound)
    assert bound < 0.25 * result["model"]["base_bytes"]


@pytest.mark.e2e
def test_llama_cpp_converts_untied_output(models, adapter_for, tmp_path):
    """llama.cpp's converter reads the merged checkpoint, untied head included (output.weight)."""
    from stages.common import llamacpp

    script = llamacpp.src_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip("pinned llama.cpp source not fetched; run `invoke llama-cpp`")
    gguf = pytest.importorskip("gguf")
    adapter = adapter_for("llama_tied", "tied-lora-embed_tokens", target_modules=["embed_tokens", "q_proj"])
    out = tmp_path / "merged"
    assert run_merge(models["llama_tied"], adapter, out) == 0
    target = tmp_path / "m.gguf"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), "--outfile", str(target), "--outtype", "f16"],
        env=llamacpp.tool_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    tensors = {t.name for t in gguf.GGUFReader(target).tensors}
    assert {"token_embd.weight", "output.weight"} <= tensors
