"""Cached trunk outputs. The base and trunk are frozen while a branch trains, so their pooled
output for a dataset is computed once and kept on disk, keyed by the trunk and the texts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.atomic import atomic_writer
from scaler_wizard.banks.safetensors_bank import encode_bank, load_bank_tensors, read_bank_metadata
from scaler_wizard.errors import ScalerError
from scaler_wizard.model import ScalerModel

Progress = Callable[[int], None]


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
) -> tuple[Tensor, bool]:
    """(features, came_from_cache). A damaged cache file is recomputed, never trusted."""
    key = feature_key(trunk, texts, model.base.max_length)
    path = cache_dir(store) / f"{key}.safetensors"
    if path.is_file():
        with contextlib.suppress(ScalerError, KeyError):
            feats = load_bank_tensors(path)["pooled"]
            recorded = read_bank_metadata(path).get("scaler.sha256")
            # The file is named by its inputs, not its bytes: check the tensor against the
            # checksum it was written with, so a damaged cache is recomputed, never trusted.
            if feats.shape == (len(texts), model.trunk_hidden_size()) and recorded == _checksum(feats):
                if progress:
                    progress(len(texts))
                return feats, True
    feats = compute_pooled(model, texts, batch_size=batch_size, progress=progress)
    bank = encode_bank(
        {"pooled": feats},
        kind="feature-cache",
        metadata={"trunk": trunk, "rows": len(texts), "sha256": _checksum(feats)},
    )
    with contextlib.suppress(OSError), atomic_writer(path) as fh:  # a cache: failing to write is not fatal
        fh.write(bank.data)
    return feats, False


def _checksum(feats: Tensor) -> str:
    return str(BankHash.of_bytes(feats.contiguous().numpy().tobytes()))


def cache_dir(store: ContentStore) -> Path:
    return store.root / "cache" / "features"
