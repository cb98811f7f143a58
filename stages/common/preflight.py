"""Memory preflight: before heavy work, each stage checks that the host has the RAM its peak needs
and stops with the numbers when it does not, instead of being killed by the kernel halfway.

The estimates are upper bounds derived from how each stage works, checked against measurements:

- merge streams tensor by tensor: a base tensor, its float32 working copy and the merged output,
  plus the whole adapter and the interpreter with torch. 4 × the largest tensor + the adapter +
  768 MiB (7B shapes, r=64: 1.85 GiB estimated, 1.32 GiB measured by benchmarks/merge.py; the demo:
  0.97 GiB estimated, 0.45 GiB measured). The interpreter with torch alone varies: the tiny test
  model's merge peaked at 0.45 GiB in one run and 0.63 GiB in another, over a 512 MiB allowance.
- convert (llama.cpp's converter) reads lazily and writes tensor by tensor, in float32 at worst:
  4 × the largest tensor + 768 MiB (Python, torch, the vocab). Demo: 0.96 estimated, 0.42 measured.
- quantize (llama-quantize) converts one tensor at a time to float32 and quantizes it: 8 bytes per
  element of the largest tensor + 256 MiB. Demo: 0.46 GiB estimated, 0.21 GiB measured.
- train on the CPU holds the 16-bit checkpoint while bitsandbytes quantizes it (1.5 × its size),
  and the activations of a full batch at max_seq_length kept for the backward pass: per layer
  s·b·h·(34 + 5·a·s/h) bytes in 16 bits (Korthikanti et al. 2022, eq. 1; twice that in float32),
  plus the logits, 12 bytes per batch × sequence × vocab entry (16-bit, the loss's float32 copy,
  its gradient); + 1 GiB. The demo (SmolLM2-135M, batch 8, 256 tokens): 4.3 GiB estimated, 2.8 GiB
  measured (3 steps and the evaluation; its rows are ~100 tokens). The previous bound, without
  activations, was 1.4 GiB. On a GPU the host holds one shard at a time: the largest
  shard + 1 GiB.
- report loads the merged model in transformers (bfloat16 at least, float32 when that fits):
  1.2 × its 16-bit size + 512 MiB.

Set KILN_SKIP_MEMORY_CHECK=1 to run anyway (swap, or a host whose available figure is wrong).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from stages.common.errors import StageError
from stages.common.safetensors_io import read_header

MiB, GiB = 1 << 20, 1 << 30
ENV_SKIP = "KILN_SKIP_MEMORY_CHECK"
INTERPRETER = 768 * MiB  # Python with torch and transformers imported (0.45-0.63 GiB measured)


def process_memory() -> dict[str, int]:
    """This process's resident set now (VmRSS), its high-water mark (VmHWM) and its anonymous part
    (RssAnon), in bytes, from /proc/self/status; empty where /proc is missing."""
    fields = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon"}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in fields:
            found[fields[key]] = int(value.split()[0]) * 1024  # kB
    return found


def release_freed_tensors() -> None:
    """Make glibc return every freed block of 1 MiB or more to the OS at once. Its default mmap
    threshold grows with the blocks freed, so freed multi-MB tensors stay in the heap and a
    streaming stage's RSS follows fragmentation, not its live tensors (merge of 0.27B: +62 MB
    with this, +112 to +130 MB without, from run to run)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, which also stops the dynamic growth


def reset_peak_memory() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so that a later reading is the peak of
    what came after; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def check_free_memory(needed_bytes: int, what: str) -> None:
    """StageError with the numbers when less memory is available than `what` needs."""
    if os.environ.get(ENV_SKIP) == "1":
        return
    available = psutil.virtual_memory().available
    if available < needed_bytes:
        raise StageError(
            f"not enough memory for {what}: it needs about {needed_bytes / GiB:.1f} GiB, "
            f"{available / GiB:.1f} GiB is available; free memory or use a larger host "
            f"({ENV_SKIP}=1 skips this check)"
        )


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def largest_tensor_bytes(folder: Path) -> int:
    """Bytes of the largest tensor in a safetensors checkpoint, from the headers alone."""
    sizes = [t.nbytes for f in safetensors_files(folder) for t in read_header(f)[0].values()]
    return max(sizes, default=0)


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in safetensors_files(folder))


def merge_peak(base: Path, adapter: Path) -> int:
    return 4 * largest_tensor_bytes(base) + checkpoint_bytes(adapter) + INTERPRETER


def convert_peak(merged: Path) -> int:
    return 4 * largest_tensor_bytes(merged) + INTERPRETER


def quantize_peak(largest_tensor_elements: int) -> int:
    return 8 * largest_tensor_elements + 256 * MiB


def activation_bytes(config: dict, batch: int, seq: int, bytes_per_value: int) -> int:
    """What one training step on a batch of `seq` tokens keeps for backward, without recomputation."""
    h, a, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    per_layer = seq * batch * h * (34 + 5 * a * seq / h) * bytes_per_value / 2
    return int(layers * per_layer) + 12 * batch * seq * config["vocab_size"]


def train_peak(base: Path, device: str, batch: int, seq: int, half: bool) -> int:
    """Host RAM of the train stage; `half`: activations in 16 bits (bf16 or fp16 training)."""
    if device == "cpu":
        config = json.loads((base / "config.json").read_text())
        acts = activation_bytes(config, batch, seq, 2 if half else 4)
        return int(1.5 * checkpoint_bytes(base)) + acts + GiB
    return max((f.stat().st_size for f in safetensors_files(base)), default=0) + GiB


def report_peak(merged: Path) -> int:
    return int(1.2 * checkpoint_bytes(merged)) + 512 * MiB


# --- Per stage, as specs.py declares them: (bytes, what for) ----------------------------------


def train_memory(cfg, layout, *, base: Path, device: str) -> tuple[int, str]:
    t = cfg.training
    peak = train_peak(base, device, t.batch_size, cfg.data.max_seq_length, t.bf16 or t.fp16)
    return peak, f"loading the base model and training on the {device}"


def merge_memory(cfg, layout, *, base: Path) -> tuple[int, str]:
    return merge_peak(base, layout.adapter), "the streaming merge"


def convert_memory(cfg, layout) -> tuple[int, str]:
    return convert_peak(layout.merged), "the GGUF conversion"


def quantize_memory(cfg, layout, *, largest_tensor_elements: int) -> tuple[int, str]:
    return quantize_peak(largest_tensor_elements), "llama-quantize"


def report_memory(cfg, layout) -> tuple[int, str]:
    return report_peak(layout.merged), "the merged model's perplexity in transformers"
