"""Widen SmolLM2-135M-Instruct (or any Llama-architecture checkpoint) into a larger Mistral-architecture
checkpoint that computes the same function: a working 7B-shaped model built offline, for the 7B runs.

    # the 7B fixture (14.8 GB, bf16, 5 GB shards) and the demo adapter padded to fit it
    python benchmarks/widen.py model --src cache/models/SmolLM2-135M-Instruct \
        --dst cache/models/SmolLM2-7B-widened --shape 7b
    python benchmarks/widen.py adapter --src runs/demo/adapter --src-model cache/models/SmolLM2-135M-Instruct \
        --dst cache/adapters/demo-7b --shape 7b
    # the small shape the tests use (hidden 2048, 1.9 GB)
    python benchmarks/widen.py model --src cache/models/SmolLM2-135M-Instruct --dst /tmp/smol-2048 --shape small

From Python (tests, benchmarks/scale_7b.py): ``widen_model(src_dir, dst_dir, shape)``,
``widen_adapter(src_adapter_dir, dst_dir, src_model_dir, shape)``, ``SHAPES``, ``is_current(dst, src, shape)``.

The construction, zero padding (h, nh, nkv, hd: the source's hidden size, heads, KV heads, head
dim; H, NH, NKV, HD the target's):
- the residual stream keeps the source's h channels and pads the rest with zeros: embedding columns
  h .. H-1 are zero, the untied output layer is the padded embedding (the source ties them);
- RMSNorm weights x sqrt(h/H) and eps x h/H: the mean square over H channels is h/H of the mean
  over h, so every normalisation gives the source's values (padded channels stay 0);
- source query head i goes to target head G*(i//g) + i%g (g, G: query heads per KV head in source
  and target), source KV head j to target KV head j, so each source KV head serves exactly its own
  query heads; unused heads are zero, and o_proj's columns follow the same layout;
- inside a head, source dims d and d + hd/2 (a pair of HF's rotate_half) go to d and d + HD/2,
  and rope_theta becomes theta^(HD/hd), so target pair d turns at the source pair's frequency;
- q_proj x sqrt(HD/hd) restores the softmax scale (1/sqrt(HD) instead of 1/sqrt(hd));
- MLP rows and columns are padded with zeros (silu(0) * 0 = 0);
- layers beyond the source's copy its last layers with o_proj and down_proj zero: identities.
Weights are computed in float32 from the source's bfloat16 ones. The matrices are stored in
bfloat16, which holds every padded value exactly except q_proj x sqrt(2) (rounded, relative error
2^-9 at most per element: the one departure from the source function; tests/test_widen.py measures
it). The RMSNorm weights (65 x H values) are stored in float32, where x 3/8 is exact: in bfloat16
its rounding, a bias shared by every channel, quadrupled the logit error (mean of the per-position
max |difference| on 1,409 held-out positions at the small shape: 0.126 against 0.036) and moved the
perplexity by 0.3% (against 0.009%). Loaded with dtype=bfloat16 they are rounded then; float16
(the merge stage's default) holds them exactly.
A LoRA adapter is padded the same way (A's input columns, B's output rows, the same head layout,
q_proj's B x sqrt(HD/hd), zero factors for the added layers), so merging it into the widened model
computes the merged source model's function.

The output is written tensor by tensor (stages/common/safetensors_io.py), never more than one
tensor in memory besides the source's, in a temporary folder beside the target that is renamed into
place at the end; the same inputs give the same bytes. A ``widened.json`` in the output records the
inputs' digests, so a caller can tell whether an existing output is current (``is_current``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages.common.artifacts import check_free_disk, sha256_file  # noqa: E402
from stages.common.errors import StageError  # noqa: E402
from stages.common.lora_math import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, scaling_for  # noqa: E402
from stages.common.merge_write import TOKENIZER_FILES  # noqa: E402
from stages.common.safetensors_io import (  # noqa: E402
    BY_TORCH_NAME,
    CheckpointReader,
    ShardWriter,
    TensorInfo,
    plan_shards,
    shard_names,
    write_index,
)

CONSTRUCTION = "zero-padding v1"  # bump when the bytes a given input produces change
PROVENANCE = "widened.json"
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    shard_gb: float


SHAPES: dict[str, Shape] = {
    # Mistral-7B-v0.1's shapes; 7.38 B parameters with SmolLM2's vocabulary and an untied output layer.
    "7b": Shape(4096, 32, 32, 8, 128, 14336, 5.0),
    # What CI builds: every rule of the construction at work (heads 64 -> 128, 3 -> 4 query heads
    # per KV head, MLP padding, 30 -> 32 layers, two shards) at 0.94 B parameters.
    "small": Shape(2048, 32, 16, 4, 128, 2048, 1.0),
}


class Layout:
    """Where each source row and column goes in the target, and the scale factors."""

    def __init__(self, src: dict[str, Any], shape: Shape):
        import torch

        self.src, self.shape = src, shape
        self.h, self.H = src["hidden_size"], shape.hidden_size
        self.nh, self.nkv = src["num_attention_heads"], src["num_key_value_heads"]
        self.hd = src.get("head_dim") or self.h // self.nh
        self.ffn, self.L = src["intermediate_size"], src["num_hidden_layers"]
        self.NH, self.NKV, self.HD = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
        _check_fits(self, src, shape)
        self.q_rows = torch.tensor(self._rows(self.nh, self.nh // self.nkv, self.NH // self.NKV))
        self.kv_rows = torch.tensor(self._rows(self.nkv, 1, 1))
        self.q_scale = math.sqrt(self.HD / self.hd)
        self.norm_scale = math.sqrt(self.h / self.H)
        theta = src["rope_parameters"]["rope_theta"] if "rope_parameters" in src else src.get("rope_theta", 10000.0)
        self.rope_theta = float(theta) ** (self.HD / self.hd)

    def _rows(self, heads: int, g: int, G: int) -> list[int]:
        """Target row of each source row of a projection with `heads` heads (g, G: heads per group)."""
        half, Half = self.hd // 2, self.HD // 2
        return [
            (G * (i // g) + i % g) * self.HD + (d // half) * Half + d % half
            for i in range(heads)
            for d in range(self.hd)
        ]

    def placement(self, proj: str) -> tuple[int, Any, int, Any, float]:
        """(out size, target rows or None, in size, target columns or None, scale) of a projection's
        weight [out, in]; None: the source's rows (columns) stay first, the rest is zero."""
        H, FFN, QW, KW = self.H, self.shape.intermediate_size, self.NH * self.HD, self.NKV * self.HD
        return {
            "q_proj": (QW, self.q_rows, H, None, self.q_scale),
            "k_proj": (KW, self.kv_rows, H, None, 1.0),
            "v_proj": (KW, self.kv_rows, H, None, 1.0),
            "o_proj": (H, None, QW, self.q_rows, 1.0),
            "gate_proj": (FFN, None, H, None, 1.0),
            "up_proj": (FFN, None, H, None, 1.0),
            "down_proj": (H, None, FFN, None, 1.0),
        }[proj]

    def source_layer(self, i: int) -> int:
        """The source layer that target layer i is made from (the added layers copy the last ones)."""
        return i if i < self.L else self.L - (self.shape.num_hidden_layers - self.L) + (i - self.L)

    def config(self) -> dict[str, Any]:
        s, src = self.shape, self.src
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": src["vocab_size"],
            "hidden_size": s.hidden_size,
            "intermediate_size": s.intermediate_size,
            "num_hidden_layers": s.num_hidden_layers,
            "num_attention_heads": s.num_attention_heads,
            "num_key_value_heads": s.num_key_value_heads,
            "head_dim": s.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": src.get("max_position_embeddings", 8192),
            "rms_norm_eps": src["rms_norm_eps"] * self.h / self.H,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,  # the pre-5.0 name, for older readers
            "sliding_window": None,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "bos_token_id": src.get("bos_token_id"),
            "eos_token_id": src.get("eos_token_id"),
            "pad_token_id": src.get("pad_token_id"),
            "initializer_range": src.get("initializer_range", 0.02),
            "use_cache": True,
            "dtype": "bfloat16",
        }


