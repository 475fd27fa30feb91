"""``scaler experts prune MODEL ...``: remove the experts routing rarely uses (docs/growth.md).

Not function-preserving: the command measures and reports each branch's accuracy before and
after (on the labelled data given with ``--eval``) and the max |delta logits|, then makes one
new version (``scaler rollback`` undoes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scaler_wizard.cli.state import open_store, out, print_json

experts_app = typer.Typer(help="Inspect and prune a model's MoE experts.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``scaler experts`` to ``app``."""
    app.add_typer(experts_app, name="experts")


@experts_app.command("prune")
def prune(
    model: Annotated[str, typer.Argument(help="Model name (its current version is pruned).")],
    min_utilization: Annotated[
        float,
        typer.Option(
            "--min-utilization",
            help="Remove experts routed less than this share of a layer's tokens (top-k: shares sum to k).",
        ),
    ],
    data: Annotated[
        Path,
        typer.Option("--data", help="Texts to measure routing on (.txt lines, or a data file's column)."),
    ],
    text_column: Annotated[str, typer.Option("--text-column", help="The text column of --data.")] = "text",
    evals: Annotated[
        list[str] | None,
        typer.Option(
            "--eval",
            help="BRANCH=FILE[:TEXT_COL:LABEL_COL], repeatable: labelled data to measure the branch's "
            "accuracy on, before and after.",
        ),
    ] = None,
    no_refit: Annotated[
        bool,
        typer.Option(
            "--no-refit",
            help="Keep the kept experts' weights as they are (by default their output projections are "
            "refit by least squares on --data's tokens to make up for the removed ones).",
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Measure and report, store nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Remove rarely routed experts (keeping at least top-k per layer); report the effect."""
    from scaler_wizard.growth.prune import prune as run_prune
    from scaler_wizard.training.config import parse_branch_option

    specs = [parse_branch_option(e) for e in evals or []]
    result = run_prune(
        open_store(),
        model,
        threshold=min_utilization,
        data=data,
        text_column=text_column,
        evals=specs,
        dry_run=dry_run,
        refit=not no_refit,
    )
    if as_json:
        print_json(result.to_json())
        return
    head = (
        f"{model}: would prune (nothing stored)"
        if result.manifest is None
        else f"pruned {model} -> v{result.version} {result.manifest}"
    )
    out.print(
        f"{head}: experts below utilization {result.threshold:g} over {result.texts} texts "
        f"({result.tokens} tokens)",
        markup=False,
    )
    for layer in result.layers:
        removed = ", ".join(f"{e} ({layer['utilization'][e]:.3f})" for e in layer["removed"]) or "none"
        out.print(
            f"  layer {layer['layer']}: {layer['experts_before']} -> {layer['experts_after']} experts; "
            f"removed {removed}",
            markup=False,
        )
    if result.refit:
        out.print(
            f"  kept experts' output projections refit by least squares on {result.refit['tokens']} "
            f"tokens of --data (--no-refit: keep them as they were)",
            markup=False,
        )
        if result.refit["skipped_layers"]:
            out.print(
                f"  note: not refit (too many unknowns for one solve): layers "
                f"{', '.join(map(str, result.refit['skipped_layers']))}",
                markup=False,
            )
    for name, delta in sorted(result.deltas.items()):
        acc = result.accuracy.get(name)
        score = (
            f"accuracy {acc['accuracy_before']:.3f} -> {acc['accuracy_after']:.3f}, "
            f"macro-F1 {acc['macro_f1_before']:.3f} -> {acc['macro_f1_after']:.3f} ({acc['rows']} rows); "
            if acc
            else "accuracy not measured (no --eval); "
        )
        out.print(f"  branch {name}: {score}max |delta logits| {delta:.3g}", markup=False)
    if result.manifest is not None:
        moved = ", ".join(result.rerecorded) or "none"
        out.print(
            f"  branches re-recorded on the new trunk {str(result.new_trunk)[:19]}: {moved}", markup=False
        )
        out.print(f"  undo: scaler rollback {model} {result.parent_version}", markup=False)
