"""The one way a growth operator commits: a new trunk as the model's next version.

``expand`` and ``prune`` (and their siblings) measure first, then call :func:`commit_trunk`,
which, under the store lock, refuses if the model moved since it was read, writes the new
trunk's banks, re-records the branches on the new trunk (``rerecord``, given the new trunk id
and version number), and moves the ref last, so a crash leaves the previous version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ConflictError
from scaler_wizard.manifests.facts import trunk_id_of
from scaler_wizard.manifests.model import BranchEntry, Manifest
from scaler_wizard.modeling.model import Trunk
from scaler_wizard.modeling.saving import build_manifest
from scaler_wizard.versions.builder import with_trunk
from scaler_wizard.versions.history import next_version

#: (new trunk id, new version number) -> (the branches' new entries, the names re-recorded)
Rerecord = Callable[[str, int], tuple[dict[str, BranchEntry], list[str]]]


@dataclass(frozen=True)
class Committed:
    manifest: str
    version: int
    new_trunk: str
    rerecorded: list[str]


def commit_trunk(
    store: ContentStore,
    name: str,
    head: str,
    parent: Manifest,
    trunk: Trunk,
    *,
    message: str,
    doing: str,
    rerecord: Rerecord,
) -> Committed:
    """``parent`` (the version at ``head``) with ``trunk`` as a new version of ``name``.
    ``doing`` names the operation in the conflict message ("expanding", "pruning")."""
    with store.lock():
        store.clean_temp(stale_only=True)
        current = store.get_ref(name)
        if current != head:
            raise ConflictError(
                f"model {name!r} moved to {current} while {doing} {head}: run it again", model=name
            )
        version = next_version(store, name, parent.version)
        drafted = build_manifest(  # writes the new trunk's banks (deduplicated)
            store,
            trunk=trunk,
            branches={},
            base_entry=parent.base,
            parent=parent,
            name=name,
            version=version,
            message=message,
            previous=parent,
        )
        new_tid = trunk_id_of(parent.base, drafted.trunk)
        entries, moved = rerecord(new_tid, version)
        manifest = with_trunk(parent, drafted.trunk, message=message, branches=entries, version=version)
        h = store.put_manifest(manifest)
        store.set_ref(name, h, expected=current, reason=message)
    return Committed(str(h), version, new_tid, moved)


__all__ = ["Committed", "Rerecord", "commit_trunk"]
