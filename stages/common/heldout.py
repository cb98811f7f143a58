"""Held-out means held out: evaluate and report score only rows the adapter never trained on.

The train stage records its split in runs/<run>/split.json (``split_record``, listed in its
manifest): the seed, where the held-out rows came from (data.eval_files, or data.eval_fraction
of the training rows), the counts, and a hash of every row it trained on and every row it held
out. Later stages ask ``held_out(cfg, layout)`` for the rows to score: the split made again by
the one split function (data.train_and_held_out, with the recorded seed), keeping only rows the
record holds out and never trained on. Nothing falls back to the training files:

- an adapter imported with ``--from merge --adapter`` has no record (importing removes an old
  one); then only data.eval_files count as held out;
- with no held-out rows, ``HeldOut.rows`` is empty and ``reason`` says why: the stage is skipped
  with that reason, it scores nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from stages.common import names
from stages.common.artifacts import read_manifest
from stages.common.data import load_rows, train_and_held_out
from stages.common.layout import RunLayout


def row_hash(row: dict[str, Any]) -> str:
    """A row as the trainer sees it (after format conversion), by content; 64 bits are plenty."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_record(cfg, train_rows: list[dict[str, Any]], held_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What split.json holds: the train stage's split, by row hashes."""
    d = cfg.data
    return {
        "seed": cfg.training.seed,
        "source": "data.eval_files" if d.eval_files else f"data.eval_fraction={d.eval_fraction}",
        "train_rows": len(train_rows),
        "held_out_rows": len(held_rows),
        "train": sorted({row_hash(r) for r in train_rows}),
        "held_out": sorted({row_hash(r) for r in held_rows}),
    }


def read_record(layout: RunLayout) -> dict[str, Any] | None:
    """The train stage's split.json, when its manifest lists it (an imported adapter has none)."""
    manifest = read_manifest(layout.root, names.TRAIN) or {}
    if layout.rel(layout.split) not in manifest.get(names.M_OUTPUTS, {}):
        return None
    try:
        return json.loads(layout.split.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class HeldOut:
    rows: list[dict[str, Any]]
    source: str  # where they come from, for manifests and reports
    reason: str = ""  # why there are none


def held_out(cfg, layout: RunLayout) -> HeldOut:
    """The rows this run may score: held out by the train stage's recorded split, or data.eval_files
    when there is no record. Empty, with the reason, when there are none."""
    record = read_record(layout)
    if record is None:
        if cfg.data.eval_files:
            rows, _ = load_rows(cfg.data.eval_files, cfg.data)
            return HeldOut(rows, "data.eval_files (the adapter's training rows are not recorded)")
        return HeldOut(
            [],
            "none",
            "the train stage recorded no split (an adapter imported with --adapter), so only data.eval_files "
            "count as held out, and none is set; list held-out rows in data.eval_files to score them",
        )
    split = train_and_held_out(cfg.data, record["seed"])
    trained, held = set(record["train"]), set(record["held_out"])
    recorded = [r for r in split.held_out if row_hash(r) in held]
    rows = [r for r in recorded if row_hash(r) not in trained]
    also_trained = (
        f"; {len(recorded) - len(rows)} also among the training rows, left out" if len(rows) < len(recorded) else ""
    )
    if rows:
        return HeldOut(rows, f"held out by the train stage ({record['source']}, seed {record['seed']}{also_trained})")
    if recorded:
        why = f"all {len(recorded)} rows the train stage held out ({record['source']}) are also training rows"
    else:
        why = f"the train stage held out no rows ({record['source']})"
    return HeldOut(
        [],
        record["source"],
        f"{why}; set data.eval_files (rows not in the training data) or a "
        "data.eval_fraction above 0, and retrain, to score held-out rows",
    )
