"""The table at the end of a device campaign: every result in a folder, then the ratios the issue asks
for, computed from results of the same run.

    python benchmarks/campaign/summary.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def key(r: dict) -> str:
    nodes = f"/{r['nodes']}nodes" if r.get("nodes", 1) > 1 else ""
    shape = "" if r.get("model", "").startswith("mistral-7b") else "/" + r.get("model", "?").split()[0]
    return f"{r['profile']}/{r.get('gpus', 1)}gpu{nodes}{shape}/{r.get('label') or ''}"


def max_rel_diff(a: list[float], b: list[float]) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> int:
    folder = Path((sys.argv[1:] if argv is None else argv)[0])
    results = {}
    for path in sorted(folder.glob("train-throughput-*.json")):
        r = json.loads(path.read_text())
        r["label"] = next(
            (p for p in ("today", "new", "real", "nodes", "fsdp", "b80", "vram") if f"-{p}-" in path.name), ""
        )
        r["file"] = path.name
        results[key(r)] = r
    print(f"{'result':40s} {'tok/s':>9s} {'alloc GiB':>9s} {'MFU/GPU':>8s} {'pad':>6s}  file")
    for k, r in results.items():
        print(
            f"{k:40s} {r.get('tokens_per_s', 'ERR')!s:>9s} {r.get('peak_allocated_gib')!s:>9s} "
            f"{r.get('mfu_per_gpu')!s:>8s} {r.get('padding_share')!s:>6s}  {r['file']} {r.get('error', '')}"
        )

    def tps(k):
        return results.get(k, {}).get("tokens_per_s")

    ratios = {
        "DDP new / 1 GPU new (24gb)": (tps("24gb/2gpu/new"), tps("24gb/1gpu/new")),
        "DDP today / 1 GPU today (24gb)": (tps("24gb/2gpu/today"), tps("24gb/1gpu/today")),
        "24gb new / 24gb today (1 GPU)": (tps("24gb/1gpu/new"), tps("24gb/1gpu/today")),
        "24gb-fused new / 24gb today (1 GPU)": (tps("24gb-fused/1gpu/new"), tps("24gb/1gpu/today")),
        "24gb-fused / 24gb (new, 1 GPU)": (tps("24gb-fused/1gpu/new"), tps("24gb/1gpu/new")),
        "24gb today / reference today": (tps("24gb/1gpu/today"), tps("reference/1gpu/today")),
        "24gb new / reference today": (tps("24gb/1gpu/new"), tps("reference/1gpu/today")),
        "2 nodes x 1 GPU / 1 GPU new (24gb)": (tps("24gb/2gpu/2nodes/nodes"), tps("24gb/1gpu/new")),
    }
    print()
    for name, (a, b) in ratios.items():
        if a and b:
            print(f"{name:40s} {a / b:.3f}  ({a} / {b})")
    pairs = {
        "loss, 24gb-fused vs 24gb (same batches)": ("24gb/1gpu/new", "24gb-fused/1gpu/new"),
        "loss, 2 nodes x b40 vs 1 GPU b80": ("24gb/1gpu/b80", "24gb/2gpu/2nodes/nodes"),
        "loss, DDP 2 x b40 vs 2 nodes x b40": ("24gb/2gpu/new", "24gb/2gpu/2nodes/nodes"),
    }
    for name, (a, b) in pairs.items():
        diff = max_rel_diff(results.get(a, {}).get("losses", []), results.get(b, {}).get("losses", []))
        if diff is not None:
            print(f"{name:40s} max relative difference {diff:.2e}")
    for k, r in results.items():
        st = r.get("step_timing")
        if st:
            ranks = "; ".join(
                f"r{x['rank']} {x['seconds']} real {x['real_tokens']} padded {x['padded_tokens']}"
                for x in st["per_rank"]
            )
            extra = (
                f" wait-for-peers {st.get('waiting_for_peers_s')} padded-imbalance {st.get('padded_token_imbalance')}"
            )
            print(f"timing {k}: {ranks}{extra if 'waiting_for_peers_s' in st else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
