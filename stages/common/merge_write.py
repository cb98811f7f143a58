"""Merge writing: a Plan's tensors streamed into size-bounded safetensors shards, plus the side files.

    stats = write_merged(plan, out_dir, shard_bytes)   # shards, index, config, tokenizer; metrics

Base tensors are read one at a time with plain reads (safetensors_io.py), each is merged and written
into shards whose headers were planned up front, and the next tensor is built while one is written:
resident memory is the interpreter plus about two tensors in flight, not the model.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stages.common.errors import console
from stages.common.merge_plan import Plan, build_tensor
from stages.common.preflight import (
    GiB,
    checkpoint_bytes,
    process_memory,
    release_freed_tensors,
    reset_peak_memory,
)
from stages.common.safetensors_io import ShardWriter, plan_shards, shard_names, write_index

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
SIDE_FILES_BYTES = 64 << 20  # disk allowance for config, tokenizer and index beside the shards


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def write_merged(plan: Plan, out_dir: Path, shard_bytes: int) -> dict[str, Any]:
    """Write the merged checkpoint into out_dir (which the caller publishes); its metrics."""
    console.print(
        f"merging {plan.adapter.describe()} into {plan.base_dir} ({human(plan.param_count)} parameters) "
        f"as {plan.dtype}, onto {plan.onto}" + (f" {plan.quant.describe()}" if plan.onto == "dequantized" else "")
    )
    t0 = time.monotonic()
    # The write's own peak, against the RSS it started from (interpreter, torch, the plan): what it
    # adds must follow the largest tensor, not the model (tests/test_merge.py).
    release_freed_tensors()
    start = process_memory()
    reset = reset_peak_memory()
    stats = write_checkpoint(plan, out_dir, shard_bytes)
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
    return stats


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
