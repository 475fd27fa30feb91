"""Re-hash everything a version names, ignoring the verification cache."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.safetensors_bank import read_bank_metadata
from scaler_wizard.errors import IntegrityError, ScalerError
from scaler_wizard.manifests.facts import banks_of, branch_trunk_problem, trunk_ids
from scaler_wizard.manifests.model import Manifest, PluginRef
from scaler_wizard.modeling.bank_checks import check_bank_metadata, expected_metadata
from scaler_wizard.modeling.bank_loading import call_factory, check_fit, meta_probe, moe_layer
from scaler_wizard.modeling.tensor_banks import load_bank_tensors


@dataclass
class Check:
    what: str  # e.g. "branches.spam.adapter_bank"
    bank: str
    ok: bool
    detail: str = ""
    size: int = 0


def verify_version(
    store: ContentStore, h: str, *, trust_cache: bool = False, load_base: bool = False
) -> list[Check]:
    """One Check per manifest and bank; never raises for a bad bank, only reports it.

    Besides each bank's hash and kind: what each bank's metadata says it was written for
    (plugin, config, labels, branch, layer) against its entry, whether its tensors fit the
    module its entry builds, and whether each branch's recorded trunk is this trunk.
    ``load_base`` also loads the base as compose would (about a second): its weights must
    match its config.json exactly.
    """
    with store.deferred_cache_writes():  # one cache write for the whole model, not one per bank
        checks = _verify_version(store, h, trust_cache=trust_cache)
        if load_base and all(c.ok for c in checks if c.what == "manifest" or c.what.startswith("base.")):
            checks += _base_check(store, h)
        return checks


def _base_check(store: ContentStore, h: str) -> list[Check]:
    from scaler_wizard.modeling.base_encoder import load_base

    entry = store.manifest(h).base
    try:
        load_base(store, entry.to_dict())
    except ScalerError as exc:
        return [Check("base.bank", entry.bank, False, _strip_field(str(exc), "base.bank"))]
    return []


def _verify_version(store: ContentStore, h: str, *, trust_cache: bool) -> list[Check]:
    bh = BankHash(h)
    checks: list[Check] = []
    try:
        manifest = store.manifest(bh, where=f"manifest {bh.short}")
        checks.append(Check("manifest", str(bh), True))
    except ScalerError as exc:
        return [Check("manifest", str(bh), False, str(exc))]
    described = {field: meta for field, _bank, _kind, meta in expected_metadata(manifest)}
    registry = None
    try:
        from scaler_wizard.plugin_manager import get_registry

        registry = get_registry()
    except ScalerError as exc:  # a broken plugin set: hashes are still checked
        checks.append(Check("plugins", "", False, str(exc)))
    for field, bank, kind in banks_of(manifest):
        try:
            path = store.verified_path(bank, trust_cache=trust_cache)
            tree = store.read_tree(bank) if kind == "adapter" else None
            if tree is not None:  # a folder bank: its listing, then every file it names
                if tree.get("kind") != kind:
                    raise ScalerError(f"is a {tree.get('kind')!r} folder bank, expected {kind!r}")
                checks.append(Check(field, bank, True, size=path.stat().st_size))
                members_ok = True
                member_paths: dict[str, Path] = {}
                for rel, member in sorted(tree["files"].items()):
                    try:
                        mpath = store.verified_path(member, trust_cache=trust_cache)
                        member_paths[rel] = mpath
                        checks.append(Check(f"{field}[{rel}]", member, True, size=mpath.stat().st_size))
                    except ScalerError as exc:
                        members_ok = False
                        checks.append(Check(f"{field}[{rel}]", member, False, str(exc)))
                if members_ok:  # what the branch's strategy checks in its folder (peft-lora: allow-lists)
                    checks += _folder_problems(manifest, field, bank, tree, member_paths, registry)
                continue
            if kind is not None:
                meta = read_bank_metadata(path, name=bank)
                if meta.get("scaler.kind") != kind:
                    raise ScalerError(f"is a {meta.get('scaler.kind')!r} bank, expected {kind!r}")
                if field in described:  # what the bank says it is must be what the entry says
                    check_bank_metadata(meta, described[field], bank=bank, where=field)
                    fit = (
                        None
                        if kind == "base"
                        else load_check(manifest, field, path, bank=bank, registry=registry)
                    )
                    if fit:
                        raise ScalerError(fit)
            checks.append(Check(field, bank, True, size=path.stat().st_size))
        except ScalerError as exc:
            checks.append(Check(field, bank, False, _strip_field(str(exc), field)))
    return checks + _trunk_checks(manifest)


def _strip_field(message: str, field: str) -> str:
    """Check.what already names the field: do not say it twice."""
    return message.removeprefix(f"{field}: ")


def _trunk_checks(manifest: Manifest) -> list[Check]:
    """A failed Check for each branch recorded on another trunk than this manifest's."""
    ids = trunk_ids(manifest)
    out = []
    for name, entry in sorted(manifest.branches.items()):
        problem = branch_trunk_problem(manifest, name, ids=ids)
        if problem is not None:
            out.append(Check(f"branches.{name}.trunk", entry.trunk or "", False, problem))
    return out


