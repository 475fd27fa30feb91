"""Version history: parents, ``name@N`` lookups, rollback by moving the ref (with a reflog).

The runtime's history API, for the CLI and library users (nobody needs to index a raw
manifest dict to list, name or move versions)::

    from scaler_wizard.versions.history import Version, log, resolve, rollback

    v = resolve(store, "demo@3")          # name | name@N | name@vN | name@<hash prefix> | sha256:<hash>
    v.number, v.hash, v.parent, v.message, v.branches, v.manifest
    for old in log(store, "demo"):        # newest first, back to version 1
        print(old.number, old.short, old.message)
    rollback(store, "demo", "2")          # moves the ref (and logs the move); nothing is deleted
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from scaler_wizard.banks.hashing import BankHash, is_bank_hash
from scaler_wizard.banks.store import ContentStore
from scaler_wizard.errors import ConflictError, ManifestError, ModelNotFoundError, ScalerError
from scaler_wizard.manifests.model import Manifest, parse_manifest
from scaler_wizard.versions.builder import rebased

T = TypeVar("T")

_MAX_DEPTH = 100_000


@dataclass(frozen=True)
class Version:
    """One version of a model: the fields of its manifest people ask about, and the manifest.

    ``name`` is the model's name as it was asked for (the ref; a pulled ``--as`` copy keeps
    the published name in its manifest), else the manifest's own ``name``.
    """

    name: str
    number: int
    hash: BankHash
    parent: str | None
    message: str | None
    created: str
    branches: tuple[str, ...]
    manifest: dict[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def short(self) -> str:
        """The hash as ``scaler history`` shows it (12 hex digits)."""
        return self.hash.short

    @classmethod
    def of(cls, h: str, manifest: dict[str, Any], *, name: str | None = None) -> Version:
        """A version from a manifest already read (not validated here)."""
        return cls(
            name=name if name is not None else str(manifest.get("name", "?")),
            number=manifest.get("version"),  # type: ignore[arg-type]  # an int once validated
            hash=BankHash(h),
            parent=manifest.get("parent"),
            message=manifest.get("message"),
            created=manifest.get("created"),  # type: ignore[arg-type]
            branches=tuple(sorted(manifest.get("branches") or {})),
            manifest=manifest,
        )

    @classmethod
    def load(
        cls,
        store: ContentStore,
        h: str,
        *,
        name: str | None = None,
        validate: bool = True,
        where: str | None = None,
    ) -> Version:
        """Version ``h`` of the store (its manifest schema-validated unless ``validate=False``)."""
        manifest = store.get_manifest(h)
        if validate:
            parse_manifest(manifest, where=where or f"manifest {BankHash(h).short}")
        return cls.of(h, manifest, name=name)

    def summary(self) -> dict[str, Any]:
        """One entry of ``scaler history --json``."""
        return {
            "manifest": self.hash,
            "version": self.number,
            "parent": self.parent,
            "created": self.created,
            "message": self.message,
            "branches": list(self.branches),
        }


def resolve(store: ContentStore, spec: str, *, validate: bool = True) -> Version:
    """``name`` | ``name@3`` | ``name@v3`` | ``name@<hash prefix>`` | ``sha256:<hash>`` -> the version.

    Unknown or ambiguous versions are one-line ScalerErrors that list what exists.
    """
    name, h = resolve_version(store, spec)
    return Version.load(store, h, name=name, validate=validate)


def log(store: ContentStore, spec: str, *, validate: bool = True) -> list[Version]:
    """The versions from ``spec`` (as ``resolve`` takes it) back to version 1, newest first.

    A pulled model may have a shallow history: the walk stops at the first parent the store
    lacks. Each manifest is schema-validated unless ``validate=False``.
    """
    name, head = resolve_version(store, spec)
    out = []
    for h, manifest in history(store, head):
        if validate:
            parse_manifest(manifest, where=f"manifest {h.short}")
        out.append(Version.of(h, manifest, name=name))
    return out


def history(store: ContentStore, head: str) -> list[tuple[BankHash, dict[str, Any]]]:
    """Versions from ``head`` back to version 1, newest first."""
    out: list[tuple[BankHash, dict[str, Any]]] = []
    seen: set[str] = set()
    current: str | None = head
    while current is not None:
        if current in seen or len(out) > _MAX_DEPTH:
            raise ManifestError(f"manifest {current}: parent chain loops")
        seen.add(current)
        manifest = store.get_manifest(current)
        out.append((BankHash(current), manifest))
        parent = manifest.get("parent")
        if parent is not None and not is_bank_hash(parent):
            raise ManifestError(f"manifest {current}: parent: {parent!r:.80} is not a manifest hash")
        if parent is not None and not store.has_manifest(parent):
            break  # a pulled model may have a shallow history
        current = parent
    return out


def _known_versions(store: ContentStore, name: str) -> list[tuple[BankHash, dict[str, Any]]]:
    """Every version reachable from the ref or from any ref the reflog remembers.

    A manifest that is missing or damaged ends its chain here (``verify`` reports it): saving
    or naming a version must not depend on every old version being intact.
    """
    heads: list[str] = []
    head = store.get_ref(name)
    if head:
        heads.append(head)
    for entry in reversed(store.reflog(name)):
        for key in ("new", "old"):
            if entry.get(key) and is_bank_hash(entry[key]) and entry[key] not in heads:
                heads.append(entry[key])
    seen: dict[str, dict[str, Any]] = {}
    for h in heads:
        current: Any = h
        while is_bank_hash(current) and current not in seen and store.has_manifest(current):
            try:
                manifest = store.get_manifest(current)
            except ScalerError:
                break
            seen[current] = manifest
            current = manifest.get("parent")
    return [(BankHash(h), m) for h, m in seen.items()]


def next_version(store: ContentStore, name: str, parent_version: int) -> int:
    """The number of a new version of ``name`` whose parent is version ``parent_version``.

    One more than the highest number the model ever had (its ref's history and every version
    its reflog remembers), so that after ``rollback demo 3`` the next save is v5, not a second
    v4: ``demo@4`` keeps naming one version, and a publish never reuses a tag.
    """
    highest = parent_version
    for _, manifest in _known_versions(store, name):
        number = manifest.get("version")
        if isinstance(number, int) and not isinstance(number, bool):
            highest = max(highest, number)
    return highest + 1


def _rebase_conflict(name: str, head: str, origin: str, why: str) -> ConflictError:
    return ConflictError(
        f"model {name!r} moved to {head} since this model was composed from {origin}, and {why}; "
        "compose it again and redo the change"
    )


def rebase_branches(
    name: str,
    *,
    origin: tuple[str, Manifest],
    ours: Manifest,
    head: tuple[str, Manifest],
    message: str | None = None,
) -> Manifest:
    """Re-apply a change made on ``origin`` onto the model's newer ``head`` (as git rebases).

    Possible only for a change of branches alone (adding, removing or replacing branches) on
    a head whose base and trunk are still those of ``origin``: branches depend on the trunk
    only, so each side's branch changes carry over unchanged. Returns ``ours`` with the
    branches merged, ``parent`` = the head and ``message`` (default: ours), validated;
    raises ConflictError (one line) when the trunk changed on either side or both sides
    changed the same branch.
    """
    origin_h, base = origin
    head_h, theirs = head
    for part in ("base", "trunk"):
        if getattr(ours, part) != getattr(base, part):
            raise _rebase_conflict(name, head_h, origin_h, f"this change replaces the {part}")
        if getattr(theirs, part) != getattr(base, part):
            raise _rebase_conflict(
                name, head_h, origin_h, f"v{theirs.version} changed the {part} this change was made on"
            )

    def merge(
        kind: str, was_all: Mapping[str, T], ours_all: Mapping[str, T], theirs_all: Mapping[str, T]
    ) -> dict[str, T]:
        """Three-way merge of named entries (branches, teachers): a side's change carries over."""
        merged: dict[str, T] = {}
        for key in sorted({*was_all, *ours_all, *theirs_all}):
            was, mine, other = was_all.get(key), ours_all.get(key), theirs_all.get(key)
            if mine == was:
                pick = other
            elif other == was or mine == other:
                pick = mine
            else:
                did = "added" if was is None else "removed" if other is None else "changed"
                raise _rebase_conflict(name, head_h, origin_h, f"v{theirs.version} {did} {kind} {key!r} too")
            if pick is not None:
                merged[key] = pick
        return merged

    branches = merge("branch", base.branches, ours.branches, theirs.branches)
    teachers = merge("teacher", base.teachers, ours.teachers, theirs.teachers)
    return rebased(ours, onto=str(head_h), branches=branches, message=message, teachers=teachers)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) < 20


