"""One rank of tests/test_fsdp.py (run under torchrun, gloo, CPU): FSDP2 over a pre-quantized NF4 base
with LoRA, as the train stage's FSDP path sets it up (stages/common/fsdp.py), three optimizer steps;
writes rank<N>.json beside the base folder (two ranks printing to one pipe can interleave)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def main(base: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from random_base import tiny_config, write_prequantized
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from stages.common import fsdp

    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        write_prequantized(base, tiny_config(), device="cpu")
    dist.barrier()
    assert fsdp.prequantized(base)
    model = AutoModelForCausalLM.from_pretrained(base, device_map={"": "cpu"}, dtype=torch.bfloat16)
    moved = fsdp.quant_states_to(model, "cpu")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"])
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)  # as trl trains QLoRA adapters: one dtype per FSDP group
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.tensor([[1, 5, 9, 30, 44, 60, 7, 8, 100, 200, 17, 3]])
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    adapter = fsdp.full_adapter_state(model)
    report = {
        "rank": dist.get_rank(),
        "quant_states": moved,
        "sharded": sum(isinstance(p, DTensor) for p in model.parameters()),
        "params": sum(1 for _ in model.parameters()),
        "losses": losses,
        "adapter": {k: list(v.shape) for k, v in adapter.items()},
    }
    (base.parent / f"rank{report['rank']}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
