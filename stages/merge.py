"""Merge stage: fold a LoRA adapter into the base weights, one tensor at a time, on the CPU.

    # in the pipeline (base = model.name_or_path, adapter = runs/<run>/adapter, output = runs/<run>/merged)
    python -m stages.merge --config runs/demo/config.yaml
    # standalone
    python -m stages.merge --base BASE_DIR --adapter ADAPTER_DIR --output OUT_DIR [--dtype float16|bfloat16]
    python -m stages.merge --base B --adapter A --output O --onto dequantized --compare-onto --verify
    # in the container (the kiln-merge image; compose.yaml mounts runs/ and cache/ at the same paths)
    docker compose run --rm merge python -m stages.merge --base cache/models/M --adapter runs/R/adapter \
        --output runs/R/merged

How: base tensors are read one at a time from the safetensors shards (plain reads, no mmap, so a
5 GB shard does not become 5 GB of resident memory), each one that the adapter changes is merged
with the arithmetic of peft's ``merge_and_unload`` (stages/common/lora_math.py says which
operations, in which dtypes), and the result is written straight into size-bounded output shards
whose headers were planned up front; the next tensor is built while one is written. Resident
memory is the Python runtime plus about two tensors in flight, not the model. Measured by
benchmarks/merge.py on 2 shared cores (benchmarks/results/merge-*.json): Mistral-7B shapes, 13.5 GiB
bf16, r=64 adapter: 107 s and 1.32 GiB peak RSS (1.84 GiB with --verify --compare-onto), where
``PeftModel.from_pretrained(...).merge_and_unload()`` needs ~28 GiB; at 1.1B both fit: 41 s and
0.72 GiB against peft's 56 s and 4.48 GiB, with bit-identical outputs.

Exactness: every merged tensor is bit-identical (0 ulp) to peft 0.21's merge_and_unload of the same
adapter onto the base loaded in the same dtype (tests/test_merge.py, every variant, float16 and
bfloat16), on the same torch build and thread count. Elsewhere a different BLAS may round the
float32 ``B @ A`` differently, which moves an element by at most 1 ulp of the output dtype (except
where W + BA cancels to far below |B||A|, where the float32 error of the product bounds it).
Covered: plain LoRA, rsLoRA, rank/alpha patterns, modules_to_save, LoRA on embeddings,
fan_in_fan_out, DoRA. One deliberate difference: with tied input/output
embeddings, when the adapter changes one of the two, the output is untied (both tensors written,
tie_word_embeddings false) so the merged model computes what base+adapter computed; peft adds the
delta into the shared tensor and so changes the other one too.

--onto dequantized merges onto what the adapter saw in QLoRA training: each weight bitsandbytes
quantized (every Linear but the output head), round-tripped through 4-bit (NF4, double quant,
bfloat16 by default; pipeline mode takes the config's quantization section).
--compare-onto reports how far the two choices' logits are apart on a few prompts (whole model up
to ~250M parameters; per-layer outputs of sampled modules beyond, which keeps the memory bound).
--verify checks the merged output against base+adapter before it is published: the whole model's
logits against peft's unmerged PeftModel (small models), or, for large models, the outputs of
sampled merged layers against W x + scale * B (A x) (DoRA: its norm form) in float64, against a
rounding-error bound derived from the output dtype. A failed check fails the stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stages.common import keys, names, specs
from stages.common.artifacts import check_free_disk, sha256_file, stage_output, verify_manifest
from stages.common.cli import context, stage_parser
from stages.common.errors import StageError, console, run_stage
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
from stages.common.preflight import (
    GiB,
    checkpoint_bytes,
    process_memory,
    release_freed_tensors,
    reset_peak_memory,
)
from stages.common.safetensors_io import (
    BY_TORCH_NAME,
    CheckpointReader,
    FormatError,
    ShardWriter,
    TensorInfo,
    plan_shards,
    shard_names,
    write_index,
)

SPEC = specs.spec(names.MERGE)

DTYPES = ("float16", "bfloat16")
ONTO = ("original", "dequantized")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
DEFAULT_SHARD_GB = 2.0
# Whole-model checks load the model in float32; beyond this they would break the memory bound.
FULL_CHECK_MAX_BYTES = 1 << 30
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer:",
    "def fibonacci(n):\n    return",
    "[INST] Explain low-rank adaptation in one sentence. [/INST]",
)

# Merged-vs-unmerged logits, whole model in float32: the merged weights are rounded to the output
# dtype, nothing else differs. Measured on the tests' tiny models: ~2e-3 (float16), ~1.5e-2 (bfloat16).
LOGIT_TOL = {"float16": 2e-2, "bfloat16": 1e-1}
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}
HALF_SUBNORMAL = {"float16": 2.0**-25, "bfloat16": 2.0**-134, "float32": 2.0**-150}
LAYER_SAMPLE = 16


# --- Plan: what each output tensor is made of ------------------------------------------------


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
    dtype: str,
    onto: str,
    quant: QuantSpec,
    *,
    compare: bool = False,
    remote: bool = False,
) -> Plan:
    """Everything that can fail cheaply fails here: inputs, fit, architecture; no weights are read."""
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
    need_quantized = onto == "dequantized" or compare
    if need_quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise StageError(
                "--onto dequantized and --compare-onto need bitsandbytes (it reproduces the 4-bit round trip), "
                "which this environment lacks; pip install bitsandbytes, or merge --onto original"
            ) from None
    arch = inspect_architecture(base_dir, config, quant if need_quantized else None, remote)

    available = dict(base.info)
    plan = Plan(base_dir, base, adapter, dtype, onto, quant, config)
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


# --- Merge: one tensor ------------------------------------------------------------------------


def build_tensor(plan: Plan, key: str, onto: str | None = None):
    """Output tensor `key`: the base tensor (or the adapter's copy of it), optionally 4-bit
    round-tripped, cast to the output dtype, with the adapter merged in."""
    import torch

    onto = onto or plan.onto
    ad = plan.adapter
    if key in ad.replace:  # modules_to_save: the trained copy replaces the module
        return ad.reader.get(ad.replace[key]).to(getattr(torch, plan.out_dtype(key)))
    src = plan.source.get(key, key)
    override = ad.base_override.get(key) or ad.base_override.get(src)
    weight = ad.reader.get(override) if override else plan.base.get(src)
    if not weight.is_floating_point():
        return weight
    if onto == "dequantized" and src in plan.quantized:
        weight = quant_roundtrip(weight, plan.quant)
    weight = weight.to(getattr(torch, plan.out_dtype(key)))
    target = ad.targets.get(key)
    if target is None:
        return weight
    a, b = ad.reader.get(target.a), ad.reader.get(target.b)
    magnitude = ad.reader.get(target.magnitude) if target.magnitude else None
    if target.kind == EMBEDDING:
        return merge_embedding(weight, a, b, target.scaling, magnitude)
    return merge_linear(weight, a, b, target.scaling, ad.fan_in_fan_out, magnitude)


def write_checkpoint(plan: Plan, out_dir: Path, shard_bytes: int) -> dict[str, Any]:
    """Write every output tensor into planned shards; the next tensor is built while one is written."""
    from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn

    from stages.common.progress import Progress  # plain lines when the output is not a terminal

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(plan.outputs, shard_bytes)
    files = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    counts = {"lora": 0, "saved_modules": 0, "dequantized": 0}
    t0 = time.monotonic()
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        Progress(*columns, console=console, transient=False) as progress,
    ):
        bar = progress.add_task(f"merging {len(plan.outputs)} tensors", total=plan.out_bytes)
        order = [info.name for shard in shards for info in shard]
        pending = pool.submit(build_tensor, plan, order[0]) if order else None
        i = 0
        for name, shard in zip(files, shards, strict=True):
            writer = ShardWriter(out_dir / name, shard)
            with writer:
                for info in shard:
                    tensor = pending.result()
                    i += 1
                    pending = pool.submit(build_tensor, plan, order[i]) if i < len(order) else None
                    writer.write(info.name, tensor)
                    del tensor
                    weight_map[info.name] = name
                    counts["lora"] += info.name in plan.adapter.targets
                    counts["saved_modules"] += info.name in plan.adapter.replace
                    counts["dequantized"] += plan.onto == "dequantized" and info.name in plan.quantized
                    progress.update(bar, advance=info.nbytes)
            total += writer.size
    plan.base.close()
    write_index(out_dir, weight_map, plan.out_bytes)
    seconds = time.monotonic() - t0
    return {
        "tensors": len(plan.outputs),
        "tensors_lora_merged": counts["lora"],
        "tensors_replaced": counts["saved_modules"],
        "tensors_dequantized": counts["dequantized"],
        "untied": plan.untied,
        "shards": len(files),
        "bytes_written": total,
        "merge_s": round(seconds, 2),
        "throughput_mb_s": round(total / 1e6 / seconds, 1) if seconds else None,
    }


def write_side_files(plan: Plan, adapter_dir: Path, out_dir: Path) -> str:
    """config.json (dtype updated), generation_config.json, tokenizer files; returns the tokenizer's source."""
    config = dict(plan.config)
    config["dtype"] = plan.dtype
    if "torch_dtype" in config:  # older transformers read this name
        config["torch_dtype"] = plan.dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (plan.base_dir / "generation_config.json").is_file():
        shutil.copy2(plan.base_dir / "generation_config.json", out_dir)
    # The adapter folder's tokenizer wins: training may have set a pad token or a chat template.
    has_tok = any((adapter_dir / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    source = adapter_dir if has_tok else plan.base_dir
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir)
    # save_pretrained of a fast tokenizer may drop the SentencePiece model that llama.cpp's converter
    # reads for Llama/Mistral vocabularies; the base's is the same model.
    if not (out_dir / "tokenizer.model").is_file() and (plan.base_dir / "tokenizer.model").is_file():
        shutil.copy2(plan.base_dir / "tokenizer.model", out_dir)
    return "adapter" if has_tok else "base"


# --- Checks: verify and compare-onto ------------------------------------------------------------


def param_count(plan: Plan) -> int:
    return sum(i.numel for i in plan.outputs)


def whole_model_fits(plan: Plan) -> bool:
    return param_count(plan) * 4 <= FULL_CHECK_MAX_BYTES


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
    src = plan.source.get(key, key)
    override = ad.base_override.get(key) or ad.base_override.get(src)
    base = ad.reader.get(override) if override else plan.base.get(src)
    if (onto or plan.onto) == "dequantized" and src in plan.quantized:
        base = quant_roundtrip(base, plan.quant)
    dt = plan.out_dtype(key)
    base = base.to(getattr(torch, dt))
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


# --- The stage --------------------------------------------------------------------------------


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def merge_into(plan: Plan, out_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write the merged checkpoint into out_dir (which the caller publishes), then run the checks."""
    console.print(
        f"merging {plan.adapter.describe()} into {plan.base_dir} ({human(param_count(plan))} parameters) "
        f"as {plan.dtype}, onto {plan.onto}" + (f" {plan.quant.describe()}" if plan.onto == "dequantized" else "")
    )
    t0 = time.monotonic()
    # The write's own peak, against the RSS it started from (interpreter, torch, the plan): what it
    # adds must follow the largest tensor, not the model (tests/test_merge.py).
    release_freed_tensors()
    start = process_memory()
    reset = reset_peak_memory()
    stats = write_checkpoint(plan, out_dir, int(args.shard_size * 1e9))
    stats["tokenizer_from"] = write_side_files(plan, plan.adapter.folder, out_dir)
    stats["wall_s"] = round(time.monotonic() - t0, 2)
    end = process_memory()  # before the checks, which load more
    stats["peak_rss_gib"] = round(max(start.get("peak", 0), end.get("peak", 0)) / GiB, 3)
    stats["rss_start_gib"] = round(start.get("rss", 0) / GiB, 3)
    stats["write_peak_rss_gib"] = round(end["peak"] / GiB, 3) if reset and end else None
    stats["largest_tensor_bytes"] = max((i.nbytes for i in plan.outputs), default=0)
    stats["adapter_bytes"] = checkpoint_bytes(plan.adapter.folder)
    console.print(
        f"merged {stats['tensors_lora_merged']} LoRA targets and {stats['tensors_replaced']} saved tensors "
        f"({stats['tensors']} tensors, {stats['bytes_written'] / 2**30:.2f} GiB in {stats['shards']} shards) "
        f"in {stats['wall_s']:.1f} s, peak RSS {stats['peak_rss_gib']:.2f} GiB"
    )
    mode = args.verify
    if mode == "auto":
        mode = "full" if whole_model_fits(plan) else "layers"
    if mode == "full":
        stats["verify"] = verify_full(plan, out_dir)
    elif mode == "layers":
        stats["verify"] = verify_layers(plan, out_dir)
    if args.compare_onto:
        stats["compare_onto"] = compare_onto(plan, out_dir)
    return stats


def quant_spec(args: argparse.Namespace) -> QuantSpec:
    return QuantSpec(args.quant_type, not args.no_double_quant, args.compute_dtype)


def standalone(args: argparse.Namespace) -> None:
    """--base/--adapter/--output: OUT_DIR appears whole (a temporary folder beside it, renamed at the end)."""
    # Setup.
    out = args.output.resolve()
    if out.exists():
        raise StageError(f"--output {out} exists; remove it or choose another folder")
    plan = make_plan(args.base, args.adapter, args.dtype, args.onto, quant_spec(args), compare=args.compare_onto)
    check_free_disk(out.parent, plan.out_bytes + (64 << 20), "the merged checkpoint")
    tmp = out.parent / f"{names.TMP_PREFIX}{out.name}-{os.getpid()}"
    # Run.
    try:
        stats = merge_into(plan, tmp, args)
        tmp.rename(out)
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    finally:
        # Cleanup: nothing at OUT_DIR, and no temporary folder, after a failure.
        shutil.rmtree(tmp, ignore_errors=True)
    if args.metrics_json:
        args.metrics_json.write_text(json.dumps(stats, indent=2) + "\n")
    console.print(f"wrote {out}")


def pipeline(args: argparse.Namespace) -> None:
    # Setup: the train stage's output must be complete and intact before anything is read.
    ctx = context(args)
    from stages.common.model import resolve

    cfg = ctx.cfg
    base = resolve(cfg.model).path
    layout = ctx.layout
    train_manifest = verify_manifest(layout.root, names.TRAIN)
    adapter_dir = layout.adapter
    q = cfg.quantization
    if cfg.merge.onto == "dequantized" and not q.load_in_4bit:
        raise StageError("merge.onto=dequantized needs quantization.load_in_4bit=true: the adapter saw no 4-bit base")
    spec = QuantSpec(q.quant_type, q.double_quant, q.compute_dtype)
    plan = make_plan(
        base,
        adapter_dir,
        cfg.merge.dtype,
        cfg.merge.onto,
        spec,
        compare=args.compare_onto,
        remote=cfg.model.trust_remote_code,
    )
    check_free_disk(layout.root, plan.out_bytes + (64 << 20), "the merged checkpoint")
    SPEC.check_memory(cfg, layout, base=base)
    # Run, then publish with a manifest.
    with stage_output(layout.root, names.MERGE, owned=(names.MERGED_DIR,)) as out:
        stats = merge_into(plan, out.path(layout.merged), args)
        train_json = layout.manifest(names.TRAIN)
        out.commit(
            inputs={
                "base": str(base),
                "base_fingerprint": keys.fingerprint([base], keys.FileHashes()),
                "adapter": names.ADAPTER_DIR,
                "train_manifest_sha256": sha256_file(train_json),
                "train_started_at": train_manifest.get(names.M_STARTED),
                "dtype": cfg.merge.dtype,
                "onto": cfg.merge.onto,
                "quantization": spec.describe() if cfg.merge.onto == "dequantized" else None,
            },
            metrics=stats,
        )


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.merge", __doc__)
    parser.add_argument("--base", type=Path, help="base HF checkpoint folder, safetensors (standalone mode)")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter folder (standalone mode)")
    parser.add_argument("--output", type=Path, help="folder to create for the merged checkpoint (standalone mode)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="merged weights' dtype (standalone mode)")
    parser.add_argument(
        "--onto", choices=ONTO, default="original", help="merge onto the 16-bit base or its 4-bit round trip"
    )
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit type used in training")
    parser.add_argument("--no-double-quant", action="store_true", help="training did not double-quantize")
    parser.add_argument(
        "--compute-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="4-bit compute dtype"
    )
    parser.add_argument(
        "--verify",
        nargs="?",
        const="auto",
        choices=("auto", "full", "layers"),
        help="check merged vs base+adapter before publishing: full (logits), layers (sampled layers), "
        "auto (full up to ~250M parameters)",
    )
    parser.add_argument(
        "--compare-onto", action="store_true", help="report logit difference onto original vs dequantized"
    )
    parser.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_GB, help="max GB per output shard")
    parser.add_argument("--metrics-json", type=Path, help="also write the merge metrics here (standalone mode)")
    args = parser.parse_args(argv)
    if args.config is None:
        missing = [f"--{n}" for n in ("base", "adapter", "output") if getattr(args, n) is None]
        if missing:
            parser.error(f"give --config, or all of --base, --adapter and --output (missing {', '.join(missing)})")
        return run_stage(names.MERGE, lambda: standalone(args))
    return run_stage(names.MERGE, lambda: pipeline(args))


if __name__ == "__main__":
    raise SystemExit(main())
