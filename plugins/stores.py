"""Built-in bank-store backends: the local folder (``file://PATH`` or a plain path) and the
Hugging Face Hub (``hf://namespace/name[@revision]``).

The store classes are imported when a store is opened, so loading the plugin costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaler_wizard import hookimpl

if TYPE_CHECKING:
    from scaler_wizard import ContentStore, HubRepo


def open_local(location: str) -> ContentStore:
    """A store folder on this machine."""
    from scaler_wizard import ContentStore

    path = location[len("file://") :] if location.startswith("file://") else location
    return ContentStore.open(path)


def open_hub(location: str, *, endpoint: str | None = None, token: str | None = None) -> HubRepo:
    """A Hub model repo: publish versions to it, pull them from it (huggingface_hub)."""
    from scaler_wizard import HubRepo

    return HubRepo.open(location, endpoint=endpoint, token=token)


@hookimpl
def register_stores(register: Any) -> None:
    register("file", open_local)
    register("hf", open_hub)
