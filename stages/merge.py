"""Merge stage: fold a LoRA adapter into the base weights, shard by shard, on the CPU.

    python -m stages.merge --config runs/demo/config.yaml                                  # in the pipeline
    python -m stages.merge --base BASE_DIR --adapter ADAPTER_DIR --output OUT_DIR [--dtype float16]
    docker compose run --rm merge python -m stages.merge --base /work/cache/models/M --adapter ... --output ...

The base checkpoint is read one tensor at a time from its safetensors shards; each tensor that
has LoRA factors gets W + scale * B @ A (the same arithmetic, in the same dtypes, as peft's
merge_and_unload, so the result is bit-identical), `modules_to_save` tensors replace their base
tensors, and merged tensors are written out in shards of at most --shard-size. Memory stays near
one output shard plus one tensor, never the whole model. Output: an HF checkpoint (sharded
safetensors with an index, config, generation config, tokenizer files).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common import names
from stages.common.artifacts import check_free_disk, dir_size, stage_output, verify_manifest
from stages.common.cli import context, stage_parser
from stages.common.errors import StageError, console, run_stage
from stages.common.model import check_weights

DTYPES = ("float16", "bfloat16")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
)
PREFIX = "base_model.model."
DEFAULT_SHARD = 1 << 30


@dataclass
class Adapter:
    """LoRA factors grouped by the base tensor they change."""

    config: dict[str, Any]
    lora: dict[str, dict[str, str]] = field(default_factory=dict)  # base weight key -> {"A": key, "B": key, kind}
    replace: dict[str, str] = field(default_factory=dict)  # base key -> adapter key (modules_to_save)
    path: Path | None = None

    def scaling(self, module: str) -> float:
        cfg = self.config
        r = cfg.get("r", 8)
        alpha = cfg.get("lora_alpha", 8)
        for key, value in (cfg.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                r = value
                break
        for key, value in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = value
                break
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def load_adapter(adapter_dir: Path) -> Adapter:
    """Read adapter_config.json and index adapter_model.safetensors; refuse what cannot merge exactly."""
    from safetensors import safe_open

    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        found = ", ".join(sorted(p.name for p in adapter_dir.iterdir())[:6]) if adapter_dir.is_dir() else "no folder"
        raise StageError(
            f"{adapter_dir} is not a PEFT adapter (needs adapter_config.json and adapter_model.safetensors; "
            f"found: {found or 'nothing'}); pass the folder a PeftModel's save_pretrained() wrote"
        )
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise StageError(
            f"{adapter_dir}: peft_type {config.get('peft_type')} is not LoRA; only LoRA adapters merge here"
        )
    if config.get("use_dora"):
        raise StageError(
            f"{adapter_dir}: DoRA adapters are refused: their magnitude vector rescales whole weight columns, "
            "which this streaming merge does not reproduce exactly; merge it with peft's merge_and_unload instead"
        )
    if config.get("lora_bias"):
        raise StageError(f"{adapter_dir}: lora_bias=True adapters are not supported by the streaming merge")
    adapter = Adapter(config=config, path=weights)
    with safe_open(str(weights), "pt") as fh:
        keys = list(fh.keys())
    for key in keys:
        name = key.removeprefix(PREFIX)
        m = re.match(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$", name)
        e = re.match(r"(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.default)?$", name)
        s = re.match(r"(.+)\.modules_to_save(?:\.default)?\.(weight|bias)$", name)
        if m:
            entry = adapter.lora.setdefault(f"{m.group(1)}.weight", {"kind": "linear", "module": m.group(1)})
            entry[m.group(2)[-1]] = key
        elif e:
            entry = adapter.lora.setdefault(f"{e.group(1)}.weight", {"kind": "embedding", "module": e.group(1)})
            entry[e.group(2)[-1]] = key
        elif s:
            adapter.replace[f"{s.group(1)}.{s.group(2)}"] = key
        else:
            raise StageError(f"{weights.name}: tensor {key!r} is neither a LoRA factor nor a saved module")
    return adapter


def base_index(base_dir: Path) -> dict[str, Path]:
    """Every base tensor name -> the shard holding it."""
    from safetensors import safe_open

    check_weights(base_dir)
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: base_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    found = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            found.update(dict.fromkeys(fh.keys(), shard))
    return found


def check_fit(adapter: Adapter, index: dict[str, Path]) -> None:
    """Every adapter target must exist in the base with matching shapes; list the first misfits."""
    from safetensors import safe_open

    problems = [f"{k} (not in base)" for k in [*adapter.lora, *adapter.replace] if k not in index]
    with safe_open(str(adapter.path), "pt") as ad:
        shapes = {k: ad.get_slice(k).get_shape() for k in ad.keys()}  # noqa: SIM118 (safe_open is no dict)
    opened: dict[Path, Any] = {}
    try:
        for key, entry in adapter.lora.items():
            if key not in index or "A" not in entry or "B" not in entry:
                if key in index:
                    problems.append(f"{key} (lora_A or lora_B missing)")
                continue
            fh = opened.setdefault(index[key], safe_open(str(index[key]), "pt").__enter__())
            out_dim, in_dim = fh.get_slice(key).get_shape()
            a, b = shapes[entry["A"]], shapes[entry["B"]]
            if entry["kind"] == "embedding":
                want = (a[1], b[0])  # (B @ A).T is (num_embeddings, dim)
                got = (out_dim, in_dim)
            else:
                want = (b[0], a[1])
                got = (in_dim, out_dim) if adapter.config.get("fan_in_fan_out") else (out_dim, in_dim)
            if tuple(want) != tuple(got) or a[0] != b[1]:
                problems.append(f"{key} (base {list(got)}, adapter B{list(b)} @ A{list(a)})")
        for key, akey in adapter.replace.items():
            if key in index:
                fh = opened.setdefault(index[key], safe_open(str(index[key]), "pt").__enter__())
                if list(fh.get_slice(key).get_shape()) != list(shapes[akey]):
                    problems.append(f"{key} (base {fh.get_slice(key).get_shape()}, adapter {shapes[akey]})")
    finally:
        for fh in opened.values():
            fh.__exit__(None, None, None)
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise StageError(
            f"adapter {adapter.path.parent} does not fit base: {'; '.join(problems[:5])}{more}; "
            "was it trained on this base model?"
        )


def merged_tensor(key: str, base, adapter: Adapter, ad_fh, dtype):
    """One output tensor, computed exactly as peft's merge_and_unload computes it."""
    import torch

    if key in adapter.replace:
        return ad_fh.get_tensor(adapter.replace[key]).to(dtype)
    weight = base.to(dtype)
    entry = adapter.lora.get(key)
    if entry is None:
        return weight
    # peft loads adapter factors in float32 (autocast_adapter_dtype) and adds the float32 delta
    # into the 16-bit weight in place, which rounds once, from float32.
    a = ad_fh.get_tensor(entry["A"]).to(torch.float32)
    b = ad_fh.get_tensor(entry["B"]).to(torch.float32)
    scale = adapter.scaling(entry["module"])
    if entry["kind"] == "embedding":
        delta = (b @ a).T * scale
    else:
        delta = b @ a
        if adapter.config.get("fan_in_fan_out"):
            delta = delta.T
        delta = delta * scale
    weight += delta
    return weight


