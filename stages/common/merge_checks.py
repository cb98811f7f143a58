"""Merge checks: is the merged checkpoint base + adapter (--verify), and how far apart are the two
--onto choices (--compare-onto)?

    stats |= run_checks(plan, out_dir, verify="auto", compare=True)

Up to FULL_CHECK_MAX_BYTES of float32 weights the whole model's logits are compared; beyond, sampled
layers are, which keeps the merge's memory bound. A failed --verify raises StageError, so nothing
is published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common.errors import StageError, console
from stages.common.lora_math import EMBEDDING, quant_roundtrip
from stages.common.merge_plan import Plan, base_weight, build_tensor
from stages.common.safetensors_io import CheckpointReader

VERIFY = ("auto", "full", "layers")
# Whole-model checks load the model in float32; beyond this they would break the memory bound.
FULL_CHECK_MAX_BYTES = 1 << 30
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer:",
    "def fibonacci(n):\n    return",
    "[INST] Explain low-rank adaptation in one sentence. [/INST]",
)
# Merged-vs-unmerged logits, whole model in float32: only the merged weights' rounding to the output
# dtype differs (docs/merge.md, Measured).
LOGIT_TOL = {"float16": 2e-2, "bfloat16": 1e-1}
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}
HALF_SUBNORMAL = {"float16": 2.0**-25, "bfloat16": 2.0**-134, "float32": 2.0**-150}
LAYER_SAMPLE = 16


def run_checks(plan: Plan, out_dir: Path, verify: str | None, compare: bool) -> dict[str, Any]:
    """The checks asked for, as metrics: {"verify": ..., "compare_onto": ...} (absent when not run)."""
    found: dict[str, Any] = {}
    if verify == "auto":
        verify = "full" if whole_model_fits(plan) else "layers"
    if verify == "full":
        found["verify"] = verify_full(plan, out_dir)
    elif verify == "layers":
        found["verify"] = verify_layers(plan, out_dir)
    if compare:
        found["compare_onto"] = compare_onto(plan, out_dir)
    return found


def whole_model_fits(plan: Plan) -> bool:
    return plan.param_count * 4 <= FULL_CHECK_MAX_BYTES


def _quiet_transformers() -> None:
    """The checks load whole models; their per-tensor loading bars would drown the stage's own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _prompt_ids(model_dir: Path, vocab: int) -> list[list[int]]:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = [tok(p).input_ids for p in PROMPTS]
        if all(ids) and max(max(i) for i in ids) < vocab:
            return ids
    except Exception:  # no usable tokenizer: random token ids exercise the weights just as well
        pass
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (24,), generator=gen).tolist() for _ in PROMPTS]


def _logits(model, prompts: list[list[int]]):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float() for ids in prompts]


def _dequantize_in_place(model, plan: Plan) -> None:
    import torch

    with torch.no_grad():
        for key in plan.quantized:
            param = model.get_parameter(key)
            param.data = quant_roundtrip(param.data, plan.quant).to(param.dtype)


