"""Banks are self-describing: what a bank's metadata says must agree with the manifest entry
that names it, and a branch must run on the trunk it was trained on.

A manifest is only a list of names; a schema-valid manifest can still put a bank where it
does not belong (labels renamed or reordered, two branches' head banks swapped, a LoRA
``alpha`` edited, trunk layers swapped or repeated). Every bank records, in its safetensors
metadata, the plugin, the plugin config, the branch (or layer index) and the labels it was
written for, and :func:`check_bank_metadata` compares them with the entry at compose time and
in ``scaler verify``.

Banks written before this (``scaler.meta`` absent) carry fewer keys: what they carry is
checked, what they lack is not required. Banks written now carry ``scaler.meta = "2"`` and
must carry every key.

Trunk ids
---------
A branch records the id of the trunk it was trained on. Scheme 2 (current) hashes the base
bank, the base's config and tokenizer files (``base.files``), pooling, and each MoE layer's
bank, gating plugin and config. Scheme 1 (before) left ``base.files`` out. A branch recorded
under either scheme is accepted when its id matches the model's trunk under that scheme, so
stores written before keep loading; new branches record scheme 2. Feature caches are keyed
by the scheme-2 id, so old cache entries are simply recomputed once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from scaler_wizard.banks import BankHash
from scaler_wizard.banks.safetensors_bank import BankContent, encode_bank
from scaler_wizard.banks.store import canonical_json
from scaler_wizard.errors import IntegrityError, ManifestError

#: Marker of a bank that carries every key below (older banks carry a subset).
META_VERSION = "2"
META_KEY = "meta"


# -- trunk ids ----------------------------------------------------------------------------------


def _trunk_key(manifest: dict[str, Any], *, with_files: bool) -> dict[str, Any]:
    trunk = manifest["trunk"]
    key: dict[str, Any] = {
        "base": manifest["base"]["bank"],
        "pooling": trunk["pooling"],
        "layers": [
            [layer["bank"], layer["gating"]["plugin"], layer["gating"]["config"]] for layer in trunk["layers"]
        ],
    }
    if with_files:
        key["scheme"] = 2
        key["base_files"] = dict(sorted(manifest["base"]["files"].items()))
    return key


def trunk_id(manifest: dict[str, Any]) -> str:
    """Identity of the shared computation branches depend on: base weights, base config and
    tokenizer files, pooling, and every MoE layer (bank, gating plugin and config)."""
    return str(BankHash.of_bytes(canonical_json(_trunk_key(manifest, with_files=True))))


def legacy_trunk_id(manifest: dict[str, Any]) -> str:
    """The scheme-1 trunk id (no ``base.files``) that branches recorded before scheme 2."""
    return str(BankHash.of_bytes(canonical_json(_trunk_key(manifest, with_files=False))))


def trunk_ids(manifest: dict[str, Any]) -> tuple[str, str]:
    """(current id, legacy id) of a manifest's trunk: a branch may record either."""
    return trunk_id(manifest), legacy_trunk_id(manifest)


def is_stale(entry: dict[str, Any]) -> bool:
    """A branch ``scaler train --allow-stale-branches`` left on an older trunk, on purpose."""
    prov = entry.get("provenance")
    return isinstance(prov, dict) and isinstance(prov.get("stale"), dict)


def check_branch_trunk(
    manifest: dict[str, Any], name: str, entry: dict[str, Any], *, ids: tuple[str, str] | None = None
) -> None:
    """Refuse a branch whose recorded trunk is not this model's trunk (unless marked stale)."""
    recorded = entry.get("trunk")
    if recorded is None or is_stale(entry):
        return
    ids = ids or trunk_ids(manifest)
    if recorded not in ids:
        raise ManifestError(
            f"branches.{name}.trunk: the branch was trained on trunk {BankHash(recorded).short}, but this "
            f"manifest's base and trunk are {BankHash(ids[0]).short}: its outputs would be wrong"
        )