def stream_merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype_name: str, shard_size: int) -> dict:
    """Write the merged checkpoint into out_dir (which the caller makes final atomically)."""
    import torch
    from rich.progress import Progress
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    adapter = load_adapter(adapter_dir)
    index = base_index(base_dir)
    check_fit(adapter, index)
    out_dir.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    weight_map: dict[str, str] = {}
    written: list[str] = []
    n_merged = 0

    def flush() -> None:
        if not shards[-1]:
            return
        name = f"model-{len(written) + 1:05d}.safetensors"
        save_file(shards[-1], str(out_dir / name), metadata={"format": "pt"})
        for k in shards[-1]:
            weight_map[k] = name
        written.append(name)
        shards[-1] = {}
        sizes[-1] = 0

    by_shard: dict[Path, list[str]] = {}
    for key, shard in index.items():
        by_shard.setdefault(shard, []).append(key)
    with safe_open(str(adapter.path), "pt") as ad_fh, Progress(transient=True) as progress:
        task = progress.add_task("merging tensors", total=len(index))
        for shard, keys in sorted(by_shard.items()):
            with safe_open(str(shard), "pt") as fh:
                for key in keys:
                    tensor = merged_tensor(key, fh.get_tensor(key), adapter, ad_fh, dtype).contiguous()
                    n_merged += key in adapter.lora or key in adapter.replace
                    nbytes = tensor.numel() * tensor.element_size()
                    if sizes[-1] and sizes[-1] + nbytes > shard_size:
                        flush()
                    shards[-1][key] = tensor
                    sizes[-1] += nbytes
                    progress.advance(task)
        flush()
    # Rename single-shard output to the conventional name and write the index either way.
    total = sum((out_dir / n).stat().st_size for n in written)
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    copy_side_files(base_dir, adapter_dir, out_dir, dtype_name)
    return {"tensors": len(index), "tensors_changed": n_merged, "shards": len(written), "bytes": total}


