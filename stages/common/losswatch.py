"""The train stage's non-finite-loss stop, without a host sync at every step.

`float(loss)` after each step makes the CPU wait for the GPU to finish that step before it may queue
the next one, so the GPU idles while the next step's first kernels are launched. Instead each step's
loss is copied to pinned host memory on the GPU's stream (non-blocking) with an event behind it, and
is read one step later, when the GPU has long finished it. Before a checkpoint is written every
pending loss is read (a sync, but only at save steps), so no checkpoint follows a non-finite loss;
the step reported is the one whose loss was non-finite. On the CPU the value is read at once.
"""

from __future__ import annotations

import math
from collections import deque


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}")
        self.step, self.value = step, value


class LossWatch:
    """push(loss, step) after each micro-step; drain() before anything that must not follow a bad loss."""

    def __init__(self, lag: int = 1):
        self.lag = lag
        self.pending: deque = deque()

    def push(self, loss, step: int) -> None:
        import torch

        loss = loss.detach()
        if loss.device.type != "cuda":
            self._check(float(loss), step)
            return
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((host, done, step))
        while len(self.pending) > self.lag:
            self._pop()

    def drain(self) -> None:
        while self.pending:
            self._pop()

    def _pop(self) -> None:
        host, done, step = self.pending.popleft()
        done.synchronize()
        self._check(float(host), step)

    def _check(self, value: float, step: int) -> None:
        if not math.isfinite(value):
            self.pending.clear()
            raise NonFiniteLoss(step, value)