def _check_fits(lay: Layout, src: dict[str, Any], shape: Shape) -> None:
    problems = []
    if src.get("model_type") not in ("llama", "mistral"):
        problems.append(f"model_type {src.get('model_type')!r} (llama or mistral expected)")
    if src.get("attention_bias") or src.get("mlp_bias") or src.get("hidden_act", "silu") != "silu":
        problems.append("biases or a non-silu MLP")
    rope = src.get("rope_parameters") or src.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type')!r} (only default RoPE keeps its frequencies)")
    if src.get("sliding_window"):
        problems.append("a sliding window")
    if lay.nh % lay.nkv or lay.NH % lay.NKV:
        problems.append("query heads not a multiple of KV heads")
    elif lay.nh // lay.nkv > lay.NH // lay.NKV or lay.nkv > lay.NKV:
        problems.append(f"{lay.nh}/{lay.nkv} query/KV heads do not fit {lay.NH}/{lay.NKV}")
    for what, small, big in (
        ("hidden size", lay.h, lay.H),
        ("head dim", lay.hd, lay.HD),
        ("MLP size", lay.ffn, shape.intermediate_size),
        ("layers", lay.L, shape.num_hidden_layers),
    ):
        if big < small:
            problems.append(f"{what} {small} > target's {big}")
    if lay.hd % 2 or lay.HD % 2 or shape.num_hidden_layers > 2 * lay.L:
        problems.append("odd head dims or more than twice the layers")
    if problems:
        raise StageError(f"cannot widen this source to {shape}: {'; '.join(problems)}")


