"""A PEFT LoRA adapter on disk, and the merge arithmetic of peft's ``merge_and_unload``, tensor by tensor.

Reference: peft 0.21.2, ``peft/tuners/lora/layer.py`` (``Linear.merge``/``get_delta_weight``,
``Embedding.merge``/``get_delta_weight``) and ``variants.py``/``dora.py`` (DoRA). The functions
below repeat its operations in the same order, on the same dtypes and memory layouts, so a merged
tensor is bit-identical to what ``PeftModel.from_pretrained(base in D).merge_and_unload()`` gives on
the same torch build (D = float16 or bfloat16). What peft does, and so what is done here:

- adapter tensors saved in 16 bits are upcast to float32 on load (``autocast_adapter_dtype=True``);
- Linear: ``delta = transpose(B @ A, fan_in_fan_out) * scaling`` in float32, then ``W += delta``
  in place on the D weight: one rounding, from the float32 sum, to D;
- Embedding: ``delta = (B @ A).T * scaling`` in float32, cast to D *first*, then ``W += delta``:
  two roundings (peft's ``Embedding.merge`` has the ``.to(orig_dtype)`` that ``Linear.merge`` lacks);
- DoRA: ``W' = (m / ||W + delta||) * (W + delta)`` in float32 with the norm of the unmerged
  weight, one rounding to D;
- ``modules_to_save`` tensors are copied into the D module (one rounding), and a
  ``*.base_layer.weight`` saved with the adapter (peft saves embeddings it may have resized)
  replaces the base tensor before the merge, as loading the adapter does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.errors import StageError
from stages.common.safetensors_io import CheckpointReader, FormatError, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
PREFIX = "base_model.model."

LINEAR, EMBEDDING = "linear", "embedding"

# Adapter config switches whose layers this merge does not reproduce; the message says why.
UNSUPPORTED: dict[str, str] = {
    "lora_bias": "LoRA on biases (lora_bias=True)",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which peft cannot merge either",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication (it changes the architecture)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
}
# Initialisations that rewrite the base weights: the adapter then fits a residual model, not the base.
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class Target:
    """LoRA factors for one base weight."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # LINEAR or EMBEDDING
    a: str = ""  # adapter tensor names
    b: str = ""
    magnitude: str = ""  # DoRA
    scaling: float = 0.0
    rank: int = 0


