"""Built-in bank-store backend: the local folder (``file://PATH`` or a plain path)."""

from __future__ import annotations

from typing import Any

from scaler_wizard import hookimpl
from scaler_wizard.banks import ContentStore


def open_local(location: str) -> ContentStore:
    """A store folder on this machine."""
    path = location[len("file://") :] if location.startswith("file://") else location
    return ContentStore.open(path)


@hookimpl
def register_stores(register: Any) -> None:
    register("file", open_local)