def load_check(manifest: Manifest, field: str, path: Any, *, bank: str, registry: Any = None) -> str | None:
    """Why a trunk-layer, adapter or head bank would not load into the module its entry
    builds (missing or extra tensor, wrong shape, non-float dtype), or None.

    The module is built on the meta device (no memory). A bank whose plugin is not installed
    here is not load-checked (``compose`` says which package to install).
    """
    from scaler_wizard.plugin_manager import get_registry

    registry = registry or get_registry()
    hidden = manifest.base.hidden_size

    def resolve(kind: str, ref: PluginRef, where: str) -> tuple[Any, Any] | None:
        if ref.plugin not in registry.names(kind):
            return None
        reg = registry.get(kind, ref.plugin)
        cfg, _ = reg.build_config(ref.config_dict(), where=f"{where}.config")
        return reg.factory, cfg

    build: Any
    if field.startswith("trunk.layers["):
        i = int(field[len("trunk.layers[") : field.index("]")])
        spec = manifest.trunk.layers[i]
        got = resolve("gating", spec.gating, f"trunk.layers[{i}].gating")
        if got is None:
            return None
        build = functools.partial(
            moe_layer, *got, spec.to_dict(), hidden_size=hidden, where=f"trunk.layers[{i}]"
        )
    else:
        name = field.split(".")[1]
        entry = manifest.branches[name]
        strategy = resolve("strategy", entry.strategy, f"branches.{name}.strategy")
        if strategy is None:
            return None
        adapter = meta_probe(
            functools.partial(call_factory, *strategy, f"branches.{name}.strategy", hidden_size=hidden)
        )
        if adapter is None:
            return None
        if field.endswith(".adapter_bank"):
            if getattr(adapter, "bank_format", "safetensors") == "folder":
                return None  # a folder bank: checked by its strategy (_folder_problems)
            build = lambda: adapter  # noqa: E731
        else:
            head = resolve("head", entry.head, f"branches.{name}.head")
            if head is None:
                return None
            build = functools.partial(
                call_factory,
                *head,
                f"branches.{name}.head",
                in_features=adapter.out_features,
                labels=list(entry.labels),
            )
    probe = meta_probe(build)
    if probe is None:
        return None
    try:
        check_fit(probe.state_dict(), load_bank_tensors(path, name=bank), bank=bank, where=field)
    except ScalerError as exc:
        return str(exc)
    return None


def _folder_problems(
    manifest: Manifest,
    field: str,
    bank: str,
    tree: dict[str, Any],
    files: dict[str, Path],
    registry: Any,
) -> list[Check]:
    """A failed Check if the branch's strategy would refuse its folder bank: a folder of
    another layout, or what its ``BranchAdapter.check_folder`` refuses (for ``peft-lora``:
    members other than the PEFT pair, a config that could touch the base)."""
    prefix, suffix = "branches.", ".adapter_bank"
    name = field[len(prefix) : -len(suffix)]
    entry = manifest.branches.get(name) if field.startswith(prefix) and field.endswith(suffix) else None
    ref = entry.strategy if entry else None
    if registry is None or ref is None or ref.plugin not in registry.names("strategy"):
        return []  # a strategy not installed here: compose says what to install
    try:
        reg = registry.get("strategy", ref.plugin)
        cfg, _ = reg.build_config(ref.config_dict(), where=f"branches.{name}.strategy.config")
        hidden = manifest.base.hidden_size
        adapter = meta_probe(
            functools.partial(call_factory, reg.factory, cfg, f"branches.{name}.strategy", hidden_size=hidden)
        )
    except ScalerError:
        return []  # a config the strategy refuses: the head bank's load check reports it
    if adapter is None:
        return []
    try:
        layout = getattr(adapter, "bank_layout", "")
        folder = getattr(adapter, "bank_format", "safetensors") == "folder"
        if not folder or tree.get("layout") != layout:
            expected = f"a {layout!r} folder bank" if folder else "a safetensors bank"
            raise IntegrityError(
                f"{field}: is a {tree.get('layout')!r} folder bank, strategy {ref.plugin!r} expects {expected}"
            )
        check = getattr(adapter, "check_folder", None)
        if callable(check):
            check(files, where=field)
    except ScalerError as exc:
        return [Check(field, bank, False, _strip_field(str(exc), field))]
    return []


def verify_fingerprints(store: ContentStore, h: str) -> list[Check]:
    """Recompute each branch's probe-set logits and compare them with its recorded fingerprint."""
    from scaler_wizard.modeling.compose import compose
    from scaler_wizard.modeling.fingerprint import check_fingerprint, probe_logits

    model = compose(store, h)
    assert model.origin is not None
    entries = model.origin.manifest.branches
    with_fp = [n for n in model.branch_names if entries[n].fingerprint]
    logits = probe_logits(model, with_fp) if with_fp else {}
    checks = []
    for name in model.branch_names:
        recorded = entries[name].fingerprint
        if not recorded:
            checks.append(Check(f"branches.{name}.fingerprint", "", True, "no fingerprint recorded"))
            continue
        fc = check_fingerprint(name, recorded, logits[name])
        detail = "bit-identical" if fc.exact else f"max |diff| {fc.max_abs_diff:.2e}"
        stale = (entries[name].provenance or {}).get("stale")
        if stale and not fc.ok:
            # left behind on purpose (--allow-stale-branches): its outputs moved with the trunk,
            # as recorded; its banks are still hash-checked like every other
            detail = (
                f"stale since v{stale.get('since_version', '?')} (the trunk was retrained without it; "
                f"outputs differ as expected, {detail}): retrain it with scaler train MODEL -b {name}=FILE"
            )
            checks.append(
                Check(f"branches.{name}.fingerprint", str(recorded.get("sha256", "")), True, detail)
            )
            continue
        checks.append(Check(f"branches.{name}.fingerprint", str(recorded.get("sha256", "")), fc.ok, detail))
    return checks
