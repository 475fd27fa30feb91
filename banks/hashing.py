"""File hashing: a bank's name is the sha256 of its bytes.

The bank-name rules (``sha256:<64 lowercase hex>``: BankHash, is_bank_hash) live in the kernel,
``scaler_wizard.names``, and are re-exported here for the store's callers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from scaler_wizard.names import HASH_PATTERN, BankHash, is_bank_hash

_CHUNK = 4 * 1024 * 1024  # large reads keep hashlib at OpenSSL speed (see bench/)


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
    return BankHash.from_hex(digest.hexdigest())


__all__ = ["HASH_PATTERN", "BankHash", "is_bank_hash", "sha256_file"]