def mark_stale_branches(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's branches, each one recorded on another trunk marked stale (new dicts).

    A version whose trunk changed (in memory, through the library) while a branch was not
    retrained leaves that branch on a trunk it was not trained on: its outputs changed since
    its metrics and fingerprint were recorded. It is marked as ``scaler train
    --allow-stale-branches`` marks one (``provenance.stale``), so it still loads, says so in
    ``branch show``, and ``verify --deep`` reports its changed fingerprint.
    """
    ids = trunk_ids(manifest)
    out = {}
    for name, entry in manifest["branches"].items():
        recorded = entry.get("trunk")
        if recorded is not None and recorded not in ids and not is_stale(entry):
            prov = dict(entry.get("provenance") or {})
            prov["stale"] = {
                "since_version": manifest["version"],
                "trained_on_trunk": recorded,
                "reason": "the trunk changed in this version without retraining this branch; "
                "its outputs have changed since its metrics and fingerprint were recorded",
            }
            entry = {**entry, "provenance": prov}
        out[name] = entry
    return out


# -- what each bank says about itself ---------------------------------------------------------


def trunk_layer_meta(ref: dict[str, Any], index: int) -> dict[str, Any]:
    return {"gating": ref["plugin"], "gating_config": ref["config"], "layer": index}


def adapter_meta(branch: str, strategy_ref: dict[str, Any]) -> dict[str, Any]:
    return {"strategy": strategy_ref["plugin"], "strategy_config": strategy_ref["config"], "branch": branch}


def head_meta(branch: str, head_ref: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    return {
        "head": head_ref["plugin"],
        "head_config": head_ref["config"],
        "labels": list(labels),
        "branch": branch,
    }


def base_meta(base: dict[str, Any]) -> dict[str, Any]:
    return {k: base[k] for k in ("architecture", "model_type") if k in base}


def expected_metadata(manifest: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(field, bank, kind, expected metadata) for the base and every trunk-layer, adapter and head bank."""
    yield "base.bank", manifest["base"]["bank"], "base", base_meta(manifest["base"])
    for i, layer in enumerate(manifest["trunk"]["layers"]):
        yield f"trunk.layers[{i}].bank", layer["bank"], "trunk-layer", trunk_layer_meta(layer["gating"], i)
    for name, entry in sorted(manifest["branches"].items()):
        yield (
            f"branches.{name}.adapter_bank",
            entry["adapter_bank"],
            "adapter",
            adapter_meta(name, entry["strategy"]),
        )
        yield (
            f"branches.{name}.head_bank",
            entry["head_bank"],
            "head",
            head_meta(name, entry["head"], entry["labels"]),
        )


def _recorded(raw: str, expected: Any) -> Any:
    if isinstance(expected, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _entry_fields(where: str) -> dict[str, str]:
    """Which manifest field states each metadata key, for a bank named at ``where``."""
    at = where.rsplit(".", 1)[0]  # trunk.layers[0] or branches.spam
    return {
        "gating": f"{at}.gating.plugin",
        "gating_config": f"{at}.gating.config",
        "strategy": f"{at}.strategy.plugin",
        "strategy_config": f"{at}.strategy.config",
        "head": f"{at}.head.plugin",
        "head_config": f"{at}.head.config",
        "labels": f"{at}.labels",
        "architecture": f"{at}.architecture",
        "model_type": f"{at}.model_type",
    }


def check_bank_metadata(meta: dict[str, str], expected: dict[str, Any], *, bank: str, where: str) -> None:
    """IntegrityError naming the field when a bank says it was written for something else.

    ``where`` is the field naming the bank (``branches.spam.head_bank``); the error names
    the field that disagrees with the bank (``branches.spam.labels``).
    """
    full = meta.get(f"scaler.{META_KEY}") == META_VERSION
    fields = _entry_fields(where)
    for key, value in expected.items():
        raw = meta.get(f"scaler.{key}")
        if raw is None:
            if full:
                raise IntegrityError(f"{where}: bank {bank} lacks its scaler.{key} metadata")
            continue  # written by older code, which did not record it
        recorded = _recorded(raw, value)
        if recorded != value:
            raise IntegrityError(
                f"{fields.get(key, where)}: the manifest says {_show(value)}, but bank {BankHash(bank).short} "
                f"({where}) was written for {key} {_show(recorded)}"
            )


def encode_with_metadata(
    tensors: dict[str, Any],
    *,
    kind: str,
    metadata: dict[str, Any],
    legacy: dict[str, Any] | None = None,
    previous: str | None = None,
) -> BankContent:
    """Encode a bank with its full self-description.

    ``previous`` (the bank the same slot held in the parent version) and ``legacy`` (the
    metadata older code wrote): when the tensors are unchanged and the parent's bank is the
    older form, that bank is kept, so re-saving an old model does not change its trunk id.
    """
    bank = encode_bank(tensors, kind=kind, metadata={**metadata, META_KEY: META_VERSION})
    if previous is not None and legacy is not None and str(bank.hash) != previous:
        old = encode_bank(tensors, kind=kind, metadata=legacy)
        if str(old.hash) == previous:
            return old
    return bank
