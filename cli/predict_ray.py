"""``scaler predict MODEL --data FILE --output FILE --engine ray``: the file run on Ray Data.

The model ref is pinned to its manifest hash here, at submit time; every actor composes
that hash from the store and refuses another (``scaler_wizard.inference.ray_engine``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from scaler_wizard.cli.state import err, open_store

#: engines ``--engine`` takes
ENGINES = ("local", "ray")


def check_engine_options(engine: str, address: str | None, actors: int | None, data: Path | None) -> None:
    """One-line usage errors for ``--engine``, ``--address`` and ``--actors``."""
    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine is one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "local" and (address is not None or actors is not None):
        raise typer.BadParameter("--address and --actors go with --engine ray")
    if engine == "ray" and data is None:
        raise typer.BadParameter("--engine ray labels a table: give --data FILE --output FILE")


def predict_on_ray(
    model: str,
    *,
    data: Path,
    output: Path | None,
    branch: list[str] | None,
    all_branches: bool,
    text_column: str,
    fmt: str | None,
    batch_size: int,
    backend: str,
    address: str | None,
    actors: int | None,
) -> None:
    """Run ``--data`` through an actor pool on Ray and write ``--output`` like the local engine."""
    from scaler_wizard.cli.predict_command import FileProgressView
    from scaler_wizard.inference.ray_engine import import_ray, pin_model, predict_file_on_ray

    if output is None:
        raise typer.BadParameter("--engine ray writes a file: give --output FILE")
    if backend != "torch":
        raise typer.BadParameter("--engine ray runs the torch backend: leave out --backend")
    store = open_store()
    name, _, have = pin_model(store, model, None)
    if all_branches:
        names: list[str] | None = None
    elif branch:
        names = list(dict.fromkeys(branch))
    elif len(have) == 1:
        names = have
    else:
        raise typer.BadParameter(
            f"name a branch with --branch B (repeatable) or use --all-branches (have: {', '.join(have)})"
        )
    import_ray()  # the install hint before anything else runs
    with FileProgressView(str(data)) as progress:
        summary = predict_file_on_ray(
            store,
            model,
            data,
            output,
            text_column=text_column,
            branches=names,
            address=address,
            actors=actors or 2,
            batch_size=batch_size,
            output_fmt=fmt,
            on_progress=progress.update,
            quiet=True,
        )
    rate = summary.rows / summary.seconds if summary.seconds > 0 else 0.0
    err.print(
        f"wrote {summary.rows:,} rows to {output} ({rate:,.0f} rows/s on Ray, {actors or 2} actors, {name})",
        markup=False,
    )