def place(t, shape: tuple[int, int], rows=None, cols=None, scale: float = 1.0, dtype=None):
    """A zero tensor of `shape` holding t (x scale, computed in float32 and rounded once to dtype,
    default t's) at target rows `rows` or columns `cols` (index tensors), else at the top left."""
    import torch

    dtype = dtype or t.dtype
    out = torch.zeros(shape, dtype=dtype)
    val = (t.float() * scale if scale != 1.0 else t).to(dtype)
    if rows is not None:
        out[rows, : t.shape[1]] = val
    elif cols is not None:
        out[: t.shape[0], cols] = val
    else:
        out[: t.shape[0], : t.shape[1]] = val
    return out


# --- The model ------------------------------------------------------------------------------------


def model_plan(lay: Layout) -> list[tuple[TensorInfo, Callable[[CheckpointReader], Any]]]:
    """Every target tensor, in write order, with the function that builds it from the source."""
    import torch

    bf16, vocab, H = torch.bfloat16, lay.src["vocab_size"], lay.H
    plan: list[tuple[TensorInfo, Callable]] = []

    def add(name: str, shape: tuple[int, ...], fn: Callable) -> None:
        # Norm weights in float32: x 3/8 is exact there, not in bfloat16 (see the module docstring).
        plan.append((TensorInfo(name, "F32" if len(shape) == 1 else "BF16", shape), fn))

    def norm(key: str) -> Callable:
        return lambda r: place(r.get(key).float().unsqueeze(0), (1, H), scale=lay.norm_scale)[0]

    def proj(key: str, name: str, zero: bool) -> tuple[tuple[int, int], Callable]:
        out, rows, inp, cols, scale = lay.placement(name)
        if zero:
            return (out, inp), lambda r: torch.zeros(out, inp, dtype=bf16)
        return (out, inp), lambda r: place(r.get(key), (out, inp), rows, cols, scale, bf16)

    embed = "model.embed_tokens.weight"
    add(embed, (vocab, H), lambda r: place(r.get(embed), (vocab, H), dtype=bf16))
    for i in range(lay.shape.num_hidden_layers):
        s, t = f"model.layers.{lay.source_layer(i)}.", f"model.layers.{i}."
        for sub, names in (("self_attn", ATTN), ("mlp", MLP)):
            norm_name = "input_layernorm" if sub == "self_attn" else "post_attention_layernorm"
            add(f"{t}{norm_name}.weight", (H,), norm(f"{s}{norm_name}.weight"))
            for name in names:
                # The added layers' outputs are zero: they pass the residual stream through unchanged.
                shape, fn = proj(f"{s}{sub}.{name}.weight", name, i >= lay.L and name in ("o_proj", "down_proj"))
                add(f"{t}{sub}.{name}.weight", shape, fn)
    add("model.norm.weight", (H,), norm("model.norm.weight"))
    head = "lm_head.weight" if lay.src.get("tie_word_embeddings") is False else embed
    add("lm_head.weight", (vocab, H), lambda r: place(r.get(head), (vocab, H), dtype=bf16))
    return plan


def _provenance(kind: str, shape_name: str, shape: Shape, inputs: dict[str, Path | list[Path]]) -> dict[str, Any]:
    digests = {}
    for label, paths in inputs.items():
        files = paths if isinstance(paths, list) else [paths]
        digests[label] = {p.name: sha256_file(p) for p in sorted(files)}
    return {"construction": CONSTRUCTION, "kind": kind, "shape": shape_name, **asdict(shape), "inputs": digests}


