"""``scaler branch ...``: list, show, remove (``add`` trains a new one)."""

from __future__ import annotations

from typing import Annotated

import typer
from scaler_wizard.cli.state import open_store, out, print_json
from scaler_wizard.errors import BranchNotFoundError, did_you_mean

branch_app = typer.Typer(help="Add, list, show and remove a model's branches.", no_args_is_help=True)


@branch_app.command("list")
def list_branches(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Branches of a model: strategy, classes, accuracy, size."""
    from scaler_wizard.cli.model_commands import branch_table
    from scaler_wizard.manifests.history import resolve_version

    store = open_store()
    _, h = resolve_version(store, model)
    m = store.get_manifest(h)
    if as_json:
        print_json(
            [
                {
                    "name": n,
                    "strategy": e["strategy"]["plugin"],
                    "head": e["head"]["plugin"],
                    "labels": e["labels"],
                    "metrics": e.get("metrics", {}),
                }
                for n, e in sorted(m["branches"].items())
            ]
        )
        return
    if not m["branches"]:
        out.print(f"{model} has no branches yet (add one with `scaler branch add`)")
        return
    out.print(branch_table(store, m))


@branch_app.command("show")
def show_branch(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    branch: Annotated[str, typer.Argument(help="Branch name.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Everything the manifest says about one branch."""
    from scaler_wizard.manifests.history import resolve_version

    store = open_store()
    _, h = resolve_version(store, model)
    m = store.get_manifest(h)
    entry = m["branches"].get(branch)
    if entry is None:
        raise BranchNotFoundError(
            f"model {model!r} has no branch {branch!r} {did_you_mean(branch, set(m['branches']))}"
        )
    if as_json:
        print_json({"name": branch, **entry})
        return
    out.print(f"[bold]{branch}[/bold] in {model} v{m['version']}")
    out.print(
        f"  strategy  {entry['strategy']['plugin']} {entry['strategy']['config']}  ({entry['strategy']['provider']['distribution']} {entry['strategy']['provider']['version']})"
    )
    out.print(f"  head      {entry['head']['plugin']} {entry['head']['config']}")
    out.print(f"  labels    {', '.join(entry['labels'])}")
    out.print(f"  banks     adapter {entry['adapter_bank']}\n            head    {entry['head_bank']}")
    for key in ("metrics", "provenance"):
        if entry.get(key):
            out.print(f"  {key:<9} {entry[key]}", markup=False)


@branch_app.command("remove")
def remove_branch(
    model: Annotated[str, typer.Argument(help="Model name.")],
    branch: Annotated[str, typer.Argument(help="Branch to remove.")],
) -> None:
    """Remove a branch: a new version without it (its banks stay reachable from history)."""
    from scaler_wizard.compose import compose, save_version

    store = open_store()
    m = compose(store, model)
    m.remove_branch(branch)
    h = save_version(store, m, message=f"remove branch {branch}")
    out.print(f"removed {branch}: {model} v{m.origin.manifest['version']} {h}")
