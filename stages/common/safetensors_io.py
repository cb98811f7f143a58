"""Read and write safetensors checkpoints one tensor at a time, with plain file I/O.

The ``safetensors`` library maps a shard into memory; every page a reader touches then counts in
the process's resident set until the file is closed, so streaming a 5 GB shard through
``safe_open`` shows up as 5 GB of RSS. Here tensors are read with ``readinto`` into a fresh
buffer and written with ``write`` from one, so a process holds only the tensors it is working on
(the page cache stays the kernel's business). The file format is the one safetensors defines:
an 8-byte little-endian header length, a JSON header (padded to 8 bytes) naming each tensor's
dtype, shape and byte range, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
METADATA_KEY = "__metadata__"
MAX_HEADER = 100 << 20  # the safetensors library's own limit

# safetensors dtype names <-> torch dtype attribute names, and their sizes in bytes.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
BY_TORCH_NAME = {torch_name: (st, size) for st, (torch_name, size) in DTYPES.items()}


class FormatError(ValueError):
    """The file is not a readable safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int = 0  # byte offsets within the data section
    end: int = 0

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


def nbytes_of(dtype: str, shape: Iterable[int]) -> int:
    n = DTYPES[dtype][1]
    for d in shape:
        n *= d
    return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors by name, file metadata, byte offset where the data section starts)."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise FormatError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise FormatError(f"{path}: header length {length} is implausible; not a safetensors file?")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: unreadable safetensors header ({exc})") from None
    meta = header.pop(METADATA_KEY, None) or {}
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise FormatError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), begin, end)
    return tensors, meta, 8 + length


def _readinto_exact(fh, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise FormatError(f"{fh.name}: file ends early (truncated?)")
        got += n


class ShardReader:
    """One safetensors file; `get` reads one tensor into its own memory (no mmap)."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors, self.metadata, self._data_start = read_header(path)
        self._fh = path.open("rb", buffering=0)

    def get(self, name: str):
        import torch

        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._fh.seek(self._data_start + info.begin)
        _readinto_exact(self._fh, memoryview(buf.numpy()))
        return buf.view(getattr(torch, DTYPES[info.dtype][0])).reshape(info.shape)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CheckpointReader:
    """Every tensor of a checkpoint folder (sharded with an index, or any *.safetensors files)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        self.files = files
        self.info: dict[str, TensorInfo] = {}
        self.shard_of: dict[str, Path] = {}
        for f in files:
            tensors, _, _ = read_header(f)
            for name, info in sorted(tensors.items(), key=lambda kv: kv[1].begin):
                self.info[name] = info
                self.shard_of[name] = f
        self._open: dict[Path, ShardReader] = {}

    def names(self) -> list[str]:
        """Names in storage order (shard by shard, by offset), the order that reads sequentially."""
        return list(self.info)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def get(self, name: str):
        path = self.shard_of[name]
        if path not in self._open:
            self._open[path] = ShardReader(path)
        return self._open[path].get(name)

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def plan_shards(entries: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most max_bytes (a larger tensor gets a shard alone)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in entries:
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return [s for s in shards if s]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Write one safetensors file whose tensor list is known up front, tensor by tensor, in order."""

    def __init__(self, path: Path, entries: list[TensorInfo], metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {METADATA_KEY: metadata or {"format": "pt"}}
        offset = 0
        self._expect: list[tuple[str, int]] = []
        for info in entries:
            nbytes = nbytes_of(info.dtype, info.shape)
            header[info.name] = {
                "dtype": info.dtype,
                "shape": list(info.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expect.append((info.name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header so the data starts 8-byte aligned
        self.path = path
        self.size = 8 + len(raw) + offset
        self._fh = path.open("wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0

    def write(self, name: str, tensor) -> None:
        import torch

        want, nbytes = self._expect[self._next]
        if name != want:
            raise RuntimeError(f"{self.path.name}: expected tensor {want} next, got {name}")
        flat = tensor.contiguous().reshape(-1).view(torch.uint8)
        if flat.numel() != nbytes:
            raise RuntimeError(f"{self.path.name}: {name} has {flat.numel()} bytes, header says {nbytes}")
        self._fh.write(memoryview(flat.numpy()))
        self._next += 1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's error is the story; the half-written file goes with its folder
            self._fh.close()

    def close(self) -> None:
        """Finish the file and flush it to disk (the caller renames it into place afterwards)."""
        if self._next != len(self._expect):
            missing = self._expect[self._next][0]
            self._fh.close()
            raise RuntimeError(f"{self.path.name}: closed before tensor {missing} was written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    payload = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(payload, indent=2) + "\n")
