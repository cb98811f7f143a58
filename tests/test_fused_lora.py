"""training.fused_lora computes what peft's 4-bit LoRA layer computes: the same outputs and the same
gradients (input, lora_A, lora_B) on a tiny real model loaded in NF4 on the CPU, within float32 rounding;
and it leaves the cases it does not fuse (dropout) to peft."""

from __future__ import annotations

import pytest

from stages.common import fused_lora

torch = pytest.importorskip("torch")


def _qlora(model_dir, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"}
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "gate_proj"])
    model = get_peft_model(model, lora)
    model.train()  # in eval mode bnb repacks 4-bit weights for CPU inference, a path left to peft
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give it values so the LoRA path is exercised
            p.data.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


def test_fused_lora_matches_peft(tiny_mistral):
    model = _qlora(tiny_mistral, dropout=0.0)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_a, logits_a, grads_a = _loss_and_grads(model, ids)
    assert fused_lora.apply(model) == 6  # 3 target modules x 2 layers
    loss_b, logits_b, grads_b = _loss_and_grads(model, ids)
    assert torch.allclose(logits_a, logits_b, rtol=1e-4, atol=1e-4)
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 12
    for name, g in grads_a.items():
        rel = (grads_b[name] - g).norm() / g.norm()
        assert rel < 1e-4, f"{name}: relative difference {rel:.2e}"


def test_fused_lora_leaves_dropout_to_peft(tiny_mistral):
    model = _qlora(tiny_mistral, dropout=0.1)
    fused_lora.apply(model)
    called = []
    original = fused_lora.LoRA4bitMatmul.apply
    fused_lora.LoRA4bitMatmul.apply = lambda *a: called.append(1) or original(*a)
    try:
        model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        fused_lora.LoRA4bitMatmul.apply = original
    assert not called