@dataclass
class Adapter:
    """What an adapter folder changes, keyed by base tensor name."""

    folder: Path
    config: dict[str, Any]
    reader: CheckpointReader
    targets: dict[str, Target] = field(default_factory=dict)  # base weight -> LoRA factors
    replace: dict[str, str] = field(default_factory=dict)  # base tensor -> adapter tensor (modules_to_save)
    base_override: dict[str, str] = field(default_factory=dict)  # base tensor -> adapter's base_layer copy

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def touches(self, key: str) -> bool:
        return key in self.targets or key in self.replace or key in self.base_override

    def describe(self) -> str:
        kinds = {LINEAR: 0, EMBEDDING: 0}
        for t in self.targets.values():
            kinds[t.kind] += 1
        extra = [
            "rsLoRA" if self.config.get("use_rslora") else "",
            "DoRA" if self.dora else "",
            "rank/alpha patterns" if self.config.get("rank_pattern") or self.config.get("alpha_pattern") else "",
            "fan_in_fan_out" if self.fan_in_fan_out else "",
        ]
        flags = ", ".join(x for x in extra if x)
        return (
            f"{kinds[LINEAR]} linear and {kinds[EMBEDDING]} embedding LoRA targets, "
            f"{len(self.replace)} saved modules" + (f" ({flags})" if flags else "")
        )


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft.utils.other.get_pattern_key: the first pattern that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def scaling_for(config: dict[str, Any], module: str) -> tuple[float, int]:
    """(scaling, rank) exactly as peft's LoraLayer.update_layer computes them."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r), r


def _refuse_unsupported(folder: Path, config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise StageError(f"{folder}: peft_type is {config.get('peft_type')}, not LORA; only LoRA adapters merge here")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise StageError(f"{folder}: {what} is not supported by the streaming merge; merge it with peft instead")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise StageError(
            f"{folder}: init_lora_weights={init!r} rewrites the base weights during training, so this adapter fits "
            "a residual model, not the base; convert it to a plain LoRA first (peft's "
            "path_initial_model_for_weight_conversion) and merge that"
        )
    if config.get("loftq_config"):
        raise StageError(f"{folder}: LoftQ adapters fit a LoftQ-initialised base, not this one; merge them with peft")


def _not_an_adapter(folder: Path) -> StageError:
    if not folder.is_dir():
        return StageError(
            f"adapter folder {folder} does not exist; pass the folder a PeftModel's save_pretrained wrote"
        )
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:6]) or "nothing"
    return StageError(
        f"{folder} is not a PEFT adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; found: {found}); "
        "pass the folder a PeftModel's save_pretrained wrote"
    )


_LORA = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[\w-]+)?\.weight$")
_EMB = re.compile(r"(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.[\w-]+)?$")
_MAG = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$")
_BASE_LAYER = re.compile(r"(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
_SAVED = re.compile(r"(?P<module>.+?)(?:\.modules_to_save(?:\.[\w-]+)?)?\.(?P<param>weight|bias)$")


def load_adapter(folder: Path) -> Adapter:
    """Read adapter_config.json and the adapter's tensor index; refuse what cannot merge exactly."""
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise _not_an_adapter(folder)
    if not weights.is_file():
        pickled = [n for n in PICKLED_WEIGHTS if (folder / n).is_file()]
        if pickled:
            raise StageError(
                f"{folder} holds a pickled adapter ({pickled[0]}), which can run code when loaded; refusing it. "
                "Re-save it with save_pretrained(safe_serialization=True) in a sandbox you trust"
            )
        raise _not_an_adapter(folder)
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{cfg_path} is not valid JSON ({exc}); is this a PEFT adapter folder?") from None
    if not isinstance(config, dict):
        raise _not_an_adapter(folder)
    _refuse_unsupported(folder, config)
    try:
        reader = CheckpointReader(folder)
    except FormatError as exc:
        raise StageError(f"{folder}: {exc}") from None
    adapter = Adapter(folder=folder, config=config, reader=reader)
    saved_modules = set(config.get("modules_to_save") or [])
    unknown = []
    for key in reader.names():
        name = key.removeprefix(PREFIX)
        if m := _LORA.match(name):
            t = adapter.targets.setdefault(f"{m['module']}.weight", Target(m["module"], LINEAR))
            setattr(t, m["part"][-1].lower(), key)
        elif m := _EMB.match(name):
            t = adapter.targets.setdefault(f"{m['module']}.weight", Target(m["module"], EMBEDDING))
            t.kind = EMBEDDING  # a DoRA magnitude seen first created it as linear
            setattr(t, m["part"][-1].lower(), key)
        elif m := _MAG.match(name):
            adapter.targets.setdefault(f"{m['module']}.weight", Target(m["module"], LINEAR)).magnitude = key
        elif m := _BASE_LAYER.match(name):
            adapter.base_override[f"{m['module']}.{m['param']}"] = key
        elif (m := _SAVED.match(name)) and _is_saved_module(m["module"], saved_modules):
            adapter.replace[f"{m['module']}.{m['param']}"] = key
        else:
            unknown.append(key)
    if unknown:
        raise StageError(
            f"{weights}: {len(unknown)} tensors are neither LoRA factors nor saved modules "
            f"(first: {', '.join(unknown[:3])}); this merge understands peft LoRA adapters only"
        )
    for weight, t in adapter.targets.items():
        t.scaling, t.rank = scaling_for(config, t.module)
        if not (t.a and t.b):
            raise StageError(f"{weights}: {weight} has only one of its two LoRA factors; the adapter file is damaged")
        if adapter.dora != bool(t.magnitude):
            raise StageError(
                f"{weights}: {weight} {'lacks' if adapter.dora else 'has'} a DoRA magnitude vector but use_dora is "
                f"{adapter.dora}; the adapter's config and weights disagree"
            )
    return adapter


def _is_saved_module(module: str, saved: set[str]) -> bool:
    """peft matches modules_to_save entries against the end of the module name."""
    return any(module == s or module.endswith(f".{s}") for s in saved)


def check_fit(adapter: Adapter, base: dict[str, TensorInfo]) -> None:
    """Every adapter tensor must land on a base tensor of a fitting shape; list the first misfits."""
    problems: list[str] = []
    shape = {k: adapter.reader.info[k].shape for k in adapter.reader.names()}
    for key, akey in [*adapter.replace.items(), *adapter.base_override.items()]:
        if key not in base:
            problems.append(f"{key}: not in the base checkpoint")
        elif shape[akey] != base[key].shape:
            problems.append(f"{key}: base {list(base[key].shape)}, adapter {list(shape[akey])}")
    for key, t in adapter.targets.items():
        if key not in base:
            problems.append(f"{key}: not in the base checkpoint")
            continue
        w = base[key].shape
        a, b = shape[t.a], shape[t.b]
        if len(w) != 2:
            problems.append(f"{key}: base weight has {len(w)} dimensions; only 2-D (Linear, Embedding) weights merge")
            continue
        # Linear: (out, in), or (in, out) with fan_in_fan_out; embedding: (B @ A).T is (num_embeddings, dim).
        transposed = t.kind == EMBEDDING or adapter.fan_in_fan_out
        want = (a[1], b[0]) if transposed else (b[0], a[1])
        if len(a) != 2 or len(b) != 2 or tuple(w) != want or a[0] != b[1]:
            problems.append(f"{key}: base {list(w)}, adapter B{list(b)} @ A{list(a)}")
        elif a[0] != t.rank:
            problems.append(f"{key}: rank {a[0]} in the weights, {t.rank} from adapter_config.json (r/rank_pattern)")
        elif t.magnitude:
            out = w[1] if (t.kind == EMBEDDING or adapter.fan_in_fan_out) else w[0]
            if shape[t.magnitude] != (out,):
                problems.append(f"{key}: DoRA magnitude {list(shape[t.magnitude])}, expected [{out}]")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise StageError(
            f"adapter {adapter.folder} does not fit the base: {'; '.join(problems[:5])}{more}; "
            "was it trained on this base model?"
        )


