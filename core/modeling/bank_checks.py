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

Trunk ids, and whether a branch may run on a trunk, are facts of the manifest alone:
``scaler_wizard.manifests.facts`` (``trunk_id``, ``trunk_ids``, ``check_branch_trunk``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from scaler_wizard.banks import BankHash
from scaler_wizard.banks.safetensors_bank import BankContent
from scaler_wizard.errors import IntegrityError
from scaler_wizard.manifests.model import Manifest, PluginRef
from scaler_wizard.modeling.tensor_banks import encode_bank

#: Marker of a bank that carries every key below (older banks carry a subset).
META_VERSION = "2"
META_KEY = "meta"


# -- what each bank says about itself ---------------------------------------------------------


def trunk_layer_meta(ref: PluginRef, index: int) -> dict[str, Any]:
    return {"gating": ref.plugin, "gating_config": ref.config_dict(), "layer": index}


def adapter_meta(branch: str, strategy_ref: PluginRef) -> dict[str, Any]:
    return {"strategy": strategy_ref.plugin, "strategy_config": strategy_ref.config_dict(), "branch": branch}


def head_meta(branch: str, head_ref: PluginRef, labels: Sequence[str]) -> dict[str, Any]:
    return {
        "head": head_ref.plugin,
        "head_config": head_ref.config_dict(),
        "labels": list(labels),
        "branch": branch,
    }


def base_meta(base: dict[str, Any]) -> dict[str, Any]:
    return {k: base[k] for k in ("architecture", "model_type") if k in base}


def expected_metadata(manifest: Manifest) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(field, bank, kind, expected metadata) for the base and every trunk-layer, adapter and head bank."""
    yield "base.bank", manifest.base.bank, "base", base_meta(manifest.base.to_dict())
    for i, layer in enumerate(manifest.trunk.layers):
        yield f"trunk.layers[{i}].bank", layer.bank, "trunk-layer", trunk_layer_meta(layer.gating, i)
    for name, entry in sorted(manifest.branches.items()):
        yield (
            f"branches.{name}.adapter_bank",
            entry.adapter_bank,
            "adapter",
            adapter_meta(name, entry.strategy),
        )
        yield f"branches.{name}.head_bank", entry.head_bank, "head", head_meta(name, entry.head, entry.labels)


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
