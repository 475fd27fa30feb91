"""``scaler predict``: one trunk pass per batch, any number of branches."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from scaler_wizard.cli.state import open_store, out, print_json
from scaler_wizard.errors import ScalerError


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


def _read_lines(source: str) -> list[str]:
    if source == "-":
        return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScalerError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ScalerError(f"cannot read {path}: {exc.strerror}") from exc
    return [line for line in text.splitlines() if line.strip()]


def predict(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to label; '-' or none reads lines from stdin.")
    ] = None,
    branch: Annotated[
        list[str] | None, typer.Option("--branch", "-b", help="Branch to run (repeatable).")
    ] = None,
    all_branches: Annotated[bool, typer.Option("--all-branches", help="Run every branch.")] = False,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read one text per line from a file.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per trunk pass.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Label texts with one or more branches (label + confidence)."""
    from scaler_wizard.modeling.compose import compose

    if not branch and not all_branches:
        raise typer.BadParameter("name a branch with --branch B (repeatable) or use --all-branches")
    items: list[str] = []
    if file is not None:
        items += _read_lines(str(file))
    for t in texts or []:
        items += _read_lines("-") if t == "-" else [t]
    if not texts and file is None:
        if sys.stdin.isatty():
            raise typer.BadParameter("give texts as arguments, with --file, or on stdin")
        items += _read_lines("-")
    if not items:
        raise ScalerError("no text to predict")
    store = open_store()
    m = compose(store, model)
    names = m.branch_names if all_branches else list(dict.fromkeys(branch or []))
    for n in names:
        m.branch(n)  # misspelt names fail here, listing the branches that exist
    results = m.predict(items, names, batch_size=batch_size)
    if as_json:
        print_json(
            [
                {
                    "text": t,
                    "predictions": {
                        n: {
                            "label": results[n][i].label,
                            "score": results[n][i].score,
                            "scores": results[n][i].scores,
                        }
                        for n in names
                    },
                }
                for i, t in enumerate(items)
            ]
        )
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("text", overflow="fold", max_width=60)
    for n in names:
        table.add_column(n)
    for i, t in enumerate(items):
        cells = []
        for n in names:
            p = results[n][i]
            label = ", ".join(p.label) if isinstance(p.label, list) else p.label
            cells.append(f"{label or '-'} ({p.score:.2f})")
        table.add_row(t, *cells)
    out.print(table)
