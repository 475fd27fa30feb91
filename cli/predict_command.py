"""``scaler predict``: one trunk pass per batch, any number of branches.

Texts come from arguments, stdin or ``--file`` (one per line), or a table from ``--data``
(CSV/TSV/JSONL/Parquet, streamed in chunks into ``--output`` or JSON Lines on stdout).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from scaler_wizard.cli.state import err, finite_json, open_store, out, print_json
from scaler_wizard.errors import ScalerError

#: extensions that ``--file`` (one text per line) refuses, pointing to ``--data``
_TABLE_EXTENSIONS = {".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".parquet", ".pq"}
#: seconds between plain progress lines when stderr is not a terminal
PLAIN_EVERY_S = 10.0


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


def _read_lines(source: str) -> list[str]:
    if source == "-":
        return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    path = Path(source)
    if path.suffix.lower() in _TABLE_EXTENSIONS:
        raise ScalerError(
            f"{path} looks like a {path.suffix.lstrip('.').upper()} table: use --data {path} "
            "--text-column COL (--file reads one text per line)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScalerError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ScalerError(f"cannot read {path}: {exc.strerror}") from exc
    return [line for line in text.splitlines() if line.strip()]


def _json_line(obj: Any) -> str:
    import json

    return json.dumps(finite_json(obj), ensure_ascii=False, allow_nan=False, default=str)


def predict(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to label; '-' or none reads lines from stdin.")
    ] = None,
    branch: Annotated[
        list[str] | None,
        typer.Option("--branch", "-b", help="Branch to run (repeatable; not needed for a one-branch model)."),
    ] = None,
    all_branches: Annotated[bool, typer.Option("--all-branches", help="Run every branch.")] = False,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read one text per line from a file.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="Label every row of a CSV/TSV/JSONL/Parquet file (streamed)."),
    ] = None,
    text_column: Annotated[
        str, typer.Option("--text-column", help="Column of --data holding the text.")
    ] = "text",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write --data rows + predictions here (.csv/.tsv/.jsonl/.parquet)."
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="Output format (csv, tsv, jsonl, parquet); default: extension."),
    ] = None,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows of --data read and written at a time.")] = 4096,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per trunk pass.")] = 32,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (one JSON array; JSON Lines with --data).")
    ] = False,
    as_jsonl: Annotated[
        bool, typer.Option("--jsonl", help="JSON Lines on stdout: one object per text.")
    ] = False,
    backend: Annotated[
        str,
        typer.Option(
            help="torch, onnx or onnx-int8 (ONNX Runtime; graphs exported once, cached in the store)."
        ),
    ] = "torch",
    engine: Annotated[
        str, typer.Option(help="local, or ray: --data on a Ray cluster (pip install 'scaler-wizard[ray]').")
    ] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address for --engine ray (default: a local instance).")
    ] = None,
    actors: Annotated[
        int | None, typer.Option(min=1, help="Ray actors for --engine ray (default 2).")
    ] = None,
) -> None:
    """Label texts with one or more branches (label + confidence)."""
    if data is not None:
        if texts or file is not None:
            raise typer.BadParameter("--data reads the texts from a table: give no texts and no --file")
        if output is None and not (as_json or as_jsonl):
            raise typer.BadParameter("--data needs --output FILE, or --jsonl for JSON Lines on stdout")
        if output is not None and (as_json or as_jsonl):
            raise typer.BadParameter("--json/--jsonl print to stdout: leave them out with --output")
    elif output is not None or fmt is not None:
        raise typer.BadParameter("--output and --format go with --data FILE")
    from scaler_wizard.cli.predict_ray import check_engine_options, predict_on_ray

    check_engine_options(engine, address, actors, data)
    if engine == "ray" and data is not None:
        predict_on_ray(
            model,
            data=data,
            output=output,
            branch=branch,
            all_branches=all_branches,
            text_column=text_column,
            fmt=fmt,
            batch_size=batch_size,
            backend=backend,
            address=address,
            actors=actors,
        )
        return
    from scaler_wizard.modeling.compose import compose

    items: list[str] = []
    if data is None:
        if file is not None:
            items += _read_lines(str(file))
        for t in texts or []:
            items += _read_lines("-") if t == "-" else [t]
        if not texts and file is None:
            if sys.stdin.isatty():
                raise typer.BadParameter("give texts as arguments, with --file, or on stdin")
            items += _read_lines("-")
    store = open_store()
    m = compose(store, model)
    if all_branches:
        names = m.branch_names
    elif branch:
        names = list(dict.fromkeys(branch))
    elif len(m.branch_names) == 1:
        names = list(m.branch_names)
    else:
        have = ", ".join(m.branch_names) or "none"
        raise typer.BadParameter(
            f"name a branch with --branch B (repeatable) or use --all-branches (have: {have})"
        )
    for n in names:
        m.branch(n)  # misspelt names fail here, listing the branches that exist
    if backend != "torch":
        from scaler_wizard.exporting.onnx_backend import with_backend

        m = with_backend(store, m, backend, branches=names)  # same surface
    if data is not None:
        _predict_data(m, data, names, text_column, output, fmt, chunk_rows, batch_size)
        return
    if not items:
        raise ScalerError("no text to predict")
    results = m.predict(items, names, batch_size=batch_size)
    rows = [
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
    if as_jsonl:
        sys.stdout.writelines(_json_line(r) + "\n" for r in rows)
        sys.stdout.flush()
        return
    if as_json:
        print_json(rows)
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


def _predict_data(
    m: Any,
    data: Path,
    names: list[str],
    text_column: str,
    output: Path | None,
    fmt: str | None,
    chunk_rows: int,
    batch_size: int,
) -> None:
    from scaler_wizard.inference.files import predict_file

    with FileProgressView(str(data)) as progress:
        summary = predict_file(
            m,
            data,
            sys.stdout if output is None else output,
            text_column=text_column,
            branches=names,
            chunk_rows=chunk_rows,
            batch_size=batch_size,
            output_fmt=fmt,
            on_progress=progress.update,
        )
    if output is not None:
        rate = summary.rows / summary.seconds if summary.seconds > 0 else 0.0
        err.print(f"wrote {summary.rows:,} rows to {output} ({rate:,.0f} rows/s)")


class FileProgressView:
    """A rich bar (rows, rate, ETA by bytes read) on a terminal; off one (a log, a pipe), a
    plain line every ``every_s`` seconds (a live bar would print nothing until the end)."""

    def __init__(self, what: str, *, console: Console | None = None, every_s: float = PLAIN_EVERY_S) -> None:
        self.what = what
        self.console = console or err
        self.plain = not self.console.is_terminal
        self.every_s = every_s
        self.last = time.monotonic()
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> FileProgressView:
        if not self.plain:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[rows]:,} rows"),
                TextColumn("{task.fields[rate]:,.0f} rows/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(f"predict {self.what}", total=None, rows=0, rate=0.0)
        return self

    def update(self, p: Any) -> None:
        """The ``on_progress`` callback of ``predict_file`` (a ``FileProgress``)."""
        rate = p.rows / p.seconds if p.seconds > 0 else 0.0
        if self.bar is not None:
            self.bar.update(
                self.task, completed=p.done_bytes, total=p.total_bytes or None, rows=p.rows, rate=rate
            )
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            share = f" ({100 * p.done_bytes / p.total_bytes:.0f}% of the file)" if p.total_bytes else ""
            self.console.print(f"predict: {p.rows:,} rows{share}, {rate:,.0f} rows/s", markup=False)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
