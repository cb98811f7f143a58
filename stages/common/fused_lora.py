"""One autograd function for a QLoRA layer (frozen 4-bit base + LoRA, no dropout): training.fused_lora.

peft's 4-bit LoRA forward runs the base layer, clones its output ("defensively", peft's comment), runs
lora_A and lora_B, multiplies by the scaling and adds: three extra passes over the layer's output,
and autograd adds the base and LoRA input gradients in another pass. Here the LoRA product is added
inside the base product's GEMM (addmm with alpha = scaling), and in backward the LoRA input gradient
is accumulated into the base one the same way: the same arithmetic (one bf16 rounding fewer), fewer
kernels and memory passes. benchmarks/train_throughput.py measures it (profile 24gb vs 24gb-fused,
the per-step losses of both in one result); docs/multi-gpu.md has the figures.

Only the plain case is fused: one active adapter, dropout 0, no DoRA, no bias, not merged; any other
call goes to peft's own forward.
"""

from __future__ import annotations

import types

import torch


class LoRA4bitMatmul(torch.autograd.Function):
    """y = x W^T + scale (x A^T) B^T with W dequantized from NF4/FP4; all operands in one dtype."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale: float):
        from bitsandbytes.functional import dequantize_4bit

        x2 = x.reshape(-1, x.shape[-1])
        w = dequantize_4bit(weight, weight.quant_state).to(x.dtype)
        y = torch.mm(x2, w.t())
        xa = torch.mm(x2, lora_a.t())
        y.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, lora_a, lora_b)
        ctx.weight, ctx.scale, ctx.x_shape = weight, scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from bitsandbytes.functional import dequantize_4bit

        x2, xa, lora_a, lora_b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dyb = torch.mm(dy2, lora_b)  # (tokens, r)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            w = dequantize_4bit(ctx.weight, ctx.weight.quant_state).to(x2.dtype)
            dx = torch.mm(dy2, w).addmm_(dyb, lora_a, alpha=ctx.scale).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            da = torch.mm(dyb.t(), x2).mul_(ctx.scale)
        if ctx.needs_input_grad[3]:
            db = torch.mm(dy2.t(), xa).mul_(ctx.scale)
        return dx, None, da, db, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (
        args
        or kwargs
        or name is None
        or self.disable_adapters
        or self.merged
        or name not in self.lora_A
        or name in self.lora_variant
        or not isinstance(self.lora_dropout[name], torch.nn.Identity)
        or self.base_layer.bias is not None
        or getattr(self.base_layer.weight.quant_state, "packing_format_for_cpu", False)  # bnb's CPU inference layout
    ):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    fix_4bit_weight_quant_state_from_module(base)  # FSDP hands the layer a gathered plain tensor
    dtype = base.compute_dtype or x.dtype
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    y = LoRA4bitMatmul.apply(x.to(dtype), base.weight, a.to(dtype), b.to(dtype), float(self.scaling[name]))
    return y.to(x.dtype)


def apply(model: torch.nn.Module) -> int:
    """Route every peft 4-bit LoRA layer of `model` through LoRA4bitMatmul; returns how many."""
    from peft.tuners.lora.bnb import Linear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
