"""sha256 naming of banks: ``sha256:<64 hex>``."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from scaler_wizard.errors import StoreError

HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
_HASH_RE = re.compile(HASH_PATTERN)
_CHUNK = 4 * 1024 * 1024  # large reads keep hashlib at OpenSSL speed (see bench/)


class BankHash(str):
    """A validated bank name, ``sha256:<hex>``. Being validated, it is safe in a path."""

    __slots__ = ()

    def __new__(cls, value: str) -> BankHash:
        if not isinstance(value, str) or not _HASH_RE.fullmatch(value):
            raise StoreError(f"not a bank name (want sha256:<64 lowercase hex>): {value!r:.80}")
        return super().__new__(cls, value)

    @property
    def hex(self) -> str:
        return self[7:]

    @property
    def short(self) -> str:
        return self[7:19]

    @classmethod
    def of_bytes(cls, data: bytes | memoryview) -> BankHash:
        return cls("sha256:" + hashlib.sha256(data).hexdigest())


def is_bank_hash(value: object) -> bool:
    return isinstance(value, str) and bool(_HASH_RE.fullmatch(value))


def sha256_file(path: str | Path) -> BankHash:
    """Stream a file through sha256 without holding it in memory."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return BankHash("sha256:" + digest.hexdigest())
