"""``scaler export MODEL DEST --format peft``: take a model's in-encoder branches out of scaler (issue 16)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from scaler_wizard.cli.state import err, open_store, out, print_json


class ExportFormat(str, Enum):
    peft = "peft"


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""
    app.command("export")(export)


def export(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    dest: Annotated[Path, typer.Argument(help="New (or empty) folder to write the export into.")],
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", help="Export format: peft (stock PEFT adapter folders + heads)."),
    ] = ExportFormat.peft,
    branches: Annotated[
        list[str] | None,
        typer.Option(
            "--branches",
            "-b",
            help="Branches to export (repeatable or comma-separated). Default: every in-encoder branch.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Export a model's in-encoder (peft-lora) branches as stock PEFT adapters, each with its head."""
    from scaler_wizard.exporting.peft_export import export_peft

    names = [n.strip() for item in branches or () for n in item.split(",") if n.strip()]
    result = export_peft(open_store(), model, dest, branches=names or None)
    if as_json:
        print_json(
            {
                "dest": str(result.dest),
                "model": result.model,
                "manifest": result.manifest_hash,
                "format": fmt.value,
                "base": result.base,
                "trunk_is_identity": result.trunk_is_identity,
                "exported": [
                    {"branch": b.name, "strategy": b.strategy, "folder": str(b.folder)}
                    for b in result.exported
                ],
                "skipped": [
                    {"branch": s.name, "strategy": s.strategy, "reason": s.reason} for s in result.skipped
                ],
            }
        )
        return
    for b in result.exported:
        out.print(f"exported {b.name} ({b.strategy}) -> {b.folder}")
    for s in result.skipped:
        err.print(f"skipped {s.name} ({s.strategy}): {s.reason}", markup=False, highlight=False)
    if not result.trunk_is_identity:
        err.print(
            "note: the model's MoE trunk is not the identity and is not exported: "
            "the exported branches' outputs differ from scaler's (see each README.md)",
            markup=False,
            highlight=False,
        )
