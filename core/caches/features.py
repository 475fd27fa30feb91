"""Cached trunk outputs. The base and trunk are frozen while a branch trains, so their pooled
output for a dataset is computed once and kept on disk, keyed by the trunk and the texts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.caches.bound_cache import CacheSpec, cached, over_shards, require_finite
from scaler_wizard.caches.feature_shards import Rows, ShardedRows
from scaler_wizard.caches.token_features import TokenRows, cached_tokens
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.model import ScalerModel

Progress = Callable[[int], None]
#: The store's cache kind (its folder under ``cache/``, and the kind bound inside each file).
KIND = "features"
#: Rows per feature shard (one shard: 65,536 x 384 float32 = 96 MiB).
SHARD_ROWS = 65536


def feature_key(trunk: str, texts: Sequence[str], max_length: int) -> str:
    payload = json.dumps({"trunk": trunk, "max_length": max_length, "texts": list(texts)}, ensure_ascii=False)
    return BankHash.of_bytes(payload.encode()).hex


@torch.inference_mode()
def compute_pooled(
    model: ScalerModel, texts: Sequence[str], *, batch_size: int = 64, progress: Progress | None = None
) -> Tensor:
    """(N, d) pooled trunk outputs. Texts are batched by length so little time goes on padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.trunk_hidden_size(), dtype=torch.float32)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = model.base.tokenize([texts[i] for i in idx], model.device)
            pooled = model.encode(**batch).pooled.float().cpu()  # (b, d)
            out[torch.tensor(idx)] = pooled
            if progress:
                progress(len(idx))
    finally:
        model.train(was_training)
    return out


def cached_pooled(
    store: ContentStore,
    model: ScalerModel,
    trunk: str,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> tuple[Rows, bool]:
    """(features, came_from_cache). Up to ``SHARD_ROWS`` texts give one tensor; more are
    featurised shard by shard, each shard its own cache file (keyed by its own texts, so a
    killed run keeps the shards it finished), and come back as ShardedRows over the
    memory-mapped files: memory stays bounded by one shard, whatever the dataset's size.
    A cache file is used only if everything bound inside it (its key, trunk, row count,
    dtype, shape, checksum) matches and it is finite; anything else is recomputed, never
    trusted. Non-finite fresh features are refused."""
    if len(texts) <= SHARD_ROWS:
        return _cached_shard(store, model, trunk, texts, batch_size=batch_size, progress=progress)
    parts, all_cached = over_shards(
        texts,
        SHARD_ROWS,
        lambda shard: _cached_shard(
            store, model, trunk, shard, batch_size=batch_size, progress=progress, reopen=True
        ),
    )
    return ShardedRows(parts), all_cached


def _cached_shard(
    store: ContentStore,
    model: ScalerModel,
    trunk: str,
    texts: Sequence[str],
    *,
    batch_size: int,
    progress: Progress | None,
    reopen: bool = False,
) -> tuple[Tensor, bool]:
    max_length = model.base.max_length
    spec = CacheSpec(
        kind=KIND,
        key=feature_key(trunk, texts, max_length),
        bound={"trunk": trunk, "rows": len(texts), "dtype": "float32", "max_length": max_length},
        expect={"pooled": (torch.float32, (len(texts), model.trunk_hidden_size()))},
    )

    def compute() -> dict[str, Tensor]:
        feats = compute_pooled(model, texts, batch_size=batch_size, progress=progress)
        require_finite(feats, "trunk features")
        return {"pooled": feats}

    # reopen: a fresh shard comes back as the file's memory-mapped copy (its memory is freed)
    tensors, hit = cached(store, spec, compute, reopen=reopen)
    if hit and progress:
        progress(len(texts))
    return tensors["pooled"], hit


def cache_dir(store: ContentStore) -> Path:
    return store.cache_dir(KIND)


# -- issue 12: the features a strategy asks for (``features = "tokens"`` or the default "pooled") --
def feature_kind(adapter: object) -> str:
    """What a strategy trains on: "pooled" (the default) or "tokens" (trunk token states)."""
    kind = getattr(adapter, "features", "pooled")
    if kind not in ("pooled", "tokens"):
        raise ScalerError(
            f"strategy {type(adapter).__name__} asks for features {kind!r}; known: 'pooled', 'tokens'"
        )
    return str(kind)


def cached_features(
    store: ContentStore,
    model: ScalerModel,
    trunk: str,
    texts: Sequence[str],
    *,
    kind: str = "pooled",
    progress: Progress | None = None,
    base_layers: int = 0,
) -> tuple[Rows | TokenRows, bool]:
    """(cached trunk outputs of ``texts``, came from cache): pooled rows or token states
    (with ``base_layers`` of the base's layers below the last, for strategies reading them)."""
    if kind == "tokens":
        return cached_tokens(store, model, trunk, texts, progress=progress, base_layers=base_layers)
    if base_layers:
        raise ScalerError(f"a strategy that reads base layers trains on token states, not {kind!r} features")
    return cached_pooled(store, model, trunk, texts, progress=progress)
