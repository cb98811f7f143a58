"""Merge planning: what each output tensor of a merge is made of, decided before any weight is read.

    plan = make_plan(base_dir, adapter_dir, MergeConfig(...), QuantizationConfig(...))
    tensor = build_tensor(plan, key)   # one merged output tensor, in the output dtype

`make_plan` fails cheaply on everything it can (inputs, the adapter's fit, the architecture);
`build_tensor` applies peft's merge arithmetic (lora_math.py) to one tensor at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stages.common.config import MergeConfig, QuantizationConfig
from stages.common.errors import StageError
from stages.common.lora_math import (
    EMBEDDING,
    Adapter,
    QuantSpec,
    check_fit,
    load_adapter,
    merge_embedding,
    merge_linear,
    quant_roundtrip,
)
from stages.common.model import check_weights
from stages.common.safetensors_io import BY_TORCH_NAME, CheckpointReader, FormatError, TensorInfo


@dataclass
class Plan:
    base_dir: Path
    base: CheckpointReader
    adapter: Adapter
    dtype: str
    onto: str
    quant: QuantSpec  # how training quantized the base; used onto dequantized and by --compare-onto
    config: dict[str, Any]  # the output config.json
    outputs: list[TensorInfo] = field(default_factory=list)  # in write order
    source: dict[str, str] = field(default_factory=dict)  # output key -> base key, where they differ (untied)
    quantized: set[str] = field(default_factory=set)  # base keys bitsandbytes quantizes (dequantized mode)
    keep_fp32: tuple[str, ...] = ()  # module names transformers keeps in float32 at any dtype
    untied: list[str] = field(default_factory=list)

    @property
    def out_bytes(self) -> int:
        return sum(i.nbytes for i in self.outputs)

    @property
    def param_count(self) -> int:
        return sum(i.numel for i in self.outputs)

    def out_dtype(self, key: str) -> str:
        return "float32" if any(f".{m}." in f".{key}" for m in self.keep_fp32) else self.dtype

    def changed(self, key: str) -> bool:
        return self.adapter.touches(key) or self.adapter.touches(self.source.get(key, key))


@dataclass(frozen=True)
class Architecture:
    """What the model class says about the checkpoint (read from a weightless 'meta' model)."""

    tied: dict[str, str]  # output embedding key -> input embedding key, when tied
    keep_fp32: tuple[str, ...]
    quantized: frozenset[str] | None  # None: not computed (original mode) or unknown


def quant_spec(quant: QuantizationConfig) -> QuantSpec:
    return QuantSpec(quant.quant_type, quant.double_quant, quant.compute_dtype)


def inspect_architecture(base_dir: Path, config: dict[str, Any], quant: QuantSpec | None, remote: bool) -> Architecture:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=remote)
    except Exception as exc:  # an architecture this transformers does not know: fall back to the usual names
        if quant is not None:
            raise StageError(
                f"cannot build model type {config.get('model_type')!r} to find the layers bitsandbytes quantizes "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); merge --onto original"
            ) from None
        tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.get("tie_word_embeddings") else {}
        return Architecture(tied, (), None)
    tied = dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    keep = tuple(sorted(set(model._keep_in_fp32_modules or []) | set(model._keep_in_fp32_modules_strict or [])))
    quantized = None
    if quant is not None:
        quantized = frozenset(_bnb_quantized_weights(model, quant))
    return Architecture(tied, keep, quantized)


def _bnb_quantized_weights(model, quant: QuantSpec) -> list[str]:
    """The weights transformers hands to bitsandbytes for this model: the same skip list and the
    same Linear replacement its 4-bit quantizer applies, run on the weightless model."""
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
    )
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qcfg)
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def make_plan(
    base_dir: Path,
    adapter_dir: Path,
    merge: MergeConfig,
    quant: QuantizationConfig,
    *,
    compare: bool = False,
    remote: bool = False,
) -> Plan:
    """Everything that can fail cheaply fails here: inputs, fit, architecture; no weights are read."""
    if merge.onto == "dequantized" and not quant.load_in_4bit:
        raise StageError("merge.onto=dequantized needs quantization.load_in_4bit=true: the adapter saw no 4-bit base")
    check_weights(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise StageError(
            f"{base_dir} is a quantized checkpoint ({method}); the merge needs the 16/32-bit base weights the "
            "adapter was trained on (QLoRA quantizes them at load time): point --base at those"
        )
    adapter = load_adapter(adapter_dir)
    try:
        base = CheckpointReader(base_dir)
    except (FormatError, KeyError, json.JSONDecodeError) as exc:
        raise StageError(
            f"{base_dir}: unreadable safetensors checkpoint ({exc}); re-download or re-export it"
        ) from None
    need_quantized = merge.onto == "dequantized" or compare
    if need_quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise StageError(
                "--onto dequantized and --compare-onto need bitsandbytes (it reproduces the 4-bit round trip), "
                "which this environment lacks; pip install bitsandbytes, or merge --onto original"
            ) from None
    spec = quant_spec(quant)
    arch = inspect_architecture(base_dir, config, spec if need_quantized else None, remote)

    available = dict(base.info)
    plan = Plan(base_dir, base, adapter, merge.dtype, merge.onto, spec, config)
    plan.keep_fp32 = arch.keep_fp32
    for target, src in arch.tied.items():
        if target not in base and src in base:
            available[target] = replace(base.info[src], name=target)
    check_fit(adapter, available)

    # Tied embeddings: one tensor on disk serves two modules. When the adapter changes either, both
    # are written and the config unties them, so each keeps what base+adapter computed with it.
    extra: dict[str, str] = {}
    for target, src in arch.tied.items():
        if src in base and (adapter.touches(target) or adapter.touches(src)):
            plan.untied.append(target)
            if target not in base:
                extra[src] = target
                plan.source[target] = src
    if plan.untied:
        config["tie_word_embeddings"] = False

    for key, info in base.info.items():
        plan.outputs.append(_out_info(plan, key, info))
        if key in extra:
            plan.outputs.append(_out_info(plan, extra[key], replace(info, name=extra[key])))

    if need_quantized:
        if not arch.quantized:
            raise StageError(f"found no layer that bitsandbytes would quantize in {base_dir}; merge --onto original")
        plan.quantized = set(arch.quantized) & set(base.info)
    return plan


def _out_info(plan: Plan, key: str, info: TensorInfo) -> TensorInfo:
    if key in plan.adapter.replace:
        info = plan.adapter.reader.info[plan.adapter.replace[key]]
    if not info.is_float:
        return replace(info, name=key)
    st_dtype = BY_TORCH_NAME[plan.out_dtype(key)][0]
    return TensorInfo(key, st_dtype, info.shape)


# --- One tensor --------------------------------------------------------------------------------


def base_weight(plan: Plan, key: str, onto: str | None = None):
    """The weight the merge of `key` starts from: the base tensor (or the adapter's saved copy of it),
    4-bit round-tripped onto dequantized, cast to the output dtype; non-float tensors as stored."""
    import torch

    ad = plan.adapter
    src = plan.source.get(key, key)
    override = ad.base_override.get(key) or ad.base_override.get(src)
    weight = ad.reader.get(override) if override else plan.base.get(src)
    if not weight.is_floating_point():
        return weight
    if (onto or plan.onto) == "dequantized" and src in plan.quantized:
        weight = quant_roundtrip(weight, plan.quant)
    return weight.to(getattr(torch, plan.out_dtype(key)))


def build_tensor(plan: Plan, key: str, onto: str | None = None):
    """Output tensor `key`: its base weight with the adapter merged in, or the adapter's
    modules_to_save copy, in the output dtype."""
    import torch

    ad = plan.adapter
    if key in ad.replace:  # modules_to_save: the trained copy replaces the module
        return ad.reader.get(ad.replace[key]).to(getattr(torch, plan.out_dtype(key)))
    weight = base_weight(plan, key, onto)
    target = ad.targets.get(key)
    if target is None or not weight.is_floating_point():
        return weight
    a, b = ad.reader.get(target.a), ad.reader.get(target.b)
    magnitude = ad.reader.get(target.magnitude) if target.magnitude else None
    if target.kind == EMBEDDING:
        return merge_embedding(weight, a, b, target.scaling, magnitude)
    return merge_linear(weight, a, b, target.scaling, ad.fan_in_fan_out, magnitude)
