"""nn.Module -> banks + a new manifest (not yet stored): the save side of compose.

``build_manifest`` writes a model's trunk and branch banks (deduplicated) and derives the new
version through the one builder (``versions.builder.new_version``); ``save_version``
(``modeling.compose``) stores it and moves the ref.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scaler_wizard.banks import ContentStore
from scaler_wizard.branch import Branch
from scaler_wizard.encoder_host import EncoderHost
from scaler_wizard.errors import ManifestError, ScalerError
from scaler_wizard.manifests.facts import base_display_name, trunk_id_of
from scaler_wizard.manifests.model import BaseEntry, BranchEntry, Manifest, PluginRef, TrunkEntry, TrunkLayer
from scaler_wizard.modeling.bank_checks import adapter_meta, encode_with_metadata, head_meta, trunk_layer_meta
from scaler_wizard.modeling.model import Trunk
from scaler_wizard.moe import MoELayer
from scaler_wizard.versions.builder import new_version

#: What ``Branch.entry`` may hold (``adapter_bank``/``head_bank`` are written by the save).
_ENTRY_KEYS = frozenset({"strategy", "head", "labels", "trunk", "provenance", "metrics", "fingerprint"})


@dataclass(frozen=True)
class TrainedRecord:
    """What a save records for a branch trained just before it (``branch add``, ``scaler
    train``), in place of what its entry held: its metrics, provenance and fingerprint, and
    the trunk it was trained on (None: the new version's trunk)."""

    metrics: Mapping[str, Any]
    provenance: Mapping[str, Any]
    fingerprint: Mapping[str, Any]
    trunk: str | None = None


def _trunk_entry(store: ContentStore, trunk: Trunk, base: BaseEntry, previous: Manifest | None) -> TrunkEntry:
    """Write the trunk's layer banks (deduplicated); the manifest's ``trunk``."""
    prev_layers = previous.trunk.layers if previous is not None else ()
    layers = []
    for i, layer in enumerate(trunk.layers):
        assert isinstance(layer, MoELayer)
        ref = layer.gating_ref
        if ref is None:
            raise ScalerError(f"trunk.layers[{i}] was not built by new_trunk_layer/compose: no gating_ref")
        # -- self-describing banks (engineer D, issue 10 item 6): layer index + gating config --
        bank = encode_with_metadata(
            layer.state_dict(),
            kind="trunk-layer",
            metadata=trunk_layer_meta(ref, i),
            legacy={"gating": ref.plugin},
            previous=prev_layers[i].bank if i < len(prev_layers) else None,
        )
        # -- end self-describing banks --
        layers.append(
            TrunkLayer(
                bank=str(store.put_bytes(bank.data)),
                num_experts=layer.num_experts,
                expert_hidden=layer.expert_hidden,
                gating=ref,
            )
        )
    return TrunkEntry(hidden_size=base.hidden_size, pooling=trunk.pooling, layers=tuple(layers))


def _branch_entry(
    store: ContentStore,
    bname: str,
    branch: Branch,
    *,
    base: EncoderHost | None,
    base_entry: BaseEntry,
    tid: str,
    record: TrainedRecord | None = None,
) -> BranchEntry:
    """Write a branch's banks (deduplicated); its manifest entry (recorded on trunk ``tid``
    unless its ``.entry`` names the trunk it was trained on; ``record`` replaces what the
    entry says about the branch's training)."""
    entry = dict(getattr(branch, "entry", {}))
    if "strategy" not in entry or "head" not in entry:
        raise ScalerError(f"branch {bname!r} was not built by new_branch/compose: no plugin refs")
    unknown = sorted(set(entry) - _ENTRY_KEYS - {"adapter_bank", "head_bank"})
    if unknown:
        raise ManifestError(
            f"new manifest: branches.{bname}: unknown field {unknown[0]!r}", field=f"branches.{bname}"
        )
    strategy, head_ref = PluginRef.from_dict(entry["strategy"]), PluginRef.from_dict(entry["head"])
    if branch.adapter.bank_format == "folder":
        if base is None:
            raise ScalerError(
                f"branch {bname!r} keeps its adapter in the base encoder: save it with its model"
            )
        staging = store.scratch_dir("adapter-export")
        try:
            folder = branch.adapter.export_folder(
                base, bname, staging, base_name=base_display_name(base_entry)
            )
            adapter_bank = str(store.put_tree(folder, kind="adapter", layout=branch.adapter.bank_layout))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        adapter = encode_with_metadata(  # self-describing banks (engineer D): + strategy config
            branch.adapter.state_dict(), kind="adapter", metadata=adapter_meta(bname, strategy)
        )
        adapter_bank = str(store.put_bytes(adapter.data))
    head = encode_with_metadata(  # self-describing banks (engineer D): + head config, branch
        branch.head.state_dict(), kind="head", metadata=head_meta(bname, head_ref, branch.labels)
    )
    if record is not None:
        entry.update(
            trunk=record.trunk,
            provenance=record.provenance,
            metrics=record.metrics,
            fingerprint=record.fingerprint,
        )
    return BranchEntry(
        strategy=strategy,
        adapter_bank=adapter_bank,
        head=head_ref,
        head_bank=str(store.put_bytes(head.data)),
        labels=tuple(branch.labels),
        trunk=entry.get("trunk") or tid,
        provenance=entry.get("provenance"),
        metrics=entry.get("metrics"),
        fingerprint=entry.get("fingerprint"),
    )


def build_manifest(
    store: ContentStore,
    *,
    trunk: Trunk,
    branches: dict[str, Branch | None],
    base_entry: BaseEntry,
    parent: Manifest | None,
    name: str,
    version: int,
    message: str,
    base: EncoderHost | None = None,
    previous: Manifest | None = None,
    kept: Mapping[str, BranchEntry] | None = None,
    records: Mapping[str, TrainedRecord] | None = None,
) -> Manifest:
    """Write the banks (deduplicated) and return the new version (not yet stored).

    ``branches`` maps each branch to its module, or to None when it was never loaded since
    compose (its entry is then ``kept[name]``, recorded as given). ``records`` holds what
    to record for the branches trained just before (:class:`TrainedRecord`).
    ``parent`` is the version it follows (None for a first version or a "save as"); a
    branch left recorded on another trunk is marked stale (:func:`new_version`).
    ``previous`` is the version the model was composed from (its trunk banks are kept
    byte for byte when the tensors did not change, whatever form older code wrote).
    """
    new_trunk = _trunk_entry(store, trunk, base_entry, previous)
    tid = trunk_id_of(base_entry, new_trunk)
    strays = sorted(set(records or {}) - set(branches))
    if strays:
        raise ScalerError(f"branch {strays[0]!r} has a training record but is not in the model")
    entries: dict[str, BranchEntry] = {}
    for bname, branch in branches.items():
        record = (records or {}).get(bname)
        if branch is None:  # untouched since compose: keep its entry as it was
            if record is not None:
                raise ScalerError(f"branch {bname!r} has a training record but was never loaded")
            entries[bname] = (kept or {})[bname]
        else:
            entries[bname] = _branch_entry(
                store, bname, branch, base=base, base_entry=base_entry, tid=tid, record=record
            )
    return new_version(
        parent,
        name=name,
        version=version,
        message=message,
        base=base_entry,
        trunk=new_trunk,
        branches=entries,
    )