# --- The arithmetic -----------------------------------------------------------------------


def _upcast(t):
    """peft's cast_adapter_dtype: 16-bit adapter tensors become float32 on load."""
    import torch

    return t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t


def _transpose(w, fan_in_fan_out: bool):
    return w.T if fan_in_fan_out else w


def linear_delta(a, b, scaling: float, fan_in_fan_out: bool):
    """peft Linear.get_delta_weight with adapter tensors already upcast. Scaled in place: the same
    values as peft's out-of-place product, without a second weight-sized float32 buffer."""
    delta = _transpose(b @ a, fan_in_fan_out)
    delta *= scaling
    return delta


def embedding_delta(a, b, scaling: float):
    """peft Embedding.get_delta_weight (scaled in place, as above)."""
    delta = _transpose(b @ a, True)
    delta *= scaling
    return delta


def merge_linear(weight, a, b, scaling: float, fan_in_fan_out: bool, magnitude=None):
    """The merged Linear weight, in weight's dtype. `weight` is the base already cast to the output dtype."""
    a, b = _upcast(a), _upcast(b)
    delta = linear_delta(a, b, scaling, fan_in_fan_out)
    if magnitude is None:
        weight += delta  # in place: the sum is computed in float32 and rounded once to weight's dtype
        return weight
    # DoraLinearVariant.merge_unsafe, with DoraLinearLayer.get_weight_norm inlined (scaling=1).
    import torch

    magnitude = _upcast(magnitude)
    norm_input = _transpose(weight, fan_in_fan_out)
    norm_input = norm_input + 1 * _transpose(delta, fan_in_fan_out)
    weight_norm = torch.linalg.norm(norm_input, dim=1).to(norm_input.dtype)
    dora_factor = magnitude / weight_norm
    dora_factor = _transpose(dora_factor.view(-1, 1), fan_in_fan_out)
    return (dora_factor * (weight + delta)).to(weight.dtype)


def merge_embedding(weight, a, b, scaling: float, magnitude=None):
    """The merged Embedding weight, in weight's dtype."""
    a, b = _upcast(a), _upcast(b)
    delta = embedding_delta(a, b, scaling)
    if magnitude is None:
        weight += delta.to(weight.dtype)  # peft rounds the delta to the weight's dtype before adding
        return weight
    # DoraEmbeddingVariant.merge_unsafe (DoraEmbeddingLayer has fan_in_fan_out=True).
    import torch

    magnitude = _upcast(magnitude)
    norm_input = weight.T
    norm_input = norm_input + 1 * delta.T
    weight_norm = torch.linalg.norm(norm_input, dim=1).to(norm_input.dtype)
    dora_factor = (magnitude / weight_norm).view(1, -1)
    return (dora_factor * (weight + delta)).to(weight.dtype)


# --- NF4 / FP4 round trip (QLoRA's view of the base) ----------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """How bitsandbytes quantized the base during training (transformers' BitsAndBytesConfig fields)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    blocksize: int = 64  # bitsandbytes' Params4bit default, which transformers does not change

    def describe(self) -> str:
        dq = "double quant" if self.double_quant else "no double quant"
        return f"{self.quant_type.upper()} ({dq}, block {self.blocksize}, {self.compute_dtype})"


def quant_roundtrip(weight, spec: QuantSpec):
    """The weight the 4-bit base showed the adapter in training: bitsandbytes quantizes the weight as
    loaded (cast to the compute dtype) and dequantizes it back to that dtype for every matmul."""
    import bitsandbytes.functional as bnbf
    import torch

    w = weight.to(getattr(torch, spec.compute_dtype)).contiguous()
    packed, state = bnbf.quantize_4bit(
        w, blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type
    )
    return bnbf.dequantize_4bit(packed, state)
