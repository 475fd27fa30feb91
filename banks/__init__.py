"""Bank I/O: hashing, atomic writes, the content-addressed store, safetensors banks, Hub transport.

``HubRepo`` (publish / pull, which plan versions) is runtime: ``scaler_wizard.remote.HubRepo``;
so is turning tensors into banks: ``scaler_wizard.modeling.tensor_banks``. Importing the store
imports no torch.
"""

from __future__ import annotations

from scaler_wizard.banks.hashing import BankHash, sha256_file
from scaler_wizard.banks.safetensors_bank import BankContent, read_bank_metadata
from scaler_wizard.banks.store import ContentStore, default_store_path

__all__ = [
    "BankContent",
    "BankHash",
    "ContentStore",
    "default_store_path",
    "read_bank_metadata",
    "sha256_file",
]
