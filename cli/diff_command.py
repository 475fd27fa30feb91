"""``scaler diff A B``: what changed between two versions (branches, banks, plugin configs, metrics).

A and B are anything ``scaler show`` takes (``name``, ``name@N``, a manifest hash); with B left
out, A is compared with its model's current version (``name`` alone: the parent of the current
version with the current version, as ``git show`` does).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from scaler_wizard.cli.state import open_store, out, print_json

#: branch fields compared field by field; anything else in an entry is compared under "other"
_BRANCH_KEYS = ("strategy", "adapter_bank", "head", "head_bank", "labels", "trunk", "metrics", "provenance")
_MISSING = object()


def register(app: typer.Typer) -> None:
    app.command("diff")(diff)


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """{dotted path: leaf value}; lists are leaves (labels compare as a whole)."""
    if isinstance(value, dict) and value:
        found: dict[str, Any] = {}
        for key in sorted(value):
            found.update(_leaves(value[key], f"{path}.{key}" if path else str(key)))
        return found
    return {path: value}


def changes(a: Any, b: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Leaf-level differences: ``[{path, a, b}]`` (a missing side is absent from the record);
    numbers get a ``delta``."""
    left, right = _leaves(a, prefix), _leaves(b, prefix)
    found = []
    for path in sorted(set(left) | set(right)):
        x, y = left.get(path, _MISSING), right.get(path, _MISSING)
        if x == y and type(x) is type(y):
            continue
        record: dict[str, Any] = {"path": path}
        if x is not _MISSING:
            record["a"] = x
        if y is not _MISSING:
            record["b"] = y
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y))
        if numbers:
            record["delta"] = y - x
        found.append(record)
    return found


def _banks(manifest: dict[str, Any]) -> set[str]:
    banks = {manifest["base"]["bank"], *manifest["base"].get("files", {}).values()}
    banks |= {layer["bank"] for layer in manifest["trunk"]["layers"]}
    for entry in manifest["branches"].values():
        banks |= {entry["adapter_bank"], entry["head_bank"]}
    return {str(b) for b in banks}


def _branch_summary(entry: dict[str, Any]) -> dict[str, Any]:
    metrics = entry.get("metrics") or {}
    return {
        "strategy": entry["strategy"]["plugin"],
        "head": entry["head"]["plugin"],
        "labels": len(entry["labels"]),
        "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"),
    }


