"""``scaler expand add-base-layer``: a model's base one block deeper, as a new version.

1. Compose the model's current version, load every branch; refuse in-encoder branches (their
   adapters sit in the base's blocks by index) and bases that are not pre-LN (see
   ``base_depth``).
2. Build the grown base (``base_depth.grow``) beside the composed one.
3. Run every branch on the probe set with the old base and with the new one (the same model,
   its ``base.model`` swapped); refuse (nothing stored) when max |delta logits| > 1e-5.
4. Under the store lock: write the new base bank and the new config.json, and make the version
   with the one builder (``versions.builder.new_version``): ``base.bank`` / ``base.files``
   replaced, ``base.inspection`` detected anew, ``base.growth`` + the insertion; branches
   recorded on the old trunk are re-recorded on the new trunk id (it hashes the base) with a
   ``provenance.growth`` record, as ``expand`` does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import torch

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ConflictError, GrowthError, ModelNotFoundError
from scaler_wizard.growth.base_depth import OPERATOR, config_bytes, grow
from scaler_wizard.growth.expand import TOLERANCE, ExpandResult, _logits, _rerecord
from scaler_wizard.manifests.facts import trunk_id_of, trunk_ids
from scaler_wizard.manifests.model import BaseGrowth, BaseInspection, Manifest
from scaler_wizard.modeling.compose import compose
from scaler_wizard.modeling.fingerprint import PROBE_SET, PROBE_TEXTS
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.modeling.tensor_banks import encode_bank
from scaler_wizard.versions.builder import new_version
from scaler_wizard.versions.history import next_version

_BATCH = 32


def _measure_base(model: ScalerModel, new_base: torch.nn.Module, texts: Sequence[str]) -> dict[str, float]:
    """Per branch max |delta logits| with ``new_base`` in place of the model's base model (with
    no branch, the trunk's pooled output: key ``(trunk)``)."""
    names = model.branch_names
    old_base = model.base.model
    model.eval()

    def pooled() -> list[torch.Tensor]:
        outs = []
        with torch.inference_mode():
            for start in range(0, len(texts), _BATCH):
                batch = model.base.tokenize(list(texts[start : start + _BATCH]), model.device)
                outs.append(model.encode_batch(batch).pooled.float().cpu())
        return outs

    if not names:
        before = pooled()
        model.base.model = new_base
        try:
            after = pooled()
        finally:
            model.base.model = old_base
        return {"(trunk)": max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))}
    before_l = _logits(model, names, texts)
    model.base.model = new_base
    try:
        after_l = _logits(model, names, texts)
    finally:
        model.base.model = old_base
    return {n: float((after_l[n] - before_l[n]).abs().max()) for n in names}


def add_base_layer(
    store: ContentStore,
    name: str,
    *,
    at: int | None = None,
    probe_texts: Sequence[str] | None = None,
    tolerance: float = TOLERANCE,
    dry_run: bool = False,
) -> ExpandResult:
    """Insert an identity block into model ``name``'s base at ``at`` (default: on top)."""
    head = store.get_ref(name)
    if head is None:
        raise ModelNotFoundError(f"no model named {name!r}", name=name, available=store.models())
    model = compose(store, str(head))
    assert model.origin is not None
    parent: Manifest = model.origin.manifest
    model.load_all_branches()
    inside = [n for n in model.branch_names if model.branch(n).adapter.needs_base_pass]
    if inside:
        raise GrowthError(
            f"{OPERATOR}: branch {inside[0]!r} keeps its adapter inside the base's blocks (by index): "
            "remove it first, or grow before adding it",
            operator=OPERATOR,
        )
    texts = list(probe_texts) if probe_texts is not None else list(PROBE_TEXTS)
    if not texts:
        raise GrowthError(f"{OPERATOR}: no probe texts to check the expansion on", operator=OPERATOR)
    config_json = json.loads(store.verified_path(parent.base.files["config.json"]).read_bytes())
    probe_batch = model.base.tokenize(texts[:_BATCH], model.device)
    grown = grow(model.base.model, config_json, probe_batch, at=at)
    deltas = _measure_base(model, grown.model, texts)
    worst = max(deltas.values()) if deltas else 0.0
    arguments: dict[str, Any] = {"at": grown.at, "copied_from": grown.copied_from}
    details = [
        {
            **grown.details,
            "identity_delta": grown.identity_delta,
            "placement": grown.architecture.placement,
        }
    ]
    result = ExpandResult(
        model=name,
        operator=OPERATOR,
        arguments=arguments,
        details=details,
        max_delta=worst,
        deltas=deltas,
        probe=PROBE_SET if probe_texts is None else "file",
        probes=len(texts),
        tolerance=tolerance,
        parent=str(head),
        parent_version=parent.version,
        old_trunk=trunk_ids(parent)[0],
    )
    if not worst <= tolerance:  # NaN refuses too
        where = max(deltas, key=lambda n: deltas[n])
        raise GrowthError(
            f"{OPERATOR}: max |delta logits| {worst:.3g} on branch {where!r} exceeds {tolerance:.0e}: "
            "not function-preserving, nothing stored",
            operator=OPERATOR,
            max_delta=worst,
        )
    if dry_run:
        return result
    bank = encode_bank(
        grown.model.state_dict(),
        kind="base",
        metadata={"architecture": parent.base.architecture, "model_type": str(grown.architecture.model_type)},
    )
    message = (
        f"expand {OPERATOR}: at {grown.at}, copy of block {grown.copied_from}, "
        f"{grown.layers_before} -> {grown.layers_before + 1} blocks (max |delta logits| {worst:.2e} "
        f"<= {tolerance:.0e} on {len(parent.branches)} branches)"
    )
    with store.lock():
        store.clean_temp(stale_only=True)
        current = store.get_ref(name)
        if current != head:
            raise ConflictError(
                f"model {name!r} moved to {current} while expanding {head}: run it again", model=name
            )
        version = next_version(store, name, parent.version)
        bank_hash = store.put_bytes(bank.data)
        config_hash = store.put_bytes(config_bytes(grown.config_json))
        new_base = dataclasses.replace(
            parent.base,
            bank=str(bank_hash),
            files={**parent.base.files, "config.json": str(config_hash)},
            inspection=BaseInspection.from_dict(grown.architecture.record()),
            growth=(
                *parent.base.growth,
                BaseGrowth(OPERATOR, grown.at, grown.copied_from, grown.layers_before + 1, version),
            ),
        )
        new_tid = trunk_id_of(new_base, parent.trunk)
        record: dict[str, Any] = {
            "operator": OPERATOR,
            "arguments": arguments,
            "since_version": version,
            "details": details,
        }
        entries, moved = _rerecord(parent, new_tid, record, deltas)
        manifest = new_version(
            parent,
            message=message,
            version=version,
            base=new_base,
            branches={**parent.branches, **entries},
        )
        h = store.put_manifest(manifest)
        store.set_ref(name, h, expected=current, reason=message)
    result.manifest, result.version, result.new_trunk, result.rerecorded = str(h), version, new_tid, moved
    return result


__all__ = ["add_base_layer"]
