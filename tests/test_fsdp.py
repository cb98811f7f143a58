"""The train stage's FSDP path on the CPU (2 processes, gloo): a base written already in NF4
(benchmarks/random_base.py, as the Llama-2-70B-shaped benchmark base) loads on the host, every
parameter (the 4-bit weights in their bf16 storage too) is sharded by FSDP2 with the quantization
constants left whole on each rank, LoRA trains, and the adapter is gathered whole on every rank for
saving. The Trainer does not apply FSDP on the CPU (it falls back to DDP there), so this drives
FSDP2 directly; the GPU run is benchmarks/train_throughput.py --profiles 24gb-fsdp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_fsdp2_shards_a_prequantized_base_and_trains_lora(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path / "base")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{n}.json").read_text()) for n in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["quant_states"] == 14  # 7 linear layers x 2 decoder layers
        assert r["sharded"] == r["params"]  # nothing left out of sharding (uint8 storage would be)
        assert r["losses"][-1] < r["losses"][0]
        assert len(r["adapter"]) == 12 and all(len(shape) == 2 for shape in r["adapter"].values())
    assert ranks[0]["losses"] == ranks[1]["losses"]  # one model, sharded: the same loss on every rank
    assert ranks[0]["adapter"] == ranks[1]["adapter"]
