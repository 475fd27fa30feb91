"""One way to make a version: :func:`new_version` derives a manifest from its parent.

What a new version takes from its parent, and what it gets anew:

=================  ===========================================================================
``format``         constants of the model (``scaler-wizard/manifest``, 1)
``name``           the parent's, unless given (a "save as" starts a model: no parent)
``version``        parent's + 1, unless given (``history.next_version`` keeps numbers unique
                   after a rollback: pass its answer); 1 without a parent
``parent``         the parent's hash (its canonical bytes' sha256); None without a parent
``created``        now, UTC, RFC 3339 with ``Z`` and whole seconds, unless given
``message``        always given
``library``        this scaler-wizard (distribution and version), unless given
``base``           the parent's, unless given (required without a parent)
``trunk``          the parent's, unless given (required without a parent)
``branches``       the parent's, unless given (the complete new set, not a delta)
``teachers``       the parent's, unless given (the complete new set; issue 14); none without a parent
=================  ===========================================================================

Then every branch recorded on another trunk than the new one, and not yet marked stale, is
marked stale (``provenance.stale``; ``mark_stale=False`` leaves the entries as given), and
the result is validated by :func:`~scaler_wizard.manifests.model.parse_manifest`: a builder
never returns a manifest the store would refuse.

The helpers :func:`with_branch`, :func:`without_branch`, :func:`with_trunk` and
:func:`rebased` are the common changes, each one :func:`new_version` (or, for a rebase, the
same version moved onto another parent) with the current code's default message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping

from scaler_wizard.errors import BranchNotFoundError, ConflictError, ManifestError
from scaler_wizard.manifests.facts import mark_stale_branches
from scaler_wizard.manifests.model import (
    BaseEntry,
    BranchEntry,
    LibraryInfo,
    Manifest,
    TrunkEntry,
    parse_manifest,
)
from scaler_wizard.manifests.teachers import TeacherEntry
from scaler_wizard.version import __version__

#: Who writes the manifests this process makes.
CURRENT_LIBRARY = LibraryInfo(distribution="scaler-wizard", version=__version__)


def rfc3339(when: dt.datetime | None = None) -> str:
    """``when`` (default: now) in UTC as RFC 3339 with whole seconds and ``Z``: 2026-01-31T12:00:00Z."""
    when = when or dt.datetime.now(dt.timezone.utc)
    if when.tzinfo is None:
        raise ValueError("a naive datetime has no time zone: give an aware one (e.g. UTC)")
    return when.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_version(
    parent: Manifest | None,
    *,
    message: str,
    name: str | None = None,
    version: int | None = None,
    created: str | dt.datetime | None = None,
    base: BaseEntry | None = None,
    trunk: TrunkEntry | None = None,
    branches: Mapping[str, BranchEntry] | None = None,
    library: LibraryInfo | None = CURRENT_LIBRARY,
    mark_stale: bool = True,
    where: str = "new manifest",
    teachers: Mapping[str, TeacherEntry] | None = None,
) -> Manifest:
    """The manifest of a new version of ``parent`` (or, with ``parent=None``, a first version).

    See the module docstring for what is inherited and what is new. Raises ManifestError
    (one line, naming the field) if the result is not a valid manifest.
    """
    if parent is None:
        missing = [k for k, v in (("name", name), ("base", base), ("trunk", trunk)) if v is None]
        if missing:
            raise TypeError(f"a first version needs {', '.join(missing)}")
    else:
        name = parent.name if name is None else name
        base = parent.base if base is None else base
        trunk = parent.trunk if trunk is None else trunk
        branches = parent.branches if branches is None else branches
        teachers = parent.teachers if teachers is None else teachers
    assert name is not None and base is not None and trunk is not None
    draft = Manifest(
        name=name,
        version=version if version is not None else (1 if parent is None else parent.version + 1),
        parent=None if parent is None else str(parent.hash),
        created=created if isinstance(created, str) else rfc3339(created),
        message=message,
        library=library,
        base=base,
        trunk=trunk,
        branches=dict(branches or {}),
        teachers=dict(teachers or {}),
    )
    if mark_stale:
        draft = dataclasses.replace(draft, branches=mark_stale_branches(draft))
    return parse_manifest(draft.to_dict(), where=where)


def with_branch(
    parent: Manifest,
    name: str,
    entry: BranchEntry,
    *,
    message: str | None = None,
    version: int | None = None,
    created: str | dt.datetime | None = None,
    where: str = "new manifest",
) -> Manifest:
    """A new version of ``parent`` with branch ``name`` added (ConflictError if it has one)."""
    if name in parent.branches:
        raise ConflictError(
            f"model {parent.name!r} already has a branch {name!r} "
            f"(remove it first with `scaler branch remove {parent.name} {name}`, or pick another name)"
        )
    return new_version(
        parent,
        message=f"add branch {name}" if message is None else message,
        version=version,
        created=created,
        branches={**parent.branches, name: entry},
        where=where,
    )


def without_branch(
    parent: Manifest,
    name: str,
    *,
    message: str | None = None,
    version: int | None = None,
    created: str | dt.datetime | None = None,
    where: str = "new manifest",
) -> Manifest:
    """A new version of ``parent`` without branch ``name`` (BranchNotFoundError if it has none).

    The branch's banks stay in the store, reachable from the parent.
    """
    if name not in parent.branches:
        raise BranchNotFoundError(f"model {parent.name!r} has no branch named {name!r}")
    return new_version(
        parent,
        message=f"remove branch {name}" if message is None else message,
        version=version,
        created=created,
        branches={n: e for n, e in parent.branches.items() if n != name},
        where=where,
    )


def with_trunk(
    parent: Manifest,
    trunk: TrunkEntry,
    *,
    message: str,
    branches: Mapping[str, BranchEntry] | None = None,
    version: int | None = None,
    created: str | dt.datetime | None = None,
    where: str = "new manifest",
) -> Manifest:
    """A new version of ``parent`` on a new trunk, ``branches`` (retrained on it) replacing or
    adding to the parent's; every other branch of the parent that recorded the old trunk is
    marked stale."""
    return new_version(
        parent,
        message=message,
        version=version,
        created=created,
        trunk=trunk,
        branches={**parent.branches, **(branches or {})},
        where=where,
    )


def with_teacher(
    parent: Manifest,
    name: str,
    entry: TeacherEntry,
    *,
    replace: bool = False,
    message: str | None = None,
    version: int | None = None,
    created: str | dt.datetime | None = None,
    where: str = "new manifest",
) -> Manifest:
    """A new version of ``parent`` with teacher ``name`` (issue 14) added, or with ``replace``
    put in place of the one it has (ConflictError if it has one and ``replace`` is false)."""
    if name in parent.teachers and not replace:
        raise ConflictError(
            f"model {parent.name!r} already has a teacher {name!r} (pass --replace to replace it, "
            "or pick another name)"
        )
    verb = "replace" if name in parent.teachers else "add"
    return new_version(
        parent,
        message=f"{verb} teacher {name}" if message is None else message,
        version=version,
        created=created,
        teachers={**parent.teachers, name: entry},
        where=where,
    )


def rebased(
    ours: Manifest,
    *,
    onto: str,
    branches: Mapping[str, BranchEntry],
    message: str | None = None,
    where: str = "new manifest",
    teachers: Mapping[str, TeacherEntry] | None = None,
) -> Manifest:
    """``ours`` (same number, time and trunk) re-parented onto ``onto`` with ``branches``
    merged (what ``history.rebase_branches`` decides), and ``teachers`` when given (else
    ours), validated."""
    if ours.parent is None:
        raise ManifestError(
            f"{where}: parent: version {ours.version} is the first and cannot be rebased", field="parent"
        )
    moved = dataclasses.replace(
        ours,
        parent=onto,
        branches=dict(branches),
        message=ours.message if message is None else message,
        teachers=ours.teachers if teachers is None else dict(teachers),
    )
    return parse_manifest(moved.to_dict(), where=where)


__all__ = [
    "CURRENT_LIBRARY",
    "new_version",
    "rebased",
    "rfc3339",
    "with_branch",
    "with_teacher",
    "with_trunk",
    "without_branch",
]
