"""Manifest -> nn.Module (compose) and nn.Module -> banks + a new manifest version (save)."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping
from typing import Any

import torch

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.branch import Branch, BranchAdapter, Head
from scaler_wizard.encoder_host import EncoderHost
from scaler_wizard.errors import (
    BankNotFoundError,
    ConflictError,
    IntegrityError,
    ManifestError,
    PluginError,
    ScalerError,
)
from scaler_wizard.manifests.facts import (
    banks_of,
    check_branch_trunk,
    trunk_id,
    trunk_ids,
)
from scaler_wizard.manifests.model import (
    BaseEntry,
    BranchEntry,
    Manifest,
    PluginRef,
    Provider,
)
from scaler_wizard.modeling.bank_checks import (
    adapter_meta,
    check_bank_metadata,
    head_meta,
    trunk_layer_meta,
)
from scaler_wizard.modeling.bank_loading import bank_tensors as _bank_tensors
from scaler_wizard.modeling.bank_loading import build_from_bank as _build_from_bank
from scaler_wizard.modeling.bank_loading import call_factory as _call_factory
from scaler_wizard.modeling.bank_loading import meta_probe as _meta_probe
from scaler_wizard.modeling.bank_loading import moe_layer as _moe_layer
from scaler_wizard.modeling.base_encoder import import_base, load_base, locate_base
from scaler_wizard.modeling.model import Origin, ScalerModel, Trunk
from scaler_wizard.modeling.saving import TrainedRecord, build_manifest
from scaler_wizard.moe import Gating, MoELayer
from scaler_wizard.names import validate_name
from scaler_wizard.plugin_manager import Registry, get_registry
from scaler_wizard.versions.history import next_version, rebase_branches, resolve_version


def _plugin_ref(
    registry: Registry, kind: str, name: str, raw_config: Any, where: str
) -> tuple[Any, PluginRef]:
    """(config object, manifest plugin_ref) for a factory, defaults filled in."""
    reg = registry.get(kind, name, where=where)
    obj, complete = reg.build_config(raw_config, where=f"{where}.config")
    return obj, PluginRef(plugin=name, config=complete, provider=Provider.from_dict(reg.provider()))


def _resolve_ref(registry: Registry, kind: str, ref: PluginRef, where: str) -> tuple[Any, Any]:
    """(factory, config object) for a manifest plugin_ref, or a PluginError naming the field."""
    reg = registry.get(kind, ref.plugin, provider=ref.provider.to_dict(), where=f"{where}.plugin")
    obj, _ = reg.build_config(ref.config_dict(), where=f"{where}.config")
    return reg.factory, obj


def new_trunk_layer(
    *,
    hidden_size: int,
    num_experts: int = 8,
    expert_hidden: int | None = None,
    gating: str = "topk",
    gating_config: dict[str, Any] | None = None,
    registry: Registry | None = None,
) -> MoELayer:
    """A fresh MoE layer (identity on its input) with a gating plugin."""
    registry = registry or get_registry()
    where = "trunk.gating"
    cfg, ref = _plugin_ref(registry, "gating", gating, gating_config or {}, where)
    try:
        gate = registry.get("gating", gating).factory(cfg, hidden_size=hidden_size, num_experts=num_experts)
    except (ValueError, TypeError) as exc:
        raise PluginError(f"{where}: {exc}") from exc
    if not isinstance(gate, Gating):
        raise PluginError(f"gating {gating!r} factory returned {type(gate).__name__}, not a Gating")
    layer = MoELayer(hidden_size, num_experts, expert_hidden or 2 * hidden_size, gate)
    layer.gating_ref = ref
    return layer


def new_branch(
    *,
    hidden_size: int,
    labels: list[str],
    strategy: str = "lora",
    strategy_config: dict[str, Any] | None = None,
    head: str = "linear",
    head_config: dict[str, Any] | None = None,
    registry: Registry | None = None,
) -> Branch:
    """A fresh branch (adapter + head) from plugins; its manifest entry rides on ``.entry``."""
    registry = registry or get_registry()
    s_cfg, s_ref = _plugin_ref(registry, "strategy", strategy, strategy_config or {}, "strategy")
    h_cfg, h_ref = _plugin_ref(registry, "head", head, head_config or {}, "head")
    adapter = _call_factory(
        registry.get("strategy", strategy).factory, s_cfg, "strategy", hidden_size=hidden_size
    )
    if not isinstance(adapter, BranchAdapter):
        raise PluginError(f"strategy {strategy!r} returned {type(adapter).__name__}, not a BranchAdapter")
    head_mod = _call_factory(
        registry.get("head", head).factory,
        h_cfg,
        "head",
        in_features=adapter.out_features,
        labels=list(labels),
    )
    if not isinstance(head_mod, Head):
        raise PluginError(f"head {head!r} returned {type(head_mod).__name__}, not a Head")
    branch = Branch(adapter, head_mod, labels)
    branch.entry = {"strategy": s_ref.to_dict(), "head": h_ref.to_dict(), "labels": list(labels)}
    return branch


def _import_folder_bank(
    store: ContentStore, base: EncoderHost, adapter: Any, branch: str, h: str, *, where: str
) -> None:
    """Hand a folder bank (a verified read-only view of its files) to the adapter."""
    tree = store.read_tree(h)
    if tree is None:
        raise IntegrityError(f"{where}: bank {h} is a single file, but strategy expects a folder bank")
    if tree.get("kind") != "adapter" or tree.get("layout") != adapter.bank_layout:
        raise IntegrityError(
            f"{where}: bank {h} is a {tree.get('kind')!r}/{tree.get('layout')!r} folder, "
            f"expected 'adapter'/{adapter.bank_layout!r}"
        )
    view = store.scratch_dir("adapter-view")
    try:
        store.materialize_tree(h, view)
        try:
            adapter.import_folder(base, branch, view)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise IntegrityError(f"{where}: bank {h} does not load: {str(exc).splitlines()[0]}") from exc
    finally:
        shutil.rmtree(view, ignore_errors=True)


def compose(
    store: ContentStore,
    spec: str,
    *,
    device: torch.device | str = "cpu",
    registry: Registry | None = None,
) -> Any:
    """Build the model a stored version describes: ``name``, ``name@VERSION`` or ``sha256:...``.

    Every bank's hash is checked (through the verification cache); branch banks are read
    only when a branch is first used.
    """
    registry = registry or get_registry()
    name, h = resolve_version(store, spec)
    manifest = store.manifest(h, where=f"manifest {h.short} ({name})")
    # Fail early and cheaply: every plugin present, every config valid, every bank the trunk
    # needs on disk. A branch's banks are checked when it is first used, so a model whose
    # unused branch lost a bank (a partial pull, a pruned store) still serves the others.
    # The (factory, config) pairs resolved here are the ones used below: each config is
    # validated once.
    gatings = [
        _resolve_ref(registry, "gating", layer.gating, f"trunk.layers[{i}].gating")
        for i, layer in enumerate(manifest.trunk.layers)
    ]
    plugins = {
        bname: (
            _resolve_ref(registry, "strategy", entry.strategy, f"branches.{bname}.strategy"),
            _resolve_ref(registry, "head", entry.head, f"branches.{bname}.head"),
        )
        for bname, entry in manifest.branches.items()
    }
    for field, bank, _kind in banks_of(manifest):
        # branches load lazily (each checks its own banks); teachers are not part of the forward
        if not field.startswith(("branches.", "teachers.")) and not store.has(bank):
            raise BankNotFoundError(f"{field}: bank {bank} is missing from the store {store.root}", bank=bank)

    base = load_base(store, manifest.base.to_dict(), device=device)
    hidden = manifest.base.hidden_size
    layers = []
    for i, spec_layer in enumerate(manifest.trunk.layers):
        where = f"trunk.layers[{i}]"
        factory, cfg = gatings[i]
        tensors, meta = _bank_tensors(store, spec_layer.bank, kind="trunk-layer", where=where)
        build = functools.partial(
            _moe_layer, factory, cfg, spec_layer.to_dict(), hidden_size=hidden, where=where
        )
        layer = _build_from_bank(build, tensors, bank=spec_layer.bank, where=where)
        # The bank must be the one written for this position, gating plugin and config.
        check_bank_metadata(
            meta, trunk_layer_meta(spec_layer.gating, i), bank=spec_layer.bank, where=f"{where}.bank"
        )
        layer.gating_ref = spec_layer.gating
        layers.append(layer)
    trunk = Trunk(layers, pooling=manifest.trunk.pooling).to(device)
    tids = trunk_ids(manifest)

    def load_branch(bname: str) -> Branch:
        entry = manifest.branches[bname]
        where = f"branches.{bname}"
        check_branch_trunk(manifest, bname, ids=tids)
        (s_factory, s_cfg), (h_factory, h_cfg) = plugins[bname]
        for key, bank in (("adapter_bank", entry.adapter_bank), ("head_bank", entry.head_bank)):
            if not store.has(bank):
                raise BankNotFoundError(
                    f"{where}.{key}: bank {bank} is missing from the store {store.root}", bank=bank
                )
        make_adapter = functools.partial(
            _call_factory, s_factory, s_cfg, f"{where}.strategy", hidden_size=hidden
        )
        probe = _meta_probe(make_adapter)
        if getattr(probe if probe is not None else make_adapter(), "bank_format", "safetensors") == "folder":
            adapter = make_adapter()
            _import_folder_bank(
                store, base, adapter, bname, entry.adapter_bank, where=f"{where}.adapter_bank"
            )
        else:
            a_tensors, a_meta = _bank_tensors(
                store, entry.adapter_bank, kind="adapter", where=f"{where}.adapter_bank"
            )
            adapter = _build_from_bank(
                make_adapter,
                a_tensors,
                bank=entry.adapter_bank,
                where=f"{where}.adapter_bank",
                probe=probe,
            )
            check_bank_metadata(
                a_meta,
                adapter_meta(bname, entry.strategy),
                bank=entry.adapter_bank,
                where=f"{where}.adapter_bank",
            )
        labels = list(entry.labels)
        h_tensors, h_meta = _bank_tensors(store, entry.head_bank, kind="head", where=f"{where}.head_bank")
        head = _build_from_bank(
            lambda: _call_factory(
                h_factory, h_cfg, f"{where}.head", in_features=adapter.out_features, labels=labels
            ),
            h_tensors,
            bank=entry.head_bank,
            where=f"{where}.head_bank",
        )
        check_bank_metadata(
            h_meta,
            head_meta(bname, entry.head, labels),
            bank=entry.head_bank,
            where=f"{where}.head_bank",
        )
        branch = Branch(adapter, head, labels)
        branch.entry = {k: v for k, v in entry.to_dict().items() if k not in ("adapter_bank", "head_bank")}
        branch.eval()
        return branch

    model = ScalerModel(base, trunk, branch_names=list(manifest.branches), branch_loader=load_branch)
    model.origin = Origin.of(name, h, manifest)
    model.eval()
    return model


def save_version(
    store: ContentStore,
    model: ScalerModel,
    *,
    message: str,
    name: str | None = None,
    records: Mapping[str, TrainedRecord] | None = None,
    entries: Mapping[str, BranchEntry] | None = None,
    base_entry: BaseEntry | None = None,
) -> BankHash:
    """Save a model as a new version: banks first, then the manifest, then the ref (last).

    ``base_entry`` replaces the base's entry (``scaler train --train-new-base-layers`` saves
    the trained base as a new bank); by default the version keeps the one it was composed on.

    Each loaded branch's entry is made from its module and its banks (``records[name]``
    says how a branch trained just before was trained); each branch not loaded since
    compose keeps its entry, or gets ``entries[name]`` (``scaler train`` marks the branches
    it leaves behind stale so).

    The new version is numbered one above the highest the model ever had (so numbers stay
    unique after a rollback). If the model's name moved on since this model was composed,
    a change of branches alone is re-applied onto the new head (as git rebases a commit
    that touches other files) and its message says so; a real conflict (the trunk changed
    on either side, or both sides changed one branch) is a ConflictError, so concurrent
    writers never lose each other's work. After a rebase ``model.origin`` stays the version
    the model was composed from (the model in memory lacks the other writer's branches).
    """
    origin = model.origin
    if origin is None:
        raise ScalerError("this model was not composed from a store: nothing to version it against")
    target = validate_name(origin.name if name is None else name)
    with store.lock(), store.deferred_cache_writes():
        store.clean_temp(stale_only=True)  # what writers killed earlier left behind
        current = store.get_ref(target)
        parent: Manifest | None
        if target == origin.name:
            if current is None:
                raise ConflictError(
                    f"model {target!r} was deleted since this model was composed from {origin.manifest_hash}",
                    model=target,
                )
            parent = origin.manifest
            version = next_version(store, target, origin.manifest.version)
        else:
            if current is not None:
                raise ConflictError(f"model {target!r} already exists", model=target)
            parent, version = None, 1
        branches = {n: (model.branch(n) if model.is_loaded(n) else None) for n in model.branch_names}
        strays = sorted(set(entries or {}) - {n for n, b in branches.items() if b is None})
        if strays:
            raise ScalerError(
                f"branch {strays[0]!r} has an entry given, but it is loaded or not in the model"
            )
        manifest = build_manifest(
            store,
            trunk=model.trunk,
            branches=branches,
            base=model.base,
            base_entry=origin.manifest.base if base_entry is None else base_entry,
            previous=origin.manifest,
            kept={**origin.manifest.branches, **(entries or {})},
            records=records,
            name=target,
            parent=parent,
            version=version,
            message=message,
        )
        is_rebased = parent is not None and current != origin.manifest_hash
        if is_rebased:
            assert current is not None
            head = store.manifest(current, where=f"manifest {current.short} ({target})")
            manifest = rebase_branches(
                target,
                origin=(origin.manifest_hash, origin.manifest),
                ours=manifest,
                head=(current, head),
                message=f"{message} (rebased onto v{head.version} {current.short})",
            )
        h = store.put_manifest(manifest)
        store.set_ref(target, h, expected=current, reason=manifest.message or message)
    if not is_rebased:
        model.origin = Origin.of(target, h, manifest)
    return h


def init_model(
    store: ContentStore,
    name: str,
    *,
    base: str | None = None,
    moe_layers: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    expert_hidden: int | None = None,
    gating: str = "topk",
    gating_config: dict[str, Any] | None = None,
    seed: int = 0,
    registry: Registry | None = None,
    inspection: Mapping[str, Any] | None = None,
) -> BankHash:
    """Create version 1 of a model: the base banked, a fresh (identity) MoE trunk, no branches.

    ``inspection``: what ``scaler inspect`` detected about the base, recorded as
    ``base.inspection`` (issue 13; ``scaler init`` passes it)."""
    validate_name(name)
    if store.get_ref(name) is not None:
        raise ConflictError(f"model {name!r} already exists in {store.root}", model=name)
    registry = registry or get_registry()
    located = locate_base(base)
    with store.lock():
        base_entry, pooling = import_base(store, located)
    if inspection is not None:
        base_entry["inspection"] = dict(inspection)
    cfg = dict(gating_config or {})
    # ``top_k`` goes to the config field a gating plugin names as its experts per token
    # (``top_k_field`` on its factory, e.g. topk's "k"); a gating without one ignores it.
    if gating in registry.names("gating"):
        k_field = getattr(registry.get("gating", gating).factory, "top_k_field", None)
        if isinstance(k_field, str):
            cfg.setdefault(k_field, top_k)
    torch.manual_seed(seed)
    layers = [
        new_trunk_layer(
            hidden_size=base_entry["hidden_size"],
            num_experts=num_experts,
            expert_hidden=expert_hidden,
            gating=gating,
            gating_config=cfg,
            registry=registry,
        )
        for _ in range(moe_layers)
    ]
    trunk = Trunk(layers, pooling=pooling)
    where_from = located.source.get("package") or located.source.get("repo_id") or located.source.get("path")
    with store.lock():
        store.clean_temp(stale_only=True)  # what writers killed earlier left behind
        if store.get_ref(name) is not None:
            raise ConflictError(f"model {name!r} already exists in {store.root}", model=name)
        manifest = build_manifest(
            store,
            trunk=trunk,
            branches={},
            base_entry=BaseEntry.from_dict(base_entry),
            parent=None,
            name=name,
            version=1,
            message=f"init {name} on {where_from}",
        )
        h = store.put_manifest(manifest)
        store.set_ref(name, h, expected=None, reason="init")
    return h


__all__ = [
    "ManifestError",
    "Origin",
    "TrainedRecord",
    "compose",
    "init_model",
    "new_branch",
    "new_trunk_layer",
    "save_version",
    "trunk_id",
]
