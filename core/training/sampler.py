"""Batches that mix every branch: temperature-based sampling across datasets.

Dataset i is drawn with probability ``p_i ∝ n_i^(1/T)`` (T = 1: proportional to size;
T → ∞: uniform), and every batch holds at least one example of every branch. Within a
dataset, examples are taken without replacement through a shuffled epoch, then reshuffled.

Reproducible and resumable: the slots of step s come from a generator seeded with
(seed, s), a dataset's order in epoch e from one seeded with (seed, i, e), so the whole
state is the step and each dataset's (epoch, cursor): JSON in a checkpoint. Data loaders
read ahead, so the state *after* each step is remembered and handed out by step number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sampling_probabilities(sizes: Sequence[int], temperature: float) -> list[float]:
    weights = [float(n) ** (1.0 / temperature) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class MixedBatchSampler:
    """A batch sampler over the concatenation of K datasets (global index = offset_k + i)."""

    drop_last = True  # every batch is full (accelerate splits it evenly across processes)

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        batch_size: int,
        temperature: float,
        seed: int,
        total_steps: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        if any(n < 1 for n in sizes):
            raise ValueError("every dataset needs at least one example")
        if batch_size < len(sizes):
            raise ValueError(
                f"batch size {batch_size} is smaller than the number of branches ({len(sizes)}): "
                "every batch must hold every branch"
            )
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.total_steps = total_steps
        self.probs = sampling_probabilities(sizes, temperature)
        # One slot per branch is reserved; the rest are drawn so the expected share stays p_i.
        free = batch_size - len(sizes)
        extra = [max(batch_size * p - 1.0, 0.0) for p in self.probs]
        self._extra = torch.tensor(extra if sum(extra) > 0 else [1.0] * len(sizes), dtype=torch.float64)
        self._free = free
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        state = state or {"step": 0, "epochs": [0] * len(sizes), "cursors": [0] * len(sizes)}
        self._start = dict(state)
        self._after: dict[int, dict[str, Any]] = {}

    # -- state --------------------------------------------------------------------------
    def state_after(self, step: int) -> dict[str, Any]:
        """The sampler state once the batch of ``step`` (1-based) has been drawn."""
        state = self._after.get(step)
        if state is None:
            raise KeyError(f"no sampler state recorded for step {step}")
        for old in [s for s in self._after if s < step]:
            del self._after[old]
        return state

    @property
    def start_step(self) -> int:
        return int(self._start["step"])

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    # -- drawing --------------------------------------------------------------------------
    def _order(self, k: int, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(derived_seed(self.seed, "order", k, epoch))
        return torch.randperm(self.sizes[k], generator=gen).tolist()

    def counts(self, step: int) -> list[int]:
        """Examples per dataset in the batch of ``step`` (0-based)."""
        counts = [1] * len(self.sizes)
        if self._free:
            gen = torch.Generator().manual_seed(derived_seed(self.seed, "slots", step))
            picks = torch.multinomial(self._extra, self._free, replacement=True, generator=gen)
            for k in picks.tolist():
                counts[k] += 1
        return counts

    def __iter__(self) -> Iterator[list[int]]:
        step = int(self._start["step"])
        epochs = list(self._start["epochs"])
        cursors = list(self._start["cursors"])
        orders = {k: self._order(k, epochs[k]) for k in range(len(self.sizes))}
        while step < self.total_steps:
            batch: list[int] = []
            for k, count in enumerate(self.counts(step)):
                for _ in range(count):
                    if cursors[k] >= self.sizes[k]:
                        epochs[k] += 1
                        cursors[k] = 0
                        orders[k] = self._order(k, epochs[k])
                    batch.append(self.offsets[k] + orders[k][cursors[k]])
                    cursors[k] += 1
            step += 1
            self._after[step] = {"step": step, "epochs": list(epochs), "cursors": list(cursors)}
            yield batch