def _model_inputs(src_dir: Path) -> dict[str, Any]:
    return {"config": src_dir / "config.json", "weights": sorted(src_dir.glob("*.safetensors"))}


def is_current(dst_dir: Path, src_dir: Path, shape: str | Shape, adapter: Path | None = None) -> bool:
    """True when dst_dir was widened by this construction from these very inputs (digests compared)."""
    path = Path(dst_dir) / PROVENANCE
    if not path.is_file():
        return False
    name, sh = _shape(shape)
    inputs = _model_inputs(Path(src_dir))
    if adapter is not None:
        inputs = {**inputs, "adapter": sorted(Path(adapter).glob("adapter_*"))}
    want = _provenance("adapter" if adapter else "model", name, sh, inputs)
    return json.loads(path.read_text()) == want


def _shape(shape: str | Shape) -> tuple[str, Shape]:
    if isinstance(shape, Shape):
        return next((k for k, v in SHAPES.items() if v == shape), "custom"), shape
    if shape not in SHAPES:
        raise StageError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return shape, SHAPES[shape]


def _publish(dst: Path, fill: Callable[[Path], None]) -> None:
    """Run fill(tmp) on a temporary folder beside dst, then rename it to dst; nothing at dst on failure."""
    if dst.exists():
        raise StageError(f"{dst} exists; remove it or choose another folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def widen_model(src_dir: Path, dst_dir: Path, shape: str | Shape = "7b", log: Callable[[str], None] = print) -> dict:
    """Write the widened checkpoint of src_dir at dst_dir (which must not exist); returns figures."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    name, sh = _shape(shape)
    src = json.loads((src_dir / "config.json").read_text())
    lay = Layout(src, sh)
    plan = model_plan(lay)
    total = sum(info.nbytes for info, _ in plan)
    check_free_disk(dst_dir.absolute(), total + (64 << 20), "the widened model")
    t0 = time.monotonic()
    stats: dict[str, Any] = {"shape": name, "parameters": sum(i.numel for i, _ in plan), "bytes": total}

    def fill(tmp: Path) -> None:
        builders = {info.name: fn for info, fn in plan}
        shards = plan_shards([info for info, _ in plan], int(sh.shard_gb * 1e9))
        files = shard_names(len(shards))
        order = [info.name for shard in shards for info in shard]
        weight_map = {}
        with CheckpointReader(src_dir) as reader, ThreadPoolExecutor(max_workers=1) as pool:
            missing = [k for k in _source_keys(lay) if k not in reader]
            if missing:
                raise StageError(f"{src_dir}: no {', '.join(missing[:3])}; not a {src['model_type']} checkpoint?")
            pending = pool.submit(builders[order[0]], reader)
            n = 0
            for fname, shard in zip(files, shards, strict=True):
                with ShardWriter(tmp / fname, shard) as writer:
                    for info in shard:
                        tensor = pending.result()
                        n += 1
                        pending = pool.submit(builders[order[n]], reader) if n < len(order) else None
                        writer.write(info.name, tensor)
                        weight_map[info.name] = fname
                log(f"wrote {fname} ({writer.size / 1e9:.2f} GB, {time.monotonic() - t0:.0f} s)")
        write_index(tmp, weight_map, total)
        (tmp / "config.json").write_text(json.dumps(lay.config(), indent=2) + "\n")
        for f in SIDE_FILES:
            if (src_dir / f).is_file():
                shutil.copy2(src_dir / f, tmp / f)
        prov = _provenance("model", name, sh, _model_inputs(src_dir))
        (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2) + "\n")
        stats["shards"] = len(files)

    _publish(dst_dir, fill)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    return stats


def _source_keys(lay: Layout) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(lay.L):
        p = f"model.layers.{i}."
        keys += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
        keys += [f"{p}self_attn.{m}.weight" for m in ATTN] + [f"{p}mlp.{m}.weight" for m in MLP]
    return keys


# --- The adapter ------------------------------------------------------------------------------------


def widen_adapter(
    src_adapter_dir: Path,
    dst_dir: Path,
    src_model_dir: Path,
    shape: str | Shape = "7b",
    base_name: str | None = None,
) -> dict:
    """Pad a plain LoRA adapter of src_model_dir so that it fits widen_model's output; dst_dir must not exist.
    base_name, when given, becomes the adapter config's base_model_name_or_path."""
    import torch

    src_adapter_dir, src_model_dir, dst_dir = Path(src_adapter_dir), Path(src_model_dir), Path(dst_dir)
    name, sh = _shape(shape)
    lay = Layout(json.loads((src_model_dir / "config.json").read_text()), sh)
    ad = load_adapter(src_adapter_dir)
    if ad.replace or ad.base_override or ad.dora or ad.fan_in_fan_out:
        raise StageError(f"{src_adapter_dir}: only plain LoRA on Linear layers pads (no DoRA, saved modules)")
    out: dict[str, Any] = {}
    per_layer: dict[int, dict[str, tuple[str, str]]] = {}
    for t in ad.targets.values():
        parts = t.module.split(".")
        if not (len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[4] in (*ATTN, *MLP)):
            raise StageError(f"{src_adapter_dir}: LoRA on {t.module} cannot be padded (attention and MLP only)")
        per_layer.setdefault(int(parts[2]), {})[parts[4]] = (t.a, t.b)
        # A [r, in] takes the weight's column layout, B [out, r] its row layout and scale.
        n_out, rows, n_in, cols, scale = lay.placement(parts[4])
        a, b = ad.reader.get(t.a), ad.reader.get(t.b)
        out[t.a] = place(a, (a.shape[0], n_in), cols=cols)
        out[t.b] = place(b, (n_out, b.shape[1]), rows=rows, scale=scale)
    for i in range(lay.L, sh.num_hidden_layers):  # the added layers: zero factors
        src_layer = lay.source_layer(i)
        for proj, keys in per_layer.get(src_layer, {}).items():
            module = f"model.layers.{i}.{'self_attn' if proj in ATTN else 'mlp'}.{proj}"
            rank = scaling_for(ad.config, module)[1]
            a, b = (k.replace(f".layers.{src_layer}.", f".layers.{i}.") for k in keys)
            out[a] = torch.zeros(rank, out[keys[0]].shape[1], dtype=out[keys[0]].dtype)
            out[b] = torch.zeros(out[keys[1]].shape[0], rank, dtype=out[keys[1]].dtype)
    ad.reader.close()

    def layer_key(k: str):
        parts = k.split(".")
        i = parts.index("layers") + 1 if "layers" in parts else None
        return (int(parts[i]) if i else -1, k)

    keys = sorted(out, key=layer_key)
    dtype = {k: BY_TORCH_NAME[str(out[k].dtype).removeprefix("torch.")][0] for k in keys}
    infos = [TensorInfo(k, dtype[k], tuple(out[k].shape)) for k in keys]

    def fill(tmp: Path) -> None:
        with ShardWriter(tmp / ADAPTER_WEIGHTS, infos) as writer:
            for k in keys:
                writer.write(k, out[k])
        config = dict(ad.config)
        if base_name is not None:
            config["base_model_name_or_path"] = base_name
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in (*TOKENIZER_FILES, "README.md"):
            if (src_adapter_dir / f).is_file():
                shutil.copy2(src_adapter_dir / f, tmp / f)
        inputs = {**_model_inputs(src_model_dir), "adapter": sorted(src_adapter_dir.glob("adapter_*"))}
        (tmp / PROVENANCE).write_text(json.dumps(_provenance("adapter", name, sh, inputs), indent=2) + "\n")

    _publish(dst_dir, fill)
    return {"shape": name, "tensors": len(keys), "bytes": sum(i.nbytes for i in infos)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/widen.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="widen a checkpoint")
    a = sub.add_parser("adapter", help="pad a LoRA adapter to fit the widened checkpoint")
    for p in (m, a):
        p.add_argument("--src", type=Path, required=True, help="source checkpoint (model) or adapter folder")
        p.add_argument("--dst", type=Path, required=True, help="folder to create")
        p.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="target shape")
    a.add_argument("--src-model", type=Path, required=True, help="the checkpoint the adapter was trained on")
    a.add_argument("--base-name", help="base_model_name_or_path to write into the adapter config")
    args = parser.parse_args(argv)
    try:
        if args.what == "model":
            stats = widen_model(args.src, args.dst, args.shape)
        else:
            stats = widen_adapter(args.src, args.dst, args.src_model, args.shape, args.base_name)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
