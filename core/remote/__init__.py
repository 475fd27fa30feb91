"""Remote: publish and pull *planning* for a Hub model repo, and ``HubRepo``.

``publishing`` decides what one publish sends (the objects a version needs, the banks the
repo lacks, the tag); ``sync`` decides what a pull stores (the remote version, a new version of
some of its branches, or branches added to a local model; the published ancestors; the ref
move) and proves the pulled version complete before the ref moves; ``hub_repo`` is the Hub
as a bank-store backend (the built-in ``hf`` store plugin returns one). Bytes move only
through the store's transport, ``scaler_wizard.banks.hub``. No torch at import.
"""

from __future__ import annotations

from scaler_wizard.remote.hub_repo import HubRepo
from scaler_wizard.remote.publishing import PublishResult, objects_of, publish
from scaler_wizard.remote.sync import PullResult, pull

__all__ = ["HubRepo", "PublishResult", "PullResult", "objects_of", "publish", "pull"]
