"""Safetensors banks: self-describing (``scaler.*`` metadata), loaded memory-mapped, never pickled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from scaler_wizard.banks.hashing import BankHash
from scaler_wizard.errors import IntegrityError

BANK_FORMAT_VERSION = "1"
KIND_KEY = "scaler.kind"


@dataclass(frozen=True)
class BankContent:
    """Serialised bank bytes and their name."""

    data: bytes
    hash: BankHash
    kind: str


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


def canonical_header(data: bytes) -> bytes:
    """Rewrite the JSON header with sorted keys.

    safetensors writes its metadata map in hash order, which varies between runs; a bank's
    name is the hash of its bytes, so the same tensors must always give the same bytes.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def read_bank_metadata(path: str | Path, *, name: str | None = None) -> dict[str, str]:
    """The safetensors header metadata; raises IntegrityError if the file is not safetensors."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise IntegrityError(
            f"bank {name or path} is not a readable safetensors file: {_first_line(exc)}"
        ) from exc


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
        raise IntegrityError(
            f"bank {name or path} is not a readable safetensors file: {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    """safetensors' messages may span lines (a quoted header): errors are one line."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
