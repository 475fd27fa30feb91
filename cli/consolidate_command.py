"""``scaler consolidate MODEL --run RUN_DIR``: a training run's last checkpoints averaged (mean or
EMA) into banks, committed as one version under the store lock (docs/growth.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scaler_wizard.cli.state import open_store, out, print_json


def register(app: typer.Typer) -> None:
    """Add ``scaler consolidate`` to ``app``."""
    app.command("consolidate")(consolidate)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def consolidate(
    model: Annotated[str, typer.Argument(help="Model name.")],
    run: Annotated[
        Path, typer.Option("--run", help="A `scaler train` run folder (STORE/runs/MODEL/train-*).")
    ],
    last: Annotated[
        int | None, typer.Option("--last", help="Average the last N checkpoints (default: every one kept).")
    ] = None,
    ema: Annotated[
        float | None,
        typer.Option("--ema", help="Exponential moving average with this decay (default: the plain mean)."),
    ] = None,
    run_eval: Annotated[
        bool,
        typer.Option(
            "--eval/--no-eval", help="Evaluate on the run's eval split (consolidated vs last checkpoint)."
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Average a run's last checkpoints into banks (optimizer state dropped); one new version."""
    from scaler_wizard.growth.consolidate import consolidate as run_consolidate

    result = run_consolidate(open_store(), model, run, last=last, ema=ema, run_eval=run_eval)
    if as_json:
        print_json(result.to_json())
        return
    how = "mean" if result.ema is None else f"EMA (decay {result.ema:g})"
    out.print(
        f"consolidated {model}: {how} of checkpoints at steps {', '.join(map(str, result.steps))} "
        f"-> v{result.version} {result.manifest}",
        markup=False,
    )
    out.print(
        f"  checkpoints {_mb(result.checkpoint_bytes)} (weights {_mb(result.checkpoint_model_bytes)}, the rest "
        f"optimizer and RNG state) -> banks {_mb(result.bank_bytes)}",
        markup=False,
    )
    for name, e in sorted(result.eval.items()):
        out.print(
            f"  branch {name}: accuracy {e['accuracy']:.3f} (last checkpoint {e['accuracy_last']:.3f}), "
            f"macro-F1 {e['macro_f1']:.3f} ({e['macro_f1_last']:.3f}) on {e['rows']} eval rows",
            markup=False,
        )
    out.print(
        f"  parent: v{result.parent_version} (the run's {result.parent_is}); undo: scaler rollback {model} {result.parent_version}",
        markup=False,
    )
