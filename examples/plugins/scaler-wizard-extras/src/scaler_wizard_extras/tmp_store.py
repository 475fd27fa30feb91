"""Store backend ``tmp``: ``tmp://NAME`` is a throwaway store, deleted when the process exits.

For demos and tests. The same NAME gives the same store within one process.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

from scaler_wizard.banks import ContentStore

_stores: dict[str, ContentStore] = {}


def open_tmp_store(location: str) -> ContentStore:
    """A process-lifetime store in a temporary folder."""
    name = location.removeprefix("tmp://")
    if name not in _stores:
        folder = tempfile.mkdtemp(prefix="scaler-tmp-store-")
        atexit.register(shutil.rmtree, folder, True)
        _stores[name] = ContentStore.open(folder, create=True)
    return _stores[name]