def copy_side_files(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype_name: str) -> None:
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = dtype_name
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir)
    # The adapter folder's tokenizer wins: training may have set a pad token or a chat template.
    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def standalone(args: argparse.Namespace) -> None:
    """--base/--adapter/--output: write OUT_DIR atomically (a temporary folder beside it, then rename)."""
    out = args.output.resolve()
    if out.exists():
        raise StageError(f"--output {out} exists; remove it or choose another folder")
    check_free_disk(out.parent, dir_size(args.base), "the merged checkpoint")
    tmp = out.parent / f"{names.TMP_PREFIX}{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t0 = time.monotonic()
        stats = stream_merge(args.base, args.adapter, tmp, args.dtype, args.shard_size)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(
        f"merged {stats['tensors_changed']} of {stats['tensors']} tensors into {out} "
        f"in {time.monotonic() - t0:.1f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"
    )


def pipeline(args: argparse.Namespace) -> None:
    ctx = context(args)
    from stages.common.model import resolve

    base = resolve(ctx.cfg.model).path
    verify_manifest(ctx.run_dir, names.TRAIN)
    adapter_dir = ctx.run_dir / names.ADAPTER_DIR
    check_free_disk(ctx.run_dir, dir_size(base), "the merged checkpoint")
    with stage_output(ctx.run_dir, names.MERGE, owned=(names.MERGED_DIR,)) as out:
        t0 = time.monotonic()
        stats = stream_merge(base, adapter_dir, out.path(names.MERGED_DIR), ctx.cfg.merge.dtype, args.shard_size)
        stats.update(wall_s=round(time.monotonic() - t0, 2), peak_rss_gib=round(peak_rss_bytes() / 2**30, 3))
        out.commit(
            inputs={"base": str(base), "adapter": names.ADAPTER_DIR, "dtype": ctx.cfg.merge.dtype}, metrics=stats
        )


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.merge", __doc__)
    parser.add_argument("--base", type=Path, help="base HF checkpoint folder (standalone mode)")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter folder (standalone mode)")
    parser.add_argument("--output", type=Path, help="folder to create for the merged checkpoint (standalone mode)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="merged weights' dtype (standalone)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD, help="max bytes per output shard")
    args = parser.parse_args(argv)
    if args.config is None:
        if not (args.base and args.adapter and args.output):
            parser.error("give --config, or all of --base, --adapter and --output")
        return run_stage(names.MERGE, lambda: standalone(args))
    return run_stage(names.MERGE, lambda: pipeline(args))


if __name__ == "__main__":
    raise SystemExit(main())
