"""Re-hash everything a version names, ignoring the verification cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.safetensors_bank import read_bank_metadata
from scaler_wizard.errors import ScalerError
from scaler_wizard.manifests import validate_manifest


@dataclass
class Check:
    what: str  # e.g. "branches.spam.adapter_bank"
    bank: str
    ok: bool
    detail: str = ""
    size: int = 0


def banks_of(manifest: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(field, bank hash, expected kind or None for plain files) for every bank a manifest names.

    An ``adapter_bank`` may be a folder bank (a tree object): ``ContentStore.tree_members``
    lists the objects it names, which belong to the version too.
    """
    out: list[tuple[str, str, str | None]] = [("base.bank", manifest["base"]["bank"], "base")]
    out += [(f"base.files.{n}", h, None) for n, h in sorted(manifest["base"]["files"].items())]
    out += [
        (f"trunk.layers[{i}].bank", lay["bank"], "trunk-layer")
        for i, lay in enumerate(manifest["trunk"]["layers"])
    ]
    for name, entry in sorted(manifest["branches"].items()):
        out.append((f"branches.{name}.adapter_bank", entry["adapter_bank"], "adapter"))
        out.append((f"branches.{name}.head_bank", entry["head_bank"], "head"))
    return out


def verify_version(store: ContentStore, h: str, *, trust_cache: bool = False) -> list[Check]:
    """One Check per manifest and bank; never raises for a bad bank, only reports it."""
    with store.deferred_cache_writes():  # one cache write for the whole model, not one per bank
        return _verify_version(store, h, trust_cache=trust_cache)


def _verify_version(store: ContentStore, h: str, *, trust_cache: bool) -> list[Check]:
    bh = BankHash(h)
    checks: list[Check] = []
    try:
        manifest = validate_manifest(store.get_manifest(bh), where=f"manifest {bh.short}")
        checks.append(Check("manifest", str(bh), True))
    except ScalerError as exc:
        return [Check("manifest", str(bh), False, str(exc))]
    for field, bank, kind in banks_of(manifest):
        try:
            path = store.verified_path(bank, trust_cache=trust_cache)
            tree = store.read_tree(bank) if kind == "adapter" else None
            if tree is not None:  # a folder bank: its listing, then every file it names
                if tree.get("kind") != kind:
                    raise ScalerError(f"is a {tree.get('kind')!r} folder bank, expected {kind!r}")
                checks.append(Check(field, bank, True, size=path.stat().st_size))
                for rel, member in sorted(tree["files"].items()):
                    try:
                        mpath = store.verified_path(member, trust_cache=trust_cache)
                        checks.append(Check(f"{field}[{rel}]", member, True, size=mpath.stat().st_size))
                    except ScalerError as exc:
                        checks.append(Check(f"{field}[{rel}]", member, False, str(exc)))
                continue
            if kind is not None:
                meta = read_bank_metadata(path, name=bank)
                if meta.get("scaler.kind") != kind:
                    raise ScalerError(f"is a {meta.get('scaler.kind')!r} bank, expected {kind!r}")
            checks.append(Check(field, bank, True, size=path.stat().st_size))
        except ScalerError as exc:
            checks.append(Check(field, bank, False, str(exc)))
    return checks


def verify_fingerprints(store: ContentStore, h: str) -> list[Check]:
    """Recompute each branch's probe-set logits and compare them with its recorded fingerprint."""
    from scaler_wizard.compose import compose
    from scaler_wizard.fingerprint import check_fingerprint, probe_logits

    model = compose(store, h)
    assert model.origin is not None
    entries = model.origin.manifest["branches"]
    with_fp = [n for n in model.branch_names if entries[n].get("fingerprint")]
    logits = probe_logits(model, with_fp) if with_fp else {}
    checks = []
    for name in model.branch_names:
        recorded = entries[name].get("fingerprint")
        if not recorded:
            checks.append(Check(f"branches.{name}.fingerprint", "", True, "no fingerprint recorded"))
            continue
        fc = check_fingerprint(name, recorded, logits[name])
        detail = "bit-identical" if fc.exact else f"max |diff| {fc.max_abs_diff:.2e}"
        checks.append(Check(f"branches.{name}.fingerprint", str(recorded.get("sha256", "")), fc.ok, detail))
    return checks
