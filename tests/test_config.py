"""Config validation: typed, loud on mistakes, overrides beat the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.common.config import EvalConfig, ReportConfig, load_config
from stages.common.config_tree import parse_overrides
from stages.common.errors import StageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def minimal() -> dict:
    return {"run_name": "r", "model": {"name_or_path": "m"}, "data": {"train_files": ["d.jsonl"]}}


@pytest.mark.parametrize("name", ["demo.yaml", "mistral-7b-guanaco.yaml"])
def test_shipped_configs_validate(name):
    load_config(CONFIGS / name)


def test_reference_recipe_values():
    cfg = load_config(CONFIGS / "mistral-7b-guanaco.yaml")
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-Instruct-v0.1"
    q, lo, t = cfg.quantization, cfg.lora, cfg.training
    assert (q.quant_type, q.double_quant, q.compute_dtype) == ("nf4", True, "bfloat16")
    assert (lo.r, lo.alpha, lo.dropout, lo.bias) == (64, 16, 0.1, "none")
    assert lo.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
    assert (t.optim, t.learning_rate, t.weight_decay, t.max_grad_norm) == ("paged_adamw_8bit", 2e-4, 0.001, 0.3)
    assert (t.warmup_ratio, t.lr_scheduler, t.batch_size, t.epochs, t.group_by_length) == (0.03, "constant", 4, 1, True)
    assert (t.save_steps, t.logging_steps, cfg.data.text_field, cfg.merge.dtype) == (25, 25, "text", "float16")
    assert cfg.gguf.outtype == "f16" and cfg.gguf.quant_types == ["Q4_K_M", "Q5_K_M", "Q8_0"]
    assert cfg.smoke.prompts == ["[INST] What is QLoRA? [/INST]"]


def test_unknown_key_names_nearest(tmp_path):
    tree = minimal() | {"training": {"learning_rat": 1e-4}}
    with pytest.raises(
        StageError, match=r"unknown key 'training\.learning_rat'; did you mean 'training\.learning_rate'"
    ):
        load_config(write(tmp_path, tree))


def test_unknown_section(tmp_path):
    with pytest.raises(StageError, match=r"unknown key 'trainig'; did you mean 'training'"):
        load_config(write(tmp_path, minimal() | {"trainig": {}}))


def test_missing_key(tmp_path):
    tree = minimal()
    del tree["model"]
    with pytest.raises(StageError, match="missing key 'model'"):
        load_config(write(tmp_path, tree))


def test_fp16_with_4bit_is_rejected_with_reason(tmp_path):
    tree = minimal() | {"training": {"fp16": True, "bf16": False}}
    with pytest.raises(StageError, match="fp16 with 4-bit training is rejected: fp16's narrow range"):
        load_config(write(tmp_path, tree))
    tree = minimal() | {"quantization": {"compute_dtype": "float16"}}
    with pytest.raises(StageError, match="fp16 with 4-bit"):
        load_config(write(tmp_path, tree))


def test_overrides_are_typed_and_beat_the_file(tmp_path):
    path = write(tmp_path, minimal() | {"training": {"learning_rate": 1e-3}})
    cfg = load_config(path, ["training.learning_rate=1e-4", "lora.target_modules=[q_proj]", "training.packing=true"])
    assert cfg.training.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.training.packing is True
    assert parse_overrides(["a.b=3"]) == [("a.b", 3)]
    with pytest.raises(StageError, match="is not KEY=VALUE"):
        load_config(path, ["training.learning_rate"])


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(StageError, match=r"training\.batch_size"):
        load_config(write(tmp_path, minimal()), ["training.batch_size=many"])


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_run_name_cannot_escape_runs(tmp_path, name):
    with pytest.raises(StageError, match="run_name"):
        load_config(write(tmp_path, minimal() | {"run_name": name}))


def test_missing_file_is_one_line():
    with pytest.raises(StageError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_quant_type_cross_checks(tmp_path):
    tree = minimal() | {"eval": {"exact_match": True, "quant_type": "Q6_K"}}
    with pytest.raises(StageError, match="eval.quant_type 'Q6_K' is not among gguf.quant_types"):
        load_config(write(tmp_path, tree))


def test_fsdp_needs_several_gpus_and_a_shardable_optimizer(tmp_path):
    tree = minimal() | {"training": {"fsdp": True}}
    with pytest.raises(StageError, match="training.fsdp shards the model over several GPUs"):
        load_config(write(tmp_path, tree))
    # Measured on an H200: bitsandbytes' 8-bit update fails on FSDP's DTensor shards at step 1.
    tree = minimal() | {"training": {"fsdp": True, "gpus": 2, "optim": "paged_adamw_8bit"}}
    with pytest.raises(StageError, match="does not take FSDP's DTensor shards"):
        load_config(write(tmp_path, tree))
    tree["training"]["optim"] = "adamw_torch"
    assert load_config(write(tmp_path, tree)).training.fsdp


@pytest.mark.parametrize("name", ["24gb", "12gb"])
def test_profiles_apply_to_the_reference_recipe_and_set_beats_them(name):
    from stages.common.profiles import PROFILES, profile_overrides

    cfg = load_config(CONFIGS / "mistral-7b-guanaco.yaml", profile_overrides(name))
    batch = next(int(o.split("=")[1]) for o in PROFILES[name] if o.startswith("training.batch_size="))
    t = cfg.training
    assert (t.batch_size, t.gradient_checkpointing, t.liger_kernel) == (batch, True, True)
    later = load_config(CONFIGS / "mistral-7b-guanaco.yaml", [*profile_overrides(name), "training.batch_size=2"])
    assert later.training.batch_size == 2


def test_unknown_profile_names_the_known_ones():
    from stages.common.profiles import profile_overrides

    with pytest.raises(StageError, match="unknown profile '99gb'; expected one of 24gb, 12gb or auto"):
        profile_overrides("99gb")


def test_invoke_refuses_an_unknown_profile_in_one_line():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "pipeline", "--profile", "99gb", "--runtime", "local"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown profile '99gb'; expected one of 24gb, 12gb or auto"


def test_report_and_eval_budgets_scale_with_model_size():
    """135M models are scored on everything the caps allow; 7B ones on what 2 cores do in minutes."""
    cfg = ReportConfig()
    assert cfg.chunks_for(134_515_008) == 58 and cfg.chunks_for(7_380_000_000) == 2
    assert ReportConfig(max_chunks=8).chunks_for(134_515_008) == 8
    assert EvalConfig().examples_for(134_515_008) == 100 and EvalConfig().examples_for(7_380_000_000) == 40
    assert EvalConfig().examples_for(70_000_000_000) == 10  # never fewer than 10 rows
