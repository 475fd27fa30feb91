"""Safetensors banks as bytes: self-describing (``scaler.*`` header metadata), never pickled.

The store knows a bank's bytes and its header, not tensors: turning torch tensors into a bank
and back is the runtime's job (``scaler_wizard.modeling.tensor_banks``), so importing the store
never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from scaler_wizard.errors import IntegrityError
from scaler_wizard.names import BankHash

BANK_FORMAT_VERSION = "1"
KIND_KEY = "scaler.kind"


@dataclass(frozen=True)
class BankContent:
    """Serialised bank bytes and their name."""

    data: bytes
    hash: BankHash
    kind: str


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
        # framework="numpy": reading the header needs no tensor library (and must not load torch)
        with safe_open(str(path), framework="numpy") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise unreadable(path, name, exc) from exc


def unreadable(path: str | Path, name: str | None, exc: BaseException) -> IntegrityError:
    """The one-line error for a bank safetensors cannot read (header, truncation, I/O)."""
    return IntegrityError(
        f"bank {name or path} is not a readable safetensors file: {first_line(exc)}",
        bank=name,
        path=str(path),
    )


def first_line(exc: BaseException) -> str:
    """safetensors' messages may span lines (a quoted header): errors are one line."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
