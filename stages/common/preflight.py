"""Memory preflight: before heavy work, each stage checks that the host has the RAM its peak needs
and stops with the numbers when it does not, instead of being killed by the kernel halfway.

Each estimate is an upper bound derived from how the stage works (each function says how);
docs/memory.md sets them against measured peaks, with the commands that measure them.
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
INTERPRETER = 768 * MiB  # Python with torch and transformers imported (docs/memory.md)


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
    threshold grows with the blocks freed, so freed multi-MB tensors would stay in the heap and a
    streaming stage's RSS would follow fragmentation, not its live tensors (docs/memory.md)."""
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
    """Streaming, tensor by tensor: a base tensor, its float32 working copy and the merged output
    (4 × the largest tensor), plus the whole adapter and the interpreter."""
    return 4 * largest_tensor_bytes(base) + checkpoint_bytes(adapter) + INTERPRETER


def convert_peak(merged: Path) -> int:
    """llama.cpp's converter reads lazily and writes tensor by tensor, in float32 at worst; then the
    conversion check runs the merged model one decoder layer at a time in float32 (hf_stream): a
    layer and the output layer, each twice (the 16-bit read and its float32 copy) with room for the
    activations."""
    return max(4 * largest_tensor_bytes(merged), 4 * largest_layer_bytes(merged) + 4 * largest_tensor_bytes(merged)) + (
        INTERPRETER
    )


def largest_layer_bytes(folder: Path) -> int:
    """Bytes of the largest decoder layer (tensors named ...layers.<i>....), from the headers alone."""
    layers: dict[str, int] = {}
    for f in safetensors_files(folder):
        for name, t in read_header(f)[0].items():
            head, sep, tail = name.partition("layers.")
            if sep:
                key = head + sep + tail.split(".", 1)[0]
                layers[key] = layers.get(key, 0) + t.nbytes
    return max(layers.values(), default=0)


def quantize_peak(largest_tensor_elements: int) -> int:
    """llama-quantize converts one tensor at a time to float32 (4 bytes an element) and quantizes it."""
    return 8 * largest_tensor_elements + 256 * MiB


def activation_bytes(config: dict, batch: int, seq: int, bytes_per_value: int) -> int:
    """What one training step on a batch of `seq` tokens keeps for backward, without recomputation:
    per layer s·b·h·(34 + 5·a·s/h) bytes in 16 bits (Korthikanti et al. 2022, eq. 1), plus the
    logits, 12 bytes per token and vocab entry (16-bit, the loss's float32 copy, its gradient)."""
    h, a, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    per_layer = seq * batch * h * (34 + 5 * a * seq / h) * bytes_per_value / 2
    return int(layers * per_layer) + 12 * batch * seq * config["vocab_size"]


def train_peak(base: Path, device: str, batch: int, seq: int, half: bool) -> int:
    """Host RAM of the train stage; `half`: activations in 16 bits (bf16 or fp16 training). On the CPU:
    the 16-bit checkpoint while bitsandbytes quantizes it (1.5 × its size) and a full batch's
    activations; on a GPU the host holds one shard at a time."""
    if device == "cpu":
        config = json.loads((base / "config.json").read_text())
        acts = activation_bytes(config, batch, seq, 2 if half else 4)
        return int(1.5 * checkpoint_bytes(base)) + acts + GiB
    return max((f.stat().st_size for f in safetensors_files(base)), default=0) + GiB


# --- Per stage, as specs.py declares them: (bytes, what for) ----------------------------------


def train_memory(cfg, layout, *, base: Path, device: str) -> tuple[int, str]:
    t = cfg.training
    peak = train_peak(base, device, t.batch_size, cfg.data.max_seq_length, t.bf16 or t.fp16)
    return peak, f"loading the base model and training on the {device}"


def merge_memory(cfg, layout, *, base: Path) -> tuple[int, str]:
    return merge_peak(base, layout.adapter), "the streaming merge"


def convert_memory(cfg, layout) -> tuple[int, str]:
    return convert_peak(layout.merged), "the GGUF conversion and its check against the merged model"


def quantize_memory(cfg, layout, *, largest_tensor_elements: int) -> tuple[int, str]:
    return quantize_peak(largest_tensor_elements), "llama-quantize"
