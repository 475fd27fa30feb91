"""Bank I/O: hashing, atomic writes, the content-addressed store, safetensors banks."""

from scaler_wizard.banks.hashing import BankHash, sha256_file
from scaler_wizard.banks.safetensors_bank import BankContent, encode_bank, read_bank_metadata
from scaler_wizard.banks.store import ContentStore, default_store_path

__all__ = [
    "BankContent",
    "BankHash",
    "ContentStore",
    "default_store_path",
    "encode_bank",
    "read_bank_metadata",
    "sha256_file",
]
