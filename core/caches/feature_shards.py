"""Trunk features kept in shards: several ``(n_i, d)`` tensors (memory-mapped cache files) read
as one ``(N, d)`` matrix without ever being concatenated, so a large dataset's features never
have to fit in memory at once."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Union, overload

import torch
from torch import Tensor


class ShardedRows:
    """Rows ``start:stop`` of the shards read end to end.

    ``rows[i:j]`` is a view (another ShardedRows, nothing copied); ``rows[index_tensor]``
    gathers those rows into a new tensor; ``rows.tensor(i, j)`` copies a range out.
    """

    def __init__(self, parts: Sequence[Tensor], start: int = 0, stop: int | None = None) -> None:
        if not parts:
            raise ValueError("ShardedRows needs at least one shard")
        self.parts = list(parts)
        self.bounds = [0]
        for p in self.parts:
            self.bounds.append(self.bounds[-1] + int(p.shape[0]))
        total = self.bounds[-1]
        self.start = start
        self.stop = total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise IndexError(f"rows {start}:{stop} out of range for {total} rows")

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), int(self.parts[0].shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @overload
    def __getitem__(self, index: slice) -> ShardedRows: ...

    @overload
    def __getitem__(self, index: Tensor) -> Tensor: ...

    def __getitem__(self, index: slice | Tensor) -> ShardedRows | Tensor:
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                raise IndexError("ShardedRows slices take no step")
            return ShardedRows(self.parts, self.start + lo, self.start + max(lo, hi))
        return self._gather(index)

    def tensor(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """Rows ``lo:hi`` (relative to this view) copied into one tensor."""
        hi = len(self) if hi is None else min(hi, len(self))
        a, b = self.start + lo, self.start + hi
        pieces = []
        k = bisect.bisect_right(self.bounds, a) - 1
        while a < b:
            take = min(b, self.bounds[k + 1]) - a
            pieces.append(self.parts[k][a - self.bounds[k] : a - self.bounds[k] + take])
            a += take
            k += 1
        if not pieces:
            return self.parts[0][:0].clone()
        return torch.cat(pieces)

    def _gather(self, index: Tensor) -> Tensor:
        rows = index.to(torch.int64).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError("row index out of range")
        absolute = rows + self.start
        bounds = torch.tensor(self.bounds, dtype=torch.int64)
        shard = torch.searchsorted(bounds, absolute, right=True) - 1
        out = torch.empty(rows.numel(), self.shape[1], dtype=self.dtype)
        for k in torch.unique(shard).tolist():
            mask = shard == k
            out[mask] = self.parts[k][absolute[mask] - self.bounds[k]]
        return out


#: Trunk features: one tensor, or shards read as one.
Rows = Union[Tensor, ShardedRows]  # noqa: UP007 (a runtime alias)


def rows_tensor(rows: Rows, lo: int, hi: int) -> Tensor:
    """Rows ``lo:hi`` as a tensor, whichever form the features are in."""
    if isinstance(rows, ShardedRows):
        return rows.tensor(lo, hi)
    return rows[lo:hi]
