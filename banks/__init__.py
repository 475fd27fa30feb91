"""Bank I/O: hashing, atomic writes, the content-addressed store, safetensors banks, Hub transport."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaler_wizard.banks.hashing import BankHash, sha256_file
from scaler_wizard.banks.safetensors_bank import BankContent, encode_bank, read_bank_metadata
from scaler_wizard.banks.store import ContentStore, default_store_path

if TYPE_CHECKING:
    from scaler_wizard.banks.hub import HubRepo


def __getattr__(name: str) -> Any:
    # Lazy: the Hub transport (and huggingface_hub) is only loaded by those who use it.
    if name == "HubRepo":
        from scaler_wizard.banks.hub import HubRepo

        return HubRepo
    raise AttributeError(f"module 'scaler_wizard.banks' has no attribute {name!r}")


__all__ = [
    "BankContent",
    "BankHash",
    "ContentStore",
    "HubRepo",
    "default_store_path",
    "encode_bank",
    "read_bank_metadata",
    "sha256_file",
]
