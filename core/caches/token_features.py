"""Cached trunk token states, for branch strategies that read ``TrunkOutput.hidden``.

The base and trunk are frozen while a branch trains, so their token states for a dataset are
computed once and kept on disk in float16. Examples have different lengths, so a cache file
holds one shard of examples as a flat ``states`` tensor ``(total_tokens, d)`` plus ``offsets``
``(n + 1,)`` (example ``i`` is ``states[offsets[i]:offsets[i + 1]]``), and the pooled output
``(n, d)`` in float32 exactly as the trunk gives it. Files follow the caches' one rule
(core/caches/bound_cache.py): bound to key, trunk, rows, dtype, max length and shapes, sealed by a
checksum, finite, and with offsets that cut the states into 1..max_length tokens per example;
anything that does not match is recomputed, never trusted.

Large datasets are cut into shards of ``SHARD_ROWS`` examples, each its own file, read back
memory-mapped: memory stays bounded by one shard while computing, and training gathers only
the rows of each batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.branch import TrunkOutput
from scaler_wizard.caches.bound_cache import CacheSpec, Ragged, cached, over_shards, require_finite
from scaler_wizard.modeling.model import ScalerModel

Progress = Callable[[int], None]
#: The store's cache kind (its folder under ``cache/``, and the kind bound inside each file).
KIND = "tokens"
#: Examples per cache file: at most 4,096 x 256 tokens x 384 x 2 bytes = 768 MiB, typically ~1/10.
SHARD_ROWS = 4096


def token_key(trunk: str, texts: Sequence[str], max_length: int, base_layers: int = 0) -> str:
    inputs: dict[str, object] = {
        "kind": "token-cache",
        "trunk": trunk,
        "max_length": max_length,
        "dtype": "float16",
        "texts": list(texts),
    }
    if base_layers:  # 0: the key (and file) of the caches written before layers were cached
        inputs["base_layers"] = base_layers
    payload = json.dumps(inputs, ensure_ascii=False)
    return BankHash.of_bytes(payload.encode()).hex


class TokenShard:
    """One cache file's tensors: flat float16 ``states``, int64 ``offsets``, float32 ``pooled``.

    ``states`` is ``(total_tokens, d)``: the trunk's token states; or, when the strategy reads
    ``n`` base layers below the last, ``(total_tokens, n + 1, d)``: those layers bottom to top,
    then the trunk's token states."""

    def __init__(self, states: Tensor, offsets: Tensor, pooled: Tensor) -> None:
        self.states, self.offsets, self.pooled = states, offsets, pooled

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        return {"states": self.states, "offsets": self.offsets, "pooled": self.pooled}


