"""Up-front checks of the data files (checks.py runs them): each exists, parses, and its rows fit
data.format, found in seconds instead of after the model has loaded.

JSONL files are read whole, line by line, in binary: a line is parsed, its row checked against the
format (data.RowFormat.problem, the same rules the train stage applies), and nothing is kept. A
gzip or zstd file named .jsonl, a last line cut short (an interrupted download or copy), a
directory where a file belongs: each is one line that says what to do. Parquet files are checked
by their magic bytes and their first PARQUET_ROWS rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.common.checks import Finding
from stages.common.data import RowFormat

READABLE = (".jsonl", ".json", ".parquet")  # what data.read_rows reads
PARQUET_ROWS = 1000
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip", b"BZh": "bzip2"}
SHOWN = 3  # bad lines named in a message


def _compressed(head: bytes) -> str | None:
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, why it did not parse) for every non-blank line."""
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw), None
            except ValueError:
                cut = not raw.endswith(b"\n")
                yield n, None, "cut short: the file ends in the middle of this line" if cut else "not valid JSON"


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(path)
    n = 0
    for batch in reader.iter_batches(batch_size=PARQUET_ROWS):
        for row in batch.to_pylist():
            n += 1
            yield n, row, None
        if n >= PARQUET_ROWS:
            return


def _listing(folder: Path) -> str:
    found = sorted(p.name for p in folder.iterdir() if p.suffix in READABLE)[:5]
    return f"list its files instead: {', '.join(found)}" if found else "no .jsonl or .parquet files are in it"


def check_file(path: Path, key: str, fmt: RowFormat, max_bad: float) -> tuple[list[Finding], int]:
    """Findings for one data file named in config key `key`, and the rows that fit."""
    where = str(path)
    if path.is_dir():
        return [Finding(where, f"is a directory, not a data file ({key})", _listing(path))], 0
    if not path.exists():
        return [Finding(where, f"not found ({key})", f"fix the path in {key}, or create the file")], 0
    with path.open("rb") as fh:
        head = fh.read(4)
    if kind := _compressed(head):
        fix = f"decompress it (e.g. `{kind} -dc {path} > {path.stem}.plain{path.suffix}`) and list that file"
        return [Finding(where, f"is {kind}-compressed, but named {path.suffix or 'without a suffix'}", fix)], 0
    if path.suffix not in READABLE:
        fix = "convert it to JSONL or Parquet (datasets: load_dataset(...).to_json(path, lines=True))"
        return [Finding(where, f"is {path.suffix or 'extension-less'}; expected .jsonl or .parquet", fix)], 0
    if path.suffix == ".parquet":
        with path.open("rb") as fh:
            fh.seek(-4 if path.stat().st_size >= 8 else 0, 2)
            tail = fh.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            return [Finding(where, "is not a complete Parquet file (no PAR1 marker at both ends)", "rewrite it")], 0
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    return _check_rows(where, rows, key, fmt, max_bad)


def _check_rows(where: str, rows, key: str, fmt: RowFormat, max_bad: float) -> tuple[list[Finding], int]:
    total, good, fields = 0, 0, set()
    bad: list[tuple[int, str]] = []
    cut: Finding | None = None
    for n, obj, why in rows:
        total += 1
        if why is None and not isinstance(obj, dict):
            why = f"a JSON {type(obj).__name__}, not an object"
        if why is None:
            fields.update(obj)
            why = fmt.problem(obj)
        if why is None:
            good += 1
            continue
        if why.startswith("cut short"):
            cut = Finding(
                f"{where}:{n}", why, "the file is truncated: download or copy it again (or delete the broken line)"
            )
        bad.append((n, why))
    if cut is not None:
        return [cut], good
    if total == 0:
        return [Finding(where, "has no rows", f"fill it, or drop it from {key}")], 0
    name = fmt.cfg.format
    missing = [f for f in fmt.required_fields() if f not in fields]
    if missing and good == 0:
        found = ", ".join(sorted(fields)[:8]) or "none"
        return [
            Finding(
                where,
                f"no {', '.join(map(repr, missing))} field in any row for data.format={name} (found fields: {found})",
                "set data.format (and data.text_field) to match the file, or convert the file",
            )
        ], 0
    if not bad:
        return [], good
    first = f"{where}:{bad[0][0]}"
    lines = ", ".join(str(n) for n, _ in bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
    what = f"{bad[0][1]} ({len(bad)} of {total} rows do not fit data.format={name}; lines {lines})"
    if len(bad) / total > max_bad:
        fix = f"fix or drop those rows; more than data.max_bad_fraction={max_bad} would stop the train stage"
        return [Finding(first, what, fix)], good
    return [Finding(first, what, "the train stage drops them (within data.max_bad_fraction)", "note")], good