def find_version(store: ContentStore, name: str, version: str) -> BankHash:
    """``3``, ``v3``, a hash or a unique hash prefix -> manifest hash of that version of ``name``."""
    versions = _known_versions(store, name)
    text = version.strip()
    numbered = text.lower().startswith("v") and _is_number(text[1:])
    if numbered:
        text = text[1:]
    matches: list[BankHash] = []
    if _is_number(text):
        matches = [h for h, m in versions if m.get("version") == int(text)]
    if not matches and not numbered:
        # A hash prefix; `scaler history` shows 12 hex digits, which may all be decimal digits.
        prefix = text if text.startswith("sha256:") else "sha256:" + text
        matches = [h for h, _ in versions if h.startswith(prefix)] if len(prefix) >= 11 else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        have = sorted({m["version"] for _, m in versions if isinstance(m.get("version"), int)})
        raise ScalerError(f"model {name!r} has no version {version!r} (have: {', '.join(map(str, have))})")
    raise ScalerError(f"version {version!r} of {name!r} is ambiguous: {', '.join(h.short for h in matches)}")


def resolve_version(store: ContentStore, spec: str) -> tuple[str, BankHash]:
    """``name`` | ``name@VERSION`` | ``sha256:...`` -> (model name, manifest hash)."""
    if is_bank_hash(spec):
        manifest = store.get_manifest(spec)
        return str(manifest.get("name", "?")), BankHash(spec)
    name, _, version = spec.partition("@")
    head = store.resolve(name)
    if not version:
        return name, head
    return name, find_version(store, name, version)


def rollback(store: ContentStore, name: str, version: str) -> BankHash:
    """Point ``name`` back at an earlier (or later) version it had. Nothing is deleted."""
    with store.lock():
        store.clean_temp(stale_only=True)
        current = store.get_ref(name)
        if current is None:
            raise ModelNotFoundError(f"no model named {name!r}", name=name, available=store.models())
        target = find_version(store, name, version)
        if target != current:
            store.set_ref(name, target, expected=current, reason=f"rollback to {version}")
        return target