# -- pad and mask (H3, issue 11 item 4: shared with training's batches) ----------------------
def pad_and_mask(
    rows: Sequence[Tensor], hidden_size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Examples of different lengths (each ``(T_i, d)``, or ``(T_i, ..., d)``) -> ``(B, T, d)``
    (``(B, T, ..., d)``) states in ``dtype``, zero-padded after each example, and the ``(B, T)``
    bool mask of the real tokens. ``T`` is the longest example (at least 1); ``hidden_size``
    is ``d`` (needed only for no rows)."""
    inner = tuple(int(n) for n in rows[0].shape[1:]) if rows else (int(hidden_size or 0),)
    if hidden_size is not None and inner[-1] != hidden_size:
        raise ValueError(f"rows have width {inner[-1]}, not {hidden_size}")
    width = max([int(r.shape[0]) for r in rows] + [1])
    states = torch.zeros(len(rows), width, *inner, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for j, r in enumerate(rows):
        states[j, : r.shape[0]] = r
        mask[j, : r.shape[0]] = True
    return states, mask


# -- end pad and mask --------------------------------------------------------------------------


class TokenRows:
    """Rows ``start:stop`` of the shards read end to end; ``rows[a:b]`` is a view (nothing
    copied) and ``rows.batch(index)`` a padded float32 :class:`TrunkOutput` of those rows."""

    def __init__(self, shards: Sequence[TokenShard], start: int = 0, stop: int | None = None) -> None:
        self.shards = list(shards)
        self.bounds = [0]
        for s in self.shards:
            self.bounds.append(self.bounds[-1] + len(s))
        self.start = start
        self.stop = self.bounds[-1] if stop is None else stop
        if not 0 <= self.start <= self.stop <= self.bounds[-1]:
            raise IndexError(f"rows {start}:{stop} out of range for {self.bounds[-1]} rows")

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> TokenRows:
        lo, hi, step = index.indices(len(self))
        if step != 1:
            raise IndexError("TokenRows slices take no step")
        return TokenRows(self.shards, self.start + lo, self.start + max(lo, hi))

    def _locate(self, row: int) -> tuple[TokenShard, int]:
        absolute = self.start + row
        k = next(i for i in range(len(self.shards)) if absolute < self.bounds[i + 1])
        return self.shards[k], absolute - self.bounds[k]

    def batch(self, index: Tensor) -> TrunkOutput:
        """The trunk output of these rows: hidden (B, T, d) float32 padded, mask, pooled."""
        rows = [int(i) for i in index.reshape(-1).tolist()]
        if any(not 0 <= r < len(self) for r in rows):
            raise IndexError("row index out of range")
        spans = []
        for r in rows:
            shard, i = self._locate(r)
            a, b = int(shard.offsets[i]), int(shard.offsets[i + 1])
            spans.append((shard, i, a, b))
        d = int(self.shards[0].states.shape[-1])
        hidden, mask = pad_and_mask([shard.states[a:b] for shard, _, a, b in spans], d)
        pooled = torch.empty(len(rows), d, dtype=torch.float32)
        for j, (shard, i, _, _) in enumerate(spans):
            pooled[j] = shard.pooled[i]
        empty = pooled.new_zeros(())
        if hidden.dim() == 3:
            return TrunkOutput(pooled=pooled, hidden=hidden, mask=mask, aux_loss=empty)
        layers = hidden.unbind(2)  # (B, T, n + 1, d): the base layers, then the trunk's states
        return TrunkOutput(
            pooled=pooled, hidden=layers[-1], mask=mask, aux_loss=empty, base_layers=tuple(layers[:-1])
        )


@torch.inference_mode()
def compute_tokens(
    model: ScalerModel,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    base_layers: int = 0,
) -> TokenShard:
    """Token states (float16, flat) and pooled outputs of ``texts``, batched by length; with
    ``base_layers``, those base layers' states below the trunk's (see :class:`TokenShard`)."""
    was_training = model.training
    model.eval()
    d = model.trunk_hidden_size()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    per_row: list[Tensor | None] = [None] * len(texts)
    pooled = torch.empty(len(texts), d, dtype=torch.float32)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = model.base.tokenize([texts[i] for i in idx], model.device)
            out = model.encode_batch(batch, base_layers=base_layers)
            hidden = out.hidden
            if base_layers:
                hidden = torch.stack([*out.base_layers, hidden], dim=2)  # (B, T, n + 1, d)
            hidden = hidden.float().cpu()
            require_finite(hidden, "trunk token states")
            mask = out.mask.cpu()
            for j, i in enumerate(idx):
                per_row[i] = hidden[j][mask[j]].to(torch.float16)
            pooled[torch.tensor(idx, dtype=torch.long)] = out.pooled.float().cpu()
            if progress:
                progress(len(idx))
    finally:
        model.train(was_training)
    lengths = torch.tensor([0] + [int(t.shape[0]) for t in per_row if t is not None], dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0)
    inner = (base_layers + 1, d) if base_layers else (d,)
    states = (
        torch.cat([t for t in per_row if t is not None])
        if texts
        else torch.empty(0, *inner, dtype=torch.float16)
    )
    return TokenShard(states.contiguous(), offsets, pooled)


def cached_tokens(
    store: ContentStore,
    model: ScalerModel,
    trunk: str,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    base_layers: int = 0,
) -> tuple[TokenRows, bool]:
    """(token rows, all came from cache): shard by shard, each shard its own bound cache file
    (a killed run keeps the shards it finished). Non-finite fresh states are refused.
    ``base_layers``: also that many base layers below the last (``TrunkOutput.base_layers``)."""
    rows = SHARD_ROWS // (base_layers + 1)  # the same memory bound per shard
    shards, all_cached = over_shards(
        texts,
        max(rows, 1),
        lambda shard: _cached_shard(
            store, model, trunk, shard, batch_size=batch_size, progress=progress, base_layers=base_layers
        ),
    )
    return TokenRows(shards), all_cached


def _cached_shard(
    store: ContentStore,
    model: ScalerModel,
    trunk: str,
    texts: Sequence[str],
    *,
    batch_size: int,
    progress: Progress | None,
    base_layers: int = 0,
) -> tuple[TokenShard, bool]:
    max_length = model.base.max_length
    d = model.trunk_hidden_size()
    bound: dict[str, object] = {
        "trunk": trunk,
        "rows": len(texts),
        "dtype": "float16",
        "max_length": max_length,
    }
    if base_layers:
        bound["base_layers"] = base_layers
    spec = CacheSpec(
        kind=KIND,
        key=token_key(trunk, texts, max_length, base_layers),
        bound=bound,
        expect={
            "states": (torch.float16, (None, base_layers + 1, d) if base_layers else (None, d)),
            "offsets": (torch.int64, (len(texts) + 1,)),
            "pooled": (torch.float32, (len(texts), d)),
        },
        # each example has 1..max_length tokens
        ragged=Ragged("offsets", "states", min_rows=1, max_rows=max_length),
    )

    def compute() -> dict[str, Tensor]:
        shard = compute_tokens(
            model, texts, batch_size=batch_size, progress=progress, base_layers=base_layers
        )
        require_finite(shard.pooled, "trunk features")
        return shard.tensors()

    # a fresh shard comes back as the file's memory-mapped copy (its memory is freed)
    tensors, hit = cached(store, spec, compute)
    if hit and progress:
        progress(len(texts))
    return TokenShard(tensors["states"], tensors["offsets"], tensors["pooled"]), hit


def cache_dir(store: ContentStore) -> Path:
    return store.cache_dir(KIND)
