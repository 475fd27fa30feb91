"""``scaler eval``: accuracy, macro-F1 and the confusion matrix of a branch on labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from scaler_wizard.cli.state import err, open_store, out, print_json


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)


def evaluate(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    branch: Annotated[str, typer.Option("--branch", "-b", help="Branch to evaluate.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled data: .csv, .tsv, .jsonl or .parquet.")],
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column holding the label.")] = "label",
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    backend: Annotated[
        str,
        typer.Option(
            help="torch, onnx or onnx-int8 (ONNX Runtime; graphs exported once, cached in the store)."
        ),
    ] = "torch",
) -> None:
    """Score a branch on labelled data through the whole model (base, trunk, branch)."""
    from scaler_wizard.errors import DataError
    from scaler_wizard.modeling.compose import compose
    from scaler_wizard.training.data import load_labelled
    from scaler_wizard.training.metrics import classification_metrics

    dataset = load_labelled(data, text_column=text_column, label_column=label_column, min_classes=1)
    store = open_store()
    m = compose(store, model)
    b = m.branch(branch)
    if b.head.multilabel:
        raise DataError(f"branch {branch!r} is multi-label; `scaler eval` scores single-label branches")
    unknown = sorted(set(dataset.labels) - set(b.labels))
    if unknown:
        raise DataError(
            f"{data}: labels {unknown[:5]} are not labels of branch {branch!r} ({', '.join(b.labels)})"
        )
    if backend != "torch":
        from scaler_wizard.exporting.onnx_backend import with_backend

        m = with_backend(store, m, backend, branches=[branch])  # same surface
    index = {lab: i for i, lab in enumerate(b.labels)}
    with err.status(f"predicting {len(dataset)} rows..."):
        preds = m.predict(dataset.texts, [branch], batch_size=batch_size)[branch]
    y_pred = [index[str(p.label)] for p in preds]
    metrics = classification_metrics([index[lab] for lab in dataset.labels], y_pred, b.labels)
    if as_json:
        print_json({"model": model, "branch": branch, "data": dataset.source, **metrics})
        return
    out.print(
        f"{branch} on {data.name} ({len(dataset)} rows): accuracy {metrics['accuracy']:.4f}, "
        f"macro-F1 {metrics['macro_f1']:.4f}",
        markup=False,
    )
    table = Table(title="confusion matrix (rows: true, columns: predicted)", box=None, pad_edge=False)
    table.add_column("")
    for lab in b.labels:
        table.add_column(lab, justify="right")
    table.add_column("recall", justify="right")
    for i, lab in enumerate(b.labels):
        row = metrics["confusion_matrix"][i]
        table.add_row(lab, *map(str, row), f"{metrics['per_class'][lab]['recall']:.3f}")
    out.print(table)
