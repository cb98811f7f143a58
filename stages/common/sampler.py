"""A length-grouped sampler whose ranks get equal work: the train stage's sampler on 1..N processes.

transformers' LengthGroupedSampler sorts each megabatch by length and cuts it into batches; under
DDP accelerate then deals those batches out round-robin, so at every step rank 0 gets the longer
batch of each sorted pair (about 2% more tokens at the 24gb profile, every step) and the other ranks
wait for it at the gradient all-reduce. Here a step's rows for all ranks (one *global* batch of
world_size x batch_size rows, adjacent in length order) are drawn first and then split between the
ranks by token count: each rank gets one of the W longest rows (so the padded lengths match) and
the rest go, longest first, to the rank with the fewest tokens so far.

The sequence of global batches depends only on the seed, the epoch and world_size x batch_size,
never on how that product is split: 2 processes at batch 8 train on exactly the rows that 1 process
at batch 16 trains on, step by step (tests/test_sampler.py). That is what lets a multi-process
run be compared with a single process (docs/multi-gpu.md).

Indices come out in accelerate's order: for each global batch, rank 0's batch_size indices, then
rank 1's, ...; accelerate's BatchSamplerShard hands batch k*W + r to rank r.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

# Global batches per sorted megabatch: transformers' LengthGroupedSampler uses 50 too, but shrinks
# the megabatch on datasets under 200 batches, which pads more (docs/performance.md has the padding
# shares, from results/train-throughput-24gb-1gpu-today-*). Batch order is shuffled instead.
MEGABATCH_MULT = 50


class BalancedLengthSampler(Sampler[int]):
    """Length-grouped order with each global batch split evenly (by tokens) over `world_size` ranks.

    lengths: token count of every row; batch_size: rows per rank per micro-batch. An epoch holds
    ceil(n / (world_size x batch_size)) global batches; the last is completed with rows from the start
    of the epoch's order, as torch's DistributedSampler does, so every rank always has a full batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be >= 1")
        if not lengths:
            raise ValueError("no rows to sample from")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.global_batch = batch_size * world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.global_batch) * self.global_batch

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches, in training order (rows of each sorted longest first)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        order = np.concatenate([order, order[: len(self) - len(order)]])
        mega = MEGABATCH_MULT * self.global_batch
        batches: list[np.ndarray] = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
        # Batches in random order (transformers keeps each megabatch's in descending length), the one
        # holding the epoch's longest row first: a too-large batch fails at step 1.
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i][0]])
        batches.insert(0, batches.pop(longest))
        return batches

    def split(self, rows: np.ndarray) -> list[list[int]]:
        """One global batch (sorted longest first) -> world_size lists of batch_size rows, balanced."""
        parts: list[list[int]] = [[] for _ in range(self.world_size)]
        heap = [(0, r) for r in range(self.world_size)]  # (tokens so far, rank)
        for row in rows:
            tokens, rank = heapq.heappop(heap)
            parts[rank].append(int(row))
            if len(parts[rank]) < self.batch_size:
                heapq.heappush(heap, (tokens + int(self.lengths[row]), rank))
        return parts

    def __iter__(self) -> Iterator[int]:
        for rows in self.global_batches():
            for part in self.split(rows):
                yield from part
