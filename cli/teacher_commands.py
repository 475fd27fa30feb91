"""``scaler teacher ...``: add a frozen teacher's feature banks to a model, list a model's teachers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scaler_wizard.cli.state import err, open_store, out, print_json

teacher_app = typer.Typer(
    help="Frozen teachers: run one once over texts and keep its features as feature banks.",
    no_args_is_help=True,
)


def _parse_layers(raw: str) -> list[int]:
    try:
        layers = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{raw!r} is not a comma-separated list of layer numbers", param_hint="--layers"
        ) from None
    if not layers:
        raise typer.BadParameter("give at least one layer", param_hint="--layers")
    return layers


@teacher_app.command("add")
def add(
    model: Annotated[str, typer.Argument(help="Model name.")],
    name: Annotated[str, typer.Argument(help="Name of the teacher in the model.")],
    teacher_model: Annotated[
        str,
        typer.Option(
            "--model",
            help="The teacher: a local transformers encoder folder with safetensors weights, an installed "
            "model package, or a Hub repo id (read from the Hub cache; HF_HUB_OFFLINE is respected).",
        ),
    ],
    layers: Annotated[
        str,
        typer.Option(help="Hidden-state layers to keep, e.g. 6,12 (0 = embeddings, -1 = the last)."),
    ],
    data: Annotated[
        list[Path], typer.Option("--data", help="Text file(s): .csv, .tsv, .jsonl or .parquet; repeatable.")
    ],
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    pooling: Annotated[
        str | None,
        typer.Option(help="mean or cls (default: the teacher's own sentence pooling, else mean)."),
    ] = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Keep the features as float16 (half the bytes).")
    ] = False,
    max_length: Annotated[
        int | None, typer.Option(min=1, help="Tokens per text (default: the teacher's).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    shard_rows: Annotated[
        int,
        typer.Option(
            min=1, help="Rows per feature bank (a killed run resumes at its first unfinished shard)."
        ),
    ] = 16384,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when there is one).")] = None,
    replace: Annotated[
        bool,
        typer.Option("--replace", help="Replace a teacher of that name (its banks are recomputed as asked)."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
) -> None:
    """Run a frozen teacher once over the texts and record its features at LAYERS as feature banks."""
    from scaler_wizard.cli.branch_progress import BranchProgress
    from scaler_wizard.distillation.teacher_add import TeacherRequest, add_teacher

    request = TeacherRequest(
        model=teacher_model,
        layers=_parse_layers(layers),
        data=data,
        text_column=text_column,
        pooling=pooling,
        max_length=max_length,
        fp16=fp16,
        shard_rows=shard_rows,
        batch_size=batch_size,
        device=device,
    )
    store = open_store()
    progress = BranchProgress(err)
    try:
        result = add_teacher(
            store,
            model,
            name,
            request,
            replace=replace,
            progress_factory=progress.factory,
            report=lambda line: err.print(line, markup=False),
        )
    finally:
        progress.stop()
    if as_json:
        print_json(result.summary())
        return
    entry = result.entry
    if result.unchanged:
        out.print(f"teacher {name} unchanged in {model} (v{result.version} {result.manifest})", markup=False)
        return
    passes = (
        "no teacher pass: every feature bank reused"
        if result.reused
        else f"teacher ran over {result.computed_rows} rows ({result.computed_shards} shards"
        f"{f', {result.reused_shards} reused' if result.reused_shards else ''}) in {result.seconds:.1f}s"
    )
    out.print(
        f"added teacher {name} to {model} (v{result.version} {result.manifest})\n"
        f"  teacher  {entry.architecture} {entry.hidden_size}-d, {entry.num_layers} layers, id {entry.id[:19]}…\n"
        f"  layers   {', '.join(map(str, entry.layers))} ({entry.pooling} pooling, max length {entry.max_length}, {entry.dtype})\n"
        f"  data     {entry.data.rows} texts, data hash {entry.data.texts[:19]}…\n"
        f"  banks    {sum(len(f.banks) for f in entry.features)} ({passes})",
        markup=False,
    )


@teacher_app.command("list")
def list_teachers(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-check every feature bank and texts object.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A model's teachers: source, layers, pooling, rows, dtype, bytes."""
    from scaler_wizard.distillation.teacher_add import list_teachers as rows_of
    from scaler_wizard.versions.history import resolve_version

    store = open_store()
    _, h = resolve_version(store, model)
    rows = rows_of(store, store.manifest(h), verify=verify)
    damaged = any(row.get("ok") is False for row in rows)
    if as_json:
        print_json(rows)
        if damaged:
            raise typer.Exit(1)
        return
    if not rows:
        out.print(f"{model} has no teachers (add one with `scaler teacher add`)", markup=False)
        return
    for row in rows:
        source = row["source"]
        where = source.get("path") or source.get("package") or source.get("repo_id")
        status = "" if "ok" not in row else ("  ok" if row["ok"] else f"  DAMAGED: {row['problem']}")
        out.print(
            f"{row['name']}  {row['architecture']} {row['hidden_size']}-d from {where}  layers "
            f"{','.join(map(str, row['layers']))}  {row['pooling']}  {row['rows']} rows  {row['dtype']}  "
            f"{row['shards']} shard(s)  {row['bytes'] / 1e6:.1f} MB{status}",
            markup=False,
        )
    if damaged:
        raise typer.Exit(1)