def diff_manifests(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Everything that differs between two manifests, grouped as a person reads it."""
    branches_a, branches_b = a["branches"], b["branches"]
    changed: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(set(branches_a) & set(branches_b)):
        ea, eb = branches_a[name], branches_b[name]
        found = [c for key in _BRANCH_KEYS for c in changes(ea.get(key), eb.get(key), key)]
        other_a = {k: v for k, v in ea.items() if k not in _BRANCH_KEYS}
        other_b = {k: v for k, v in eb.items() if k not in _BRANCH_KEYS}
        found += changes(other_a, other_b)
        if found:
            changed[name] = found
    layers_a, layers_b = a["trunk"]["layers"], b["trunk"]["layers"]
    layers = []
    for i in range(max(len(layers_a), len(layers_b))):
        if i >= len(layers_a):
            layers.append({"layer": i, "status": "added", "bank": layers_b[i]["bank"]})
        elif i >= len(layers_b):
            layers.append({"layer": i, "status": "removed", "bank": layers_a[i]["bank"]})
        else:
            found = changes(layers_a[i], layers_b[i])
            if found:
                layers.append({"layer": i, "status": "changed", "changes": found})
    banks_a, banks_b = _banks(a), _banks(b)
    return {
        "metadata": changes(
            {k: a.get(k) for k in ("name", "version", "parent", "created", "message")},
            {k: b.get(k) for k in ("name", "version", "parent", "created", "message")},
        ),
        "base": changes(a["base"], b["base"]),
        "trunk": {
            "layers": layers,
            "other": changes(a["trunk"].get("pooling"), b["trunk"].get("pooling"), "pooling"),
        },
        "branches": {
            "added": {n: _branch_summary(branches_b[n]) for n in sorted(set(branches_b) - set(branches_a))},
            "removed": {n: _branch_summary(branches_a[n]) for n in sorted(set(branches_a) - set(branches_b))},
            "changed": changed,
            "unchanged": sorted(n for n in set(branches_a) & set(branches_b) if n not in changed),
        },
        "banks": {"added": sorted(banks_b - banks_a), "removed": sorted(banks_a - banks_b)},
    }


def _short(value: Any) -> str:
    text = str(value)
    if text.startswith("sha256:") and len(text) == 71:
        return text[:19]
    if isinstance(value, float):
        return f"{value:.4g}"
    return text if len(text) <= 60 else text[:57] + "..."


def _change_text(c: dict[str, Any]) -> str:
    if "a" not in c:
        return f"{c['path']}: + {_short(c['b'])}"
    if "b" not in c:
        return f"{c['path']}: - {_short(c['a'])}"
    delta = f" ({c['delta']:+.4g})" if "delta" in c else ""
    return f"{c['path']}: {_short(c['a'])} -> {_short(c['b'])}{delta}"


def _print(report: dict[str, Any]) -> None:
    a, b = report["a"], report["b"]
    out.print(
        f"{a['name']} v{a['version']} {_short(a['manifest'])} -> {b['name']} v{b['version']} {_short(b['manifest'])}",
        markup=False,
    )
    if a["manifest"] == b["manifest"]:
        out.print("  the same version: no differences", markup=False)
        return
    base = report["base"]
    out.print(f"  base      {'changed' if base else 'unchanged'}", markup=False)
    for c in base:
        out.print(f"              {_change_text(c)}", markup=False)
    trunk = report["trunk"]
    out.print(f"  trunk     {'changed' if trunk['layers'] or trunk['other'] else 'unchanged'}", markup=False)
    for layer in trunk["layers"]:
        if layer["status"] != "changed":
            out.print(
                f"              layer {layer['layer']} {layer['status']} ({_short(layer['bank'])})",
                markup=False,
            )
        for c in layer.get("changes", []):
            out.print(f"              layer {layer['layer']} {_change_text(c)}", markup=False)
    for c in trunk["other"]:
        out.print(f"              {_change_text(c)}", markup=False)
    br = report["branches"]
    out.print(
        f"  branches  {len(br['added'])} added, {len(br['removed'])} removed, {len(br['changed'])} changed, "
        f"{len(br['unchanged'])} unchanged",
        markup=False,
    )
    for sign, group in (("+", br["added"]), ("-", br["removed"])):
        for name, s in group.items():
            acc = f", accuracy {s['accuracy']:.4f}" if isinstance(s["accuracy"], int | float) else ""
            out.print(
                f"    {sign} {name} ({s['strategy']}, {s['head']}, {s['labels']} labels{acc})", markup=False
            )
    for name, found in br["changed"].items():
        out.print(f"    ~ {name}", markup=False)
        for c in found:
            out.print(f"        {_change_text(c)}", markup=False)
    banks = report["banks"]
    out.print(f"  banks     {len(banks['added'])} added, {len(banks['removed'])} removed", markup=False)


def diff(
    a: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    b: Annotated[
        str | None,
        typer.Argument(help="The version to compare with (default: the model's current version)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What changed from version A to version B: branches, banks, plugin configs, metrics."""
    from scaler_wizard.banks.hashing import BankHash
    from scaler_wizard.errors import ScalerError
    from scaler_wizard.versions.history import Version, resolve_version

    store = open_store()
    name_a, ha = resolve_version(store, a)
    if b is not None:
        hb = resolve_version(store, b)[1]
    else:
        hb = store.resolve(name_a)
        if "@" not in a and not a.startswith("sha256:"):  # `scaler diff demo`: parent -> current
            parent = Version.load(store, hb, validate=False).parent
            if not parent:
                raise ScalerError(f"{a} has only one version; name two to compare: scaler diff A B")
            ha = BankHash(parent)
    va = Version.load(store, ha, where=f"manifest {ha}")
    vb = Version.load(store, hb, where=f"manifest {hb}")
    report = {
        "a": {"name": va.manifest["name"], "version": va.number, "manifest": str(va.hash)},
        "b": {"name": vb.manifest["name"], "version": vb.number, "manifest": str(vb.hash)},
        **diff_manifests(va.manifest, vb.manifest),
    }
    if as_json:
        print_json(report)
    else:
        _print(report)
