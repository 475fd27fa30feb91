"""Tensors <-> bank bytes: the one place the runtime turns torch tensors into a bank and back.

The store (``scaler_wizard.banks``) knows bytes and safetensors headers only; this module adds
torch on top: :func:`encode_bank` serialises tensors canonically (same tensors + metadata -> same
bytes -> same hash), :func:`load_bank_tensors` memory-maps them back. Never pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from scaler_wizard.banks.safetensors_bank import (
    BANK_FORMAT_VERSION,
    KIND_KEY,
    BankContent,
    canonical_header,
    unreadable,
)
from scaler_wizard.names import BankHash


def encode_bank(
    tensors: dict[str, torch.Tensor], *, kind: str, metadata: dict[str, object] | None = None
) -> BankContent:
    """Serialise tensors to safetensors bytes. Same tensors + metadata -> same bytes -> same hash."""
    meta: dict[str, str] = {"format": "pt", KIND_KEY: kind, "scaler.format": BANK_FORMAT_VERSION}
    for key, value in (metadata or {}).items():
        meta[f"scaler.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    clean = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    data = canonical_header(st_save(clean, metadata=meta))
    return BankContent(data=data, hash=BankHash.of_bytes(data), kind=kind)


def load_bank_tensors(
    path: str | Path, *, name: str | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load every tensor of a bank (memory-mapped on CPU)."""
    try:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
        return out
    except (SafetensorError, OSError, ValueError) as exc:
        raise unreadable(path, name, exc) from exc
