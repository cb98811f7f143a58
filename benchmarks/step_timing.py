"""Where a training step's time goes, per rank, without adding a host sync: CUDA events on the
compute stream at the step's start, when the last LoRA gradient of the backward pass is computed,
after backward returns (under DDP: after the stream has waited for the gradient all-reduce) and at
the step's end, read once training is over. Used by benchmarks/train_throughput.py --timing.

Per step and rank, on the GPU's timeline:
  compute   = step start -> last gradient ready        (forward, backward, in-step host stalls)
  comm_wait = last gradient ready -> backward returned  (the all-reduce, and waiting for slower ranks)
  optimizer = backward returned -> step end             (clip, optimizer, zero_grad)
  gap       = previous step end -> step start           (the GPU idle while the host fetches the next
                                                         batch: data loader, collectives before the step)
and the tokens each rank got (real and padded, from the collator).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


class _HostEvent:
    def __init__(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1e3


class StepTiming(TrainerCallback):
    def __init__(self, trainer, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.steps_seen: list[dict] = []
        self.batches: list[tuple[int, int]] = []  # (real, padded) tokens of each micro-batch, in order
        self.current: dict | None = None
        self.last_end = None
        collate = trainer.data_collator

        def counting_collator(rows):
            batch = collate(rows)
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            self.batches.append((real, int(batch["input_ids"].numel())))
            return batch

        trainer.data_collator = counting_collator
        original_step = trainer.training_step

        def timed_training_step(*args, **kwargs):
            loss = original_step(*args, **kwargs)
            if self.current is not None:
                self.current["after_backward"] = self._event()
            return loss

        trainer.training_step = timed_training_step
        # The backward pass ends with the first decoder layer: its LoRA gradients are computed last.
        first_layer = [p for n, p in trainer.model.named_parameters() if p.requires_grad and ".layers.0." in n]
        for p in first_layer:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    @staticmethod
    def _event():
        if not torch.cuda.is_available():  # a dry run on the CPU: host times
            return _HostEvent()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _grad_ready(self, _param):
        if self.current is not None:
            self.current["grad_ready"] = self._event()

    def on_step_begin(self, args, state, control, **kw):
        self.current = {"begin": self._event(), "prev_end": self.last_end, "step": state.global_step + 1}

    def on_step_end(self, args, state, control, **kw):
        if self.current is None:
            return
        self.current["end"] = self.last_end = self._event()
        self.steps_seen.append(self.current)
        self.current = None

    def summary(self) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timed = [s for s in self.steps_seen if self.warmup < s["step"] <= self.warmup + self.steps]
        rows = []
        for s in timed:
            ready = s.get("grad_ready") or s["after_backward"]
            rows.append(
                {
                    "compute": s["begin"].elapsed_time(ready) / 1e3,
                    "comm_wait": ready.elapsed_time(s["after_backward"]) / 1e3,
                    "optimizer": s["after_backward"].elapsed_time(s["end"]) / 1e3,
                    "gap": s["prev_end"].elapsed_time(s["begin"]) / 1e3 if s["prev_end"] else 0.0,
                }
            )
        accum = max(1, len(self.batches) // max(1, len(self.steps_seen)))
        tokens = self.batches[self.warmup * accum : (self.warmup + self.steps) * accum]
        total = {k: round(sum(r[k] for r in rows), 3) for k in ("compute", "comm_wait", "optimizer", "gap")}
        return {
            "rank": int(os.environ.get("RANK", "0")),
            "steps": len(rows),
            "seconds": total,
            "real_tokens": sum(t[0] for t in tokens),
            "padded_tokens": sum(t[1] for t in tokens),
            "per_step": [{k: round(v, 4) for k, v in r.items()} for r in rows],
            "per_step_tokens": tokens,
        }

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        (directory / f"rank{summary['rank']}.json").write_text(json.dumps(summary) + "\n")


def combine(directory: Path) -> dict | None:
    """The ranks' summaries side by side, and what the slowest rank costs the others."""
    ranks = [json.loads(p.read_text()) for p in sorted(directory.glob("rank*.json"))]
    if not ranks:
        return None
    out = {"per_rank": [{k: r[k] for k in ("rank", "steps", "seconds", "real_tokens", "padded_tokens")} for r in ranks]}
    if len(ranks) > 1:
        steps = min(r["steps"] for r in ranks)
        # Per step, a rank's wait beyond the pure transfer: its comm_wait minus the smallest comm_wait.
        waits = [
            sum(r["per_step"][i]["comm_wait"] - min(x["per_step"][i]["comm_wait"] for x in ranks) for i in range(steps))
            for r in ranks
        ]
        padded = [[t[1] for t in r["per_step_tokens"]] for r in ranks]
        n = min(len(p) for p in padded)
        out["waiting_for_peers_s"] = [round(w, 3) for w in waits]
        out["padded_token_imbalance"] = round(
            sum(max(p[i] for p in padded) for i in range(n)) / (sum(sum(p[:n]) for p in padded) / len(padded)) - 1, 4
        )
    return out
