"""Teacher adapters and the router as banks: read back into modules, and the new version a
``scaler distill`` run saves (trunk banks + each run teacher's ``adapter`` record)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from scaler_wizard.banks import ContentStore, read_bank_metadata
from scaler_wizard.branch import Branch
from scaler_wizard.distillation.distill_module import DistillModule
from scaler_wizard.distillation.distill_plan import DistillPlan
from scaler_wizard.errors import DistillError, ScalerError
from scaler_wizard.manifests.model import BaseEntry, Manifest, PluginRef, thaw
from scaler_wizard.manifests.teachers import TeacherAdapterEntry, TeacherEntry
from scaler_wizard.modeling.compose import trunk_id
from scaler_wizard.modeling.saving import TrainedRecord, build_manifest
from scaler_wizard.modeling.tensor_banks import encode_bank, load_bank_tensors
from scaler_wizard.versions.builder import new_version
from scaler_wizard.versions.history import next_version

ADAPTER_KIND = "teacher-adapter"
ROUTER_KIND = "teacher-router"


def _load_bank(store: ContentStore, module: nn.Module, bank: str, *, kind: str, what: str) -> None:
    try:
        path = store.verified_path(bank)
        meta = read_bank_metadata(path, name=bank)
        if meta.get("scaler.kind") != kind:
            raise DistillError(
                f"{what}: bank {bank[:19]}… is a {meta.get('scaler.kind')!r} bank, not {kind!r}"
            )
        tensors = load_bank_tensors(path, name=bank)
        module.load_state_dict(tensors, strict=True)
    except DistillError:
        raise
    except (ScalerError, RuntimeError) as exc:
        raise DistillError(f"{what}: cannot load bank {bank[:19]}…: {str(exc).splitlines()[0]}") from exc


def load_adapter(store: ContentStore, adapter: nn.Module, bank: str, *, name: str) -> None:
    """Teacher ``name``'s stored adapter into ``adapter`` (checked: hash, kind, every tensor)."""
    _load_bank(store, adapter, bank, kind=ADAPTER_KIND, what=f"teacher {name}'s adapter")


def load_router(
    store: ContentStore,
    router: nn.Module,
    entries: Mapping[str, TeacherEntry],
    order: Sequence[str],
    ref: PluginRef,
) -> bool:
    """The stored router, when one was trained over exactly these teachers (same order) with the
    same plugin and config; else the router stays fresh (a teacher was added: it is retrained)."""
    for name in order:
        adapter = entries[name].adapter
        if adapter is None:
            continue
        rec = adapter.router
        if (
            list(rec["teachers"]) == list(order)
            and rec["plugin"] == ref.plugin
            and thaw(rec["config"]) == ref.config_dict()
        ):
            _load_bank(store, router, adapter.router_bank, kind=ROUTER_KIND, what="the router")
            return True
    return False


def save_distilled(
    store: ContentStore,
    plan: DistillPlan,
    manifest: Manifest,
    module: DistillModule,
    router_ref: PluginRef,
    *,
    base_entry: BaseEntry,
    provenance: Mapping[str, Any],
    branches: Mapping[str, Branch] | None = None,
    records: Mapping[str, TrainedRecord] | None = None,
) -> tuple[str, Manifest]:
    """Write the trunk, adapter and router banks and the new version (ref moved last). The
    model must still be at the version the run started from (else DistillError: start again)."""
    cfg = plan.config
    order = cfg.order
    router = encode_bank(
        module.router.state_dict(),
        kind=ROUTER_KIND,
        metadata={"plugin": router_ref.plugin, "teachers": list(order)},
    )
    with store.lock():
        store.clean_temp(stale_only=True)
        current = store.get_ref(plan.model)
        if current is None or str(current) != plan.start_manifest:
            raise DistillError(
                f"model {plan.model!r} moved on while this run trained: nothing saved, start a new distillation",
                model=plan.model,
            )
        version = next_version(store, plan.model, manifest.version)
        message = (
            f"distill trunk from teachers {', '.join(cfg.teachers)}"
            + (f" (frozen: {', '.join(cfg.frozen)})" if cfg.frozen else "")
            + f": {cfg.steps} steps, {cfg.loss} loss, seed {cfg.seed} (run {provenance.get('run')})"
        )
        # Trunk banks (deduplicated; unchanged tensors keep their bank) through the save side of compose.
        drafted = build_manifest(
            store,
            trunk=module.trunk,
            branches={n: (branches or {}).get(n) for n in manifest.branches},
            base_entry=base_entry,
            parent=manifest,
            name=plan.model,
            version=version,
            message=message,
            previous=manifest,
            kept=manifest.branches,
            records=records,
        )
        tid = trunk_id(drafted)
        router_record = {
            "plugin": router_ref.plugin,
            "config": router_ref.config_dict(),
            "bank": str(store.put_bytes(router.data)),
            "teachers": list(order),
        }
        teachers = dict(manifest.teachers)
        for name in order:
            entry = teachers[name]
            if name in cfg.frozen:
                assert entry.adapter is not None
                record = dataclasses.replace(entry.adapter, router=router_record)  # its bank: byte for byte
            else:
                adapter = module.adapters[name]
                bank = encode_bank(
                    adapter.state_dict(),
                    kind=ADAPTER_KIND,
                    metadata={
                        "teacher": name,
                        "teacher_id": entry.id,
                        "layers": [f.layer for f in entry.features],
                    },
                )
                record = TeacherAdapterEntry(
                    bank=str(store.put_bytes(bank.data)),
                    trunk=tid,
                    loss=cfg.loss,
                    router=router_record,
                    provenance=dict(provenance),
                )
            teachers[name] = dataclasses.replace(entry, adapter=record)
        final = new_version(
            manifest,
            message=message,
            version=version,
            trunk=drafted.trunk,
            branches=drafted.branches,
            teachers=teachers,
            where="distilled manifest",
        )
        h = store.put_manifest(final)
        store.set_ref(plan.model, h, expected=current, reason=message)
    return str(h), final


__all__ = ["ADAPTER_KIND", "ROUTER_KIND", "load_adapter", "load_router", "save_distilled"]
