"""The frozen base's token states, computed once and cached on disk for ``scaler train``.

The trunk works on tokens, so the cache keeps every example's last hidden states, variable
length, as one flat ``(total_tokens, d)`` tensor plus ``offsets`` (N + 1): example ``i`` is
``states[offsets[i]:offsets[i + 1]]``. The key is the base bank, its tokenizer files, the
max length, the dtype and the texts, so any change to those is a new cache file, never a
stale one. Files follow the caches' one rule (core/caches/bound_cache.py): bound to that key,
the base, rows, dtype, max length and hidden size, sealed by a checksum, finite, and with
offsets that cut the states into the examples; a damaged file is recomputed, never trusted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.caches.bound_cache import CacheSpec, Ragged, cached, require_finite
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.base_encoder import BaseEncoder

Progress = Callable[[int], None]
#: The store's cache kind (its folder under ``cache/``, and the kind bound inside each file).
KIND = "base-states"


@dataclass
class TokenStates:
    """Per-example base states: ``flat`` (total_tokens, d) and ``offsets`` (N + 1,); or, for
    runs whose branches read ``n`` base layers below the last, ``flat`` (total_tokens, n + 1, d):
    those layers bottom to top, then the last."""

    flat: Tensor
    offsets: Tensor

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def example(self, i: int) -> Tensor:
        return self.flat[int(self.offsets[i]) : int(self.offsets[i + 1])]  # (T_i, d) or (T_i, n + 1, d)

    def batch(self, indices: Sequence[int], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Padded (B, T, d) (or (B, T, n + 1, d)) states and (B, T) bool mask."""
        parts = [self.example(i).to(dtype) for i in indices]
        states = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)
        lengths = torch.tensor([p.shape[0] for p in parts])
        mask = torch.arange(states.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return states, mask


def states_key(
    base_entry: dict[str, Any], texts: Sequence[str], *, max_length: int, dtype: str, lower: int = 0
) -> str:
    payload = {
        "base": base_entry["bank"],
        "files": base_entry.get("files", {}),
        "max_length": max_length,
        "dtype": dtype,
        "texts": list(texts),
    }
    if lower:  # 0: the key of the caches written before lower layers were cached
        payload["lower"] = lower
    return BankHash.of_bytes(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hex


@torch.inference_mode()
def compute_states(
    base: BaseEncoder,
    texts: Sequence[str],
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    lower: int = 0,
) -> TokenStates:
    """Run the base over ``texts`` (batched by length, so little time goes on padding); with
    ``lower``, keep that many layers below the last too (see :class:`TokenStates`)."""
    lengths = [
        len(ids)
        for ids in base.tokenizer(list(texts), truncation=True, max_length=base.max_length)["input_ids"]
    ]
    offsets = torch.zeros(len(texts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    inner = (lower + 1, base.hidden_size) if lower else (base.hidden_size,)
    flat = torch.empty(int(offsets[-1]), *inner, dtype=dtype)
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = base.tokenize([texts[i] for i in idx], device)
        last, below = base.forward_layers(batch["input_ids"], batch["attention_mask"], lower)
        hidden = (torch.stack([*below, last], dim=2) if lower else last).float().cpu()  # (b, T, [n + 1,] d)
        for row, i in enumerate(idx):
            n = lengths[i]
            if int(batch["attention_mask"][row].sum()) != n:
                raise ScalerError("tokenizer lengths differ between calls: cannot cache base states")
            flat[int(offsets[i]) : int(offsets[i]) + n] = hidden[row, :n].to(dtype)
        if progress:
            progress(len(idx))
    return TokenStates(flat, offsets)


def cache_dir(store: ContentStore) -> Path:
    return store.cache_dir(KIND)


def cached_states(
    store: ContentStore,
    base: BaseEncoder,
    base_entry: dict[str, Any],
    texts: Sequence[str],
    *,
    float16: bool = False,
    write: bool = True,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    lower: int = 0,
) -> tuple[TokenStates, bool]:
    """(states, came_from_cache). Fresh states are written and then read back from the file,
    so a run that computed them and one that found them train on exactly the same numbers.
    A cache file is used only if everything bound inside it (its key, base, row count, dtype,
    shapes, checksum) matches, it is finite and its offsets cut its states into the examples;
    anything else is recomputed, never trusted. ``lower``: also keep that many of the base's
    layers below the last (for branches that read them)."""
    dtype_name = "float16" if float16 else "float32"
    dtype = torch.float16 if float16 else torch.float32
    bound: dict[str, object] = {
        "base": base_entry["bank"],
        "rows": len(texts),
        "dtype": dtype_name,
        "max_length": base.max_length,
        "hidden": base.hidden_size,
    }
    if lower:
        bound["lower"] = lower
    spec = CacheSpec(
        kind=KIND,
        key=states_key(base_entry, texts, max_length=base.max_length, dtype=dtype_name, lower=lower),
        bound=bound,
        expect={
            "states": (dtype, (None, lower + 1, base.hidden_size) if lower else (None, base.hidden_size)),
            "offsets": (torch.int64, (len(texts) + 1,)),
        },
        ragged=Ragged("offsets", "states"),
    )

    def compute() -> dict[str, Tensor]:
        states = compute_states(base, texts, dtype=dtype, device=device, progress=progress, lower=lower)
        require_finite(states.flat, "base states")
        return {"states": states.flat, "offsets": states.offsets}

    tensors, hit = cached(store, spec, compute, write=write)
    if hit and progress:
        progress(len(texts))
    return TokenStates(tensors["states"], tensors["offsets"]), hit
