"""``scaler plugins``: what is installed, who provides it, and what each thing accepts."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from scaler_wizard.cli.state import out, print_json


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)


def plugin_report() -> list[dict[str, Any]]:
    from scaler_wizard.plugin_manager import get_host, get_registry

    host = get_host()
    registry = get_registry()
    rows: dict[str, dict[str, Any]] = {}
    for name, plugin in host.pm.list_name_plugin():
        dist, version = host.distributions.get(name, ("unknown", "0"))
        hooks = sorted(c.name for c in host.pm.get_hookcallers(plugin) or [])
        rows[name] = {"name": name, "distribution": dist, "version": version, "hooks": hooks, "registers": []}
    for reg in registry:
        if reg.plugin in rows:
            rows[reg.plugin]["registers"].append(
                {
                    "kind": reg.kind,
                    "name": reg.name,
                    "description": reg.description,
                    "config_schema": reg.schema(),
                }
            )
    for failure in host.failures:
        dist, _, version = failure.distribution.partition(" ")  # recorded as "NAME VERSION"
        rows[failure.plugin] = {
            "name": failure.plugin,
            "distribution": dist,
            "version": version,
            "hooks": [],
            "registers": [],
            "error": failure.error,
        }
    return list(rows.values())


def plugins(
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output, with config schemas.")
    ] = False,
    hooks: Annotated[
        bool, typer.Option("--hooks", help="Also show which hooks each plugin implements.")
    ] = False,
) -> None:
    """List installed plugins (built-ins included) and what they register."""
    report = plugin_report()
    if as_json:
        print_json(report)
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("plugin")
    table.add_column("distribution")
    table.add_column("registers")
    if hooks:
        table.add_column("hooks")
    for row in report:
        regs = ", ".join(f"{r['kind']}:{r['name']}" for r in row["registers"]) or "-"
        if row.get("error"):
            regs = f"[red]failed to load: {escape(row['error'])}[/red]"
        cells = [row["name"], f"{row['distribution']} {row['version']}".strip(), regs]
        if hooks:
            cells.append(", ".join(row["hooks"]))
        table.add_row(*cells)
    out.print(table)
