"""Version history: parents, ``name@N`` lookups, rollback by moving the ref (with a reflog)."""

from __future__ import annotations

from typing import Any

from scaler_wizard.banks.hashing import BankHash, is_bank_hash
from scaler_wizard.banks.store import ContentStore
from scaler_wizard.errors import ConflictError, ManifestError, ModelNotFoundError, ScalerError

_MAX_DEPTH = 100_000


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
    origin: tuple[str, dict[str, Any]],
    ours: dict[str, Any],
    head: tuple[str, dict[str, Any]],
) -> dict[str, Any]:
    """Re-apply a change made on ``origin`` onto the model's newer ``head`` (as git rebases).

    Possible only for a change of branches alone (adding, removing or replacing branches) on
    a head whose base and trunk are still those of ``origin``: branches depend on the trunk
    only, so each side's branch changes carry over unchanged. Returns ``ours`` with the
    branches merged and ``parent`` = the head; raises ConflictError (one line) when the trunk
    changed on either side or both sides changed the same branch.
    """
    origin_h, base = origin
    head_h, theirs = head
    for part in ("base", "trunk"):
        if ours[part] != base[part]:
            raise _rebase_conflict(name, head_h, origin_h, f"this change replaces the {part}")
        if theirs[part] != base[part]:
            raise _rebase_conflict(
                name, head_h, origin_h, f"v{theirs.get('version')} changed the {part} this change was made on"
            )
    b_base, b_ours, b_theirs = base["branches"], ours["branches"], theirs["branches"]
    merged: dict[str, Any] = {}
    for branch in sorted({*b_base, *b_ours, *b_theirs}):
        was, mine, other = b_base.get(branch), b_ours.get(branch), b_theirs.get(branch)
        if mine == was:
            pick = other
        elif other == was or mine == other:
            pick = mine
        else:
            did = "added" if was is None else "removed" if other is None else "changed"
            raise _rebase_conflict(
                name, head_h, origin_h, f"v{theirs.get('version')} {did} branch {branch!r} too"
            )
        if pick is not None:
            merged[branch] = pick
    return {**ours, "parent": str(head_h), "branches": merged}


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
            raise ModelNotFoundError(f"no model named {name!r}")
        target = find_version(store, name, version)
        if target != current:
            store.set_ref(name, target, expected=current, reason=f"rollback to {version}")
        return target
