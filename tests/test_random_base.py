"""benchmarks/random_base.py writes a 4-bit checkpoint layer by layer that transformers loads like one
it quantized and saved itself: same keys, same shapes, no weight left uninitialised, and the weights
dequantize to the drawn distribution. Tiny shapes, on the CPU (bitsandbytes' CPU backend)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from random_base import STD, quant_config, tiny_config, write_prequantized  # noqa: E402


def test_prequantized_base_loads_like_a_quantized_save(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ours = write_prequantized(tmp_path / "ours", tiny_config(), device="cpu")
    model, info = AutoModelForCausalLM.from_pretrained(
        ours, quantization_config=quant_config(), device_map={"": "cpu"}, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    # The reference: a bf16 checkpoint of the same shapes quantized and saved by transformers.
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=quant_config(),
                                               device_map={"": "cpu"})  # fmt: skip
    ref.save_pretrained(tmp_path / "ref")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ref", device_map={"": "cpu"})
    ours_sd, ref_sd = model.state_dict(), reloaded.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    # (the packed quant-state JSON differs only in the digits of its float offset)
    same = [ours_sd[k].shape == ref_sd[k].shape or k.endswith("__nf4") for k in ref_sd]
    assert all(same) and all(ours_sd[k].dtype == ref_sd[k].dtype for k in ref_sd)

    from bitsandbytes.functional import dequantize_4bit

    q = model.model.layers[1].mlp.down_proj.weight
    w = dequantize_4bit(q.data, q.quant_state)
    assert w.shape == (128, 256)
    assert abs(float(w.float().std()) - STD) < 0.2 * STD
    model.train()
    loss = model(input_ids=torch.tensor([[1, 5, 9, 30]]), labels=torch.tensor([[1, 5, 9, 30]])).loss
    assert torch.isfinite(loss)