def verify_full(plan: Plan, out_dir: Path) -> dict[str, Any]:
    """Logits of the merged checkpoint vs peft's unmerged base+adapter, both in float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    base = AutoModelForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32)
    if plan.onto == "dequantized":
        _dequantize_in_place(base, plan)
    prompts = _prompt_ids(out_dir, base.config.vocab_size)
    ref = PeftModel.from_pretrained(base, plan.adapter.folder).eval()
    want = _logits(ref, prompts)
    del ref, base
    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    got = _logits(merged, prompts)
    rel = max(float((w - g).abs().max() / w.abs().max()) for w, g in zip(want, got, strict=True))
    agree = sum(int((w.argmax(-1) == g.argmax(-1)).sum()) for w, g in zip(want, got, strict=True))
    positions = sum(len(p) for p in prompts)
    tol = LOGIT_TOL[plan.dtype]
    result = {
        "mode": "full",
        "checks": f"logits of {len(prompts)} prompts ({positions} positions), merged vs peft base+adapter, float32",
        "max_rel_logit_diff": rel,
        "tolerance": tol,
        "top1_agreement": agree / positions,
        "passed": rel <= tol,
    }
    console.print(
        f"verify (whole model): max |Δlogit| = {rel:.2e} of the logit range (tolerance {tol:g}), "
        f"top-1 agreement {agree}/{positions}"
    )
    if not result["passed"]:
        raise StageError(
            f"--verify failed: merged logits differ from base+adapter by {rel:.2e} of their range "
            f"(tolerance {tol:g}); the merged checkpoint was not published"
        )
    return result


def sample_layers(keys: list[str], limit: int = LAYER_SAMPLE) -> list[str]:
    """The keys of the first, middle and last layer, plus keys outside numbered layers (embeddings, head)."""
    import re

    layer_of = {k: int(m.group(1)) for k in keys if (m := re.search(r"\.(\d+)\.", k))}
    layers = sorted(set(layer_of.values()))
    pick = {layers[0], layers[len(layers) // 2], layers[-1]} if layers else set()
    return [k for k in keys if k not in layer_of or layer_of[k] in pick][:limit]


def _row_chunks(n: int, step: int = 2048):
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def check_layer(plan: Plan, merged: CheckpointReader, key: str, onto: str | None = None) -> dict[str, float]:
    """One merged target against W x + scale * B (A x) in float64, with its rounding bound.

    Bound per output element i (u: unit roundoff of the output dtype, eta: its half subnormal step,
    e32 = 2^-24): |W' x - ref|_i <= (u + e32)(1 + 2u) (|W'| |x|)_i + (r + 2) e32 * s (|B| (|A| |x|))_i
    + eta * sum|x|, plus, for DoRA, (n + 8) e32 (|W'| |x|)_i for its float32 norm over n inputs.
    Embeddings round the delta first, which adds u (|delta| |x|)_i. Holding it everywhere means the
    merged tensor is W + scale * B A to within the rounding of the output dtype, nothing more.
    """
    import torch

    ad = plan.adapter
    t = ad.targets[key]
    f64 = torch.float64
    dt = plan.out_dtype(key)
    base = base_weight(plan, key, onto)
    out = merged.get(key)
    a, b = ad.reader.get(t.a).to(f64), ad.reader.get(t.b).to(f64)
    mag = ad.reader.get(t.magnitude).to(f64) if t.magnitude else None
    u, eta, e32 = UNIT_ROUNDOFF[dt], HALF_SUBNORMAL[dt], 2.0**-24
    s = t.scaling
    gen = torch.Generator().manual_seed(0)
    worst, rel_err = 0.0, 0.0
    if t.kind == EMBEDDING:
        # An embedding's output for a token is its row: check sampled rows elementwise. Rows of the
        # delta are computed from the factors, so the check never holds a whole float64 embedding.
        def delta_rows(rows):
            return s * (a[:, rows].T @ b.T)

        ids = torch.randperm(base.shape[0], generator=gen)[:256]
        d = delta_rows(ids)
        ref = base[ids].to(f64) + d
        if mag is not None:  # DoRA normalises each embedding dimension over the whole vocabulary
            sq = torch.zeros(base.shape[1], dtype=f64)
            for rows in _row_chunks(base.shape[0]):
                sq += ((base[rows].to(f64) + delta_rows(rows)) ** 2).sum(0)
            ref = ref * (mag / sq.sqrt()).view(1, -1)
        got = out[ids].to(f64)
        bound = 2 * u * (1 + 2 * u) * (got.abs() + d.abs()) + 2 * eta
        bound += (t.rank + 2) * e32 * s * (a[:, ids].abs().T @ b.abs().T)
        if mag is not None:
            bound += (base.shape[0] + 8) * e32 * got.abs()
        err = (got - ref).abs()
        return {"max_ratio": float((err / bound).max()), "rel_err": float(err.max() / ref.abs().max())}
    # Linear: view the stored weight as (out, in).
    w_view = base.T if ad.fan_in_fan_out else base
    o_view = out.T if ad.fan_in_fan_out else out
    n_out, n_in = w_view.shape
    x = torch.randn(n_in, 4, generator=gen, dtype=f64)
    ax = a @ x  # (r, 4)
    abs_ax = a.abs() @ x.abs()
    for rows in _row_chunks(n_out):
        w = w_view[rows].to(f64)
        o = o_view[rows].to(f64)
        ref = w @ x + s * (b[rows] @ ax)
        if mag is not None:
            norm = torch.linalg.norm(w + s * (b[rows] @ a), dim=1)
            ref = ref * (mag[rows] / norm).view(-1, 1)
        got = o @ x
        wx = o.abs() @ x.abs()
        bound = (u + e32) * (1 + 2 * u) * wx + (t.rank + 2) * e32 * s * (b[rows].abs() @ abs_ax)
        bound += eta * x.abs().sum(0)
        if mag is not None:
            bound += (n_in + 8) * e32 * wx
        err = (got - ref).abs()
        worst = max(worst, float((err / bound).max()))
        rel_err = max(rel_err, float(err.max() / ref.abs().max()))
    return {"max_ratio": worst, "rel_err": rel_err}


def verify_layers(plan: Plan, out_dir: Path) -> dict[str, Any]:
    """Sampled merged layers against base + adapter, plus exact copies of untouched tensors nearby."""
    import torch

    keys = sample_layers(list(plan.adapter.targets))
    results = {}
    with CheckpointReader(out_dir) as merged:
        for key in keys:
            results[key] = check_layer(plan, merged, key)
        # Untouched tensors next to the sampled ones must be plain casts of the base.
        copies = [k for k in merged.names() if not plan.changed(k) and any(k.rsplit(".", 2)[0] in s for s in keys)]
        copies = copies[:LAYER_SAMPLE] or [k for k in merged.names() if not plan.changed(k)][:4]
        exact = all(torch.equal(merged.get(k), build_tensor(plan, k)) for k in copies)
    worst = max((r["max_ratio"] for r in results.values()), default=0.0)
    result = {
        "mode": "layers",
        "checks": (
            f"{len(keys)} merged target weights (first/middle/last layer) against W x + scale * B (A x) "
            f"in float64 within the output dtype's rounding bound; {len(copies)} untouched tensors bit-equal "
            "to the base cast; whole-model logits not computed (model too large for the memory bound)"
        ),
        "modules": results,
        "max_bound_ratio": worst,
        "untouched_exact": exact,
        "passed": worst <= 1.0 and exact,
    }
    console.print(
        f"verify (per layer, {len(keys)} modules): worst error = {worst:.2f} × rounding bound; "
        f"untouched tensors exact: {exact}"
    )
    if not result["passed"]:
        bad = max(results, key=lambda k: results[k]["max_ratio"]) if results else "untouched tensors"
        raise StageError(
            f"--verify failed at {bad}: merged layer output exceeds its rounding bound ({worst:.2f}×) "
            "or an untouched tensor changed; the merged checkpoint was not published"
        )
    return result


def compare_onto(plan: Plan, out_dir: Path) -> dict[str, Any]:
    """How much the choice of --onto moves the model: this output vs the other choice's merge."""
    other = "original" if plan.onto == "dequantized" else "dequantized"
    run = compare_onto_full if whole_model_fits(plan) else compare_onto_layers
    result = run(plan, out_dir, other)
    result["this"], result["other"] = plan.onto, other
    return result


def compare_onto_full(plan: Plan, out_dir: Path, other: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    prompts = _prompt_ids(out_dir, model.config.vocab_size)
    this = _logits(model, prompts)
    with torch.no_grad():  # only the 4-bit-quantized weights differ between the two choices
        for key in sorted(plan.quantized):
            model.get_parameter(key).data = build_tensor(plan, key, other).float()
    that = _logits(model, prompts)
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(this, that, strict=True)])
    positions = sum(len(p) for p in prompts)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(this, that, strict=True))
    result = {
        "mode": "full",
        "checks": f"logits of {len(prompts)} prompts ({positions} positions), whole model in float32",
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "logit_range": max(float(a.abs().max()) for a in this),
        "top1_agreement": agree / positions,
    }
    console.print(
        f"onto {plan.onto} vs {other}: max |Δlogit| {result['max_abs_logit_diff']:.3f}, "
        f"mean {result['mean_abs_logit_diff']:.4f} (logits up to {result['logit_range']:.1f}); "
        f"top-1 agreement {agree}/{positions}"
    )
    return result


def compare_onto_layers(plan: Plan, out_dir: Path, other: str) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    rel = {}
    with CheckpointReader(out_dir) as merged:
        for key in sample_layers(sorted(plan.quantized, key=list(plan.base.info).index)):
            mine = merged.get(key).double()
            theirs = build_tensor(plan, key, other).double()
            x = torch.randn(mine.shape[1], 4, generator=gen, dtype=torch.float64)
            rel[key] = float(((mine - theirs) @ x).norm() / (mine @ x).norm())
            del mine, theirs
    mean = sum(rel.values()) / len(rel) if rel else None
    console.print(
        f"onto {plan.onto} vs {other}, per layer ({len(rel)} modules; whole-model logits would break the memory "
        f"bound at this size): mean relative output difference {mean or 0:.2e}"
    )
    return {
        "mode": "layers",
        "checks": (
            "||(W_this - W_other) x|| / ||W_this x|| for random x, sampled quantized layers; "
            "whole-model logits not computed (model too large for the memory bound)"
        ),
        "modules": rel,
        "mean_rel_output_diff": mean,
    }
