"""Names: what a model or branch may be called, and bank names (``sha256:<64 lowercase hex>``).

The one home of both rules, part of the kernel (stdlib only), so the store, the manifest
validator and the runtime all refuse the same names with the same words.
"""

from __future__ import annotations

import hashlib
import re

from scaler_wizard.errors import StoreError

# -- model and branch names ----------------------------------------------------------------

#: A model or branch name: also a file name in the store, so portable and short.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_NAME_RE = re.compile(NAME_PATTERN)
#: Names Windows reserves for devices, with or without an extension: they cannot be files there.
WINDOWS_RESERVED = re.compile(r"(?i:con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?\Z")


def validate_name(name: str, *, what: str = "model") -> str:
    """Return ``name`` if it can name a model (or, with ``what="branch"``, a branch); else raise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith(".lock"):
        raise StoreError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 100 characters)"
        )
    if WINDOWS_RESERVED.match(name):
        raise StoreError(
            f"invalid {what} name {name!r}: Windows reserves it for a device, so it cannot be a file"
        )
    if name.endswith("."):
        raise StoreError(f"invalid {what} name {name!r}: a name may not end in '.' (Windows drops it)")
    if what == "branch" and "." in name:
        raise StoreError(
            f"invalid branch name {name!r}: use letters, digits, '_' or '-' ('.' cannot name a module)"
        )
    return name


def name_problem(name: str) -> str | None:
    """Why ``name`` (which matches the schema's pattern) cannot be a name on every OS, or None."""
    if WINDOWS_RESERVED.match(name):
        return f"{name!r} is a name Windows reserves for a device"
    if name.endswith("."):
        return f"{name!r} ends in '.', which Windows drops"
    return None


# -- bank names ----------------------------------------------------------------------------

HASH_PREFIX = "sha256:"
HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
_HASH_RE = re.compile(HASH_PATTERN)


class BankHash(str):
    """A validated bank name, ``sha256:<hex>``. Being validated, it is safe in a path."""

    __slots__ = ()

    def __new__(cls, value: str) -> BankHash:
        if not isinstance(value, str) or not _HASH_RE.fullmatch(value):
            raise StoreError(f"not a bank name (want sha256:<64 lowercase hex>): {value!r:.80}")
        return super().__new__(cls, value)

    @property
    def hex(self) -> str:
        return self[len(HASH_PREFIX) :]

    @property
    def short(self) -> str:
        return self[len(HASH_PREFIX) : len(HASH_PREFIX) + 12]

    @classmethod
    def from_hex(cls, hex_digest: str) -> BankHash:
        """The bank name of a sha256 hex digest."""
        return cls(HASH_PREFIX + hex_digest)

    @classmethod
    def of_bytes(cls, data: bytes | memoryview) -> BankHash:
        return cls.from_hex(hashlib.sha256(data).hexdigest())


def is_bank_hash(value: object) -> bool:
    """Whether ``value`` is a well-formed bank name (a str, not necessarily a BankHash)."""
    return isinstance(value, str) and bool(_HASH_RE.fullmatch(value))


__all__ = [
    "HASH_PATTERN",
    "HASH_PREFIX",
    "NAME_PATTERN",
    "WINDOWS_RESERVED",
    "BankHash",
    "is_bank_hash",
    "name_problem",
    "validate_name",
]
