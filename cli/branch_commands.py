"""``scaler branch ...``: list, show, remove (``add`` trains a new one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from scaler_wizard.cli.state import err, open_store, out, print_json
from scaler_wizard.errors import BranchNotFoundError, did_you_mean

branch_app = typer.Typer(help="Add, list, show and remove a model's branches.", no_args_is_help=True)


@branch_app.command("list")
def list_branches(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Branches of a model: strategy, classes, accuracy, size."""
    from scaler_wizard.cli.model_commands import branch_table
    from scaler_wizard.manifests.model import thaw
    from scaler_wizard.versions.history import resolve_version

    store = open_store()
    _, h = resolve_version(store, model)
    m = store.manifest(h)  # hash checked, parsed and validated (issue 10 #9)
    if as_json:
        print_json(
            [
                {
                    "name": n,
                    "strategy": e.strategy.plugin,
                    "head": e.head.plugin,
                    "labels": list(e.labels),
                    "metrics": {} if e.metrics is None else thaw(e.metrics),
                }
                for n, e in sorted(m.branches.items())
            ]
        )
        return
    if not m.branches:
        out.print(f"{model} has no branches yet (add one with `scaler branch add`)")
        return
    out.print(branch_table(store, m))


@branch_app.command("show")
def show_branch(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    branch: Annotated[str, typer.Argument(help="Branch name.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Everything the manifest says about one branch."""
    from scaler_wizard.manifests.model import thaw
    from scaler_wizard.versions.history import resolve_version

    store = open_store()
    _, h = resolve_version(store, model)
    m = store.manifest(h)  # hash checked, parsed and validated (issue 10 #9)
    entry = m.branches.get(branch)
    if entry is None:
        raise BranchNotFoundError(
            f"model {model!r} has no branch {branch!r} {did_you_mean(branch, set(m.branches))}",
            branch=branch,
            model=model,
            available=m.branches,
        )
    if as_json:
        print_json({"name": branch, **entry.to_dict()})
        return
    strategy, head = entry.strategy, entry.head
    out.print(f"[bold]{branch}[/bold] in {model} v{m.version}")
    out.print(
        f"  strategy  {strategy.plugin} {strategy.config_dict()}  ({strategy.provider.distribution} {strategy.provider.version})"
    )
    out.print(f"  head      {head.plugin} {head.config_dict()}")
    out.print(f"  labels    {', '.join(entry.labels)}")
    out.print(f"  banks     adapter {entry.adapter_bank}\n            head    {entry.head_bank}")
    provenance = thaw(entry.provenance or {})
    _print_metrics(thaw(entry.metrics or {}), provenance)
    stale = provenance.get("stale")
    if stale:
        out.print(f"  [yellow]stale[/yellow]     trained on another trunk ({stale})", markup=True)
    fp = entry.fingerprint
    if fp:
        out.print(
            f"  fingerprint {fp.get('sha256', '')} on probe set {fp.get('probe_set', '')}", markup=False
        )


def _print_metrics(metrics: dict[str, Any], prov: dict[str, Any]) -> None:
    """Held-out metrics and provenance for people (``--json`` has everything)."""
    from rich.table import Table

    if "accuracy" in metrics:
        split = (prov.get("eval") or {}).get("split") or (prov.get("eval") or {}).get("file", "")
        out.print(
            f"  eval      accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics.get('macro_f1', 0):.4f} "
            f"on {metrics.get('eval_rows', '?')} held-out rows ({split})",
            markup=False,
        )
    data, train = prov.get("data") or {}, prov.get("training") or {}
    if data:
        out.print(
            f"  data      {data.get('file')} {data.get('sha256', '')[:19]}… {data.get('rows')} rows",
            markup=False,
        )
    if train:
        out.print(
            f"  trained   {train.get('steps')} steps, {train.get('epochs_run', '?')} epochs (best {train.get('best_epoch', '?')}), "
            f"seed {train.get('seed')}, {train.get('seconds', '?')} s",
            markup=False,
        )
    per_class = metrics.get("per_class") or {}
    if per_class:
        table = Table(box=None, pad_edge=False, padding=(0, 1))
        for col in ("  class", "precision", "recall", "f1", "support"):
            table.add_column(col, justify="left" if col == "  class" else "right")
        for label, m in per_class.items():
            table.add_row(
                f"  {label}",
                f"{m['precision']:.3f}",
                f"{m['recall']:.3f}",
                f"{m['f1']:.3f}",
                str(m["support"]),
            )
        out.print(table)


@branch_app.command("remove")
def remove_branch(
    model: Annotated[str, typer.Argument(help="Model name.")],
    branch: Annotated[str, typer.Argument(help="Branch to remove.")],
) -> None:
    """Remove a branch: a new version without it (its banks stay reachable from history)."""
    from scaler_wizard.modeling.compose import compose, save_version

    store = open_store()
    m = compose(store, model)
    m.remove_branch(branch)
    h = save_version(store, m, message=f"remove branch {branch}")
    out.print(f"removed {branch}: {model} v{store.manifest(h).version} {h}")  # may be rebased


def _json_config(raw: str | None, option: str, **overrides: Any) -> dict[str, Any] | None:
    """A plugin config given on the command line; the plugin's schema validates it later."""
    try:
        config = {} if raw is None else json.loads(raw)
    except ValueError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None
    if not isinstance(config, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=option)
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config or None


def _kept_text(training: Any) -> str:
    """Which epoch's weights were saved, and why (issue 12: the live lines say the same)."""
    if training.kept == "last":
        why = training.early_stop_note.removeprefix("early stopping off: ")
        text = f"epoch {training.epochs_run}, the last: {why}"
    else:
        text = f"epoch {training.best_epoch} (best eval macro-F1)"
        if training.early_stop_note:
            text += f"; {training.early_stop_note}"
        elif training.stopped_early:
            text += f"; stopped early at epoch {training.epochs_run}"
    if training.class_weights:
        text += f"; class-balanced loss, weights {training.class_weights}"
    if training.label_smoothing:
        text += f"; label smoothing {training.label_smoothing:g}"
    return text


@branch_app.command("add")
def add(
    model: Annotated[str, typer.Argument(help="Model name.")],
    branch: Annotated[str, typer.Argument(help="Name of the new branch.")],
    data: Annotated[
        Path, typer.Option("--data", help="Labelled training data: .csv, .tsv, .jsonl or .parquet.")
    ],
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column holding the label.")] = "label",
    eval_data: Annotated[Path | None, typer.Option(help="Separate evaluation file (same columns).")] = None,
    eval_split: Annotated[
        float, typer.Option(help="Fraction held out for evaluation when no --eval-data.")
    ] = 0.1,
    strategy: Annotated[
        str,
        typer.Option(
            help="Branch strategy plugin: attn-mix (attention pooling + MLP over a learned mix of "
            "the encoder's last 3 layers, cached), attn-mlp (the same over the last layer only), "
            "lora (linear on the pooled output), peft-lora (inside the encoder)."
        ),
    ] = "attn-mix",
    rank: Annotated[int | None, typer.Option(help="Adapter rank (strategies that take one).")] = None,
    head: Annotated[str, typer.Option(help="Head plugin.")] = "linear",
    strategy_config: Annotated[
        str | None,
        typer.Option(
            help="Strategy config as a JSON object, e.g. '{\"alpha\": 32}' (see `scaler plugins --json`)."
        ),
    ] = None,
    head_config: Annotated[str | None, typer.Option(help="Head config as a JSON object.")] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Maximum epochs (default 20; 40 on small data, where the eval split is under 50 rows; "
            "3 for peft-lora); early stopping may end sooner.",
        ),
    ] = None,
    keep: Annotated[
        str | None,
        typer.Option(
            help="Which epoch to save: 'last' (default: the end of the schedule, no early stopping) or "
            "'best' (the best eval macro-F1, with early stopping). Always 'last' when the eval split "
            "has fewer than 50 rows.",
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Early stopping: epochs without a better eval macro-F1 before stopping (default 8 "
            "with --keep best; giving it implies --keep best).",
        ),
    ] = None,
    no_early_stop: Annotated[
        bool,
        typer.Option(
            "--no-early-stop",
            help="With --keep best: run every epoch (the best eval epoch is still the one saved).",
        ),
    ] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many optimizer steps.")] = None,
    label_smoothing: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Label smoothing of the cross-entropy, single-label heads (default 0.1; 0 on small "
            "data, where the eval split is under 50 rows).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Rows a step (default 64; on small data fewer, at least 8, so an epoch is >= 8 steps).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, init and shuffling.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
) -> None:
    """Train a new branch on labelled data and register it; existing branches are untouched."""
    strategy_options = _json_config(strategy_config, "--strategy-config", rank=rank)
    head_options = _json_config(head_config, "--head-config")
    # -- progress (item 16): plain lines off a terminal, see cli/branch_progress.py --
    from scaler_wizard.cli.branch_progress import BranchProgress
    from scaler_wizard.training.branch_add import DataSpec, add_branch
    from scaler_wizard.training.branch_fit import BranchTrainingConfig

    store = open_store()
    cfg = BranchTrainingConfig(
        epochs=epochs,
        max_steps=steps,
        batch_size=batch_size,
        seed=seed,
        patience=patience,
        early_stop=False if no_early_stop else None,
        keep=keep,
        label_smoothing=label_smoothing,
    )
    progress = BranchProgress(err)
    # -- end progress --

    try:
        result = add_branch(
            store,
            model,
            branch,
            DataSpec(data, text_column, label_column, eval_data, eval_split),
            strategy=strategy,
            strategy_config=strategy_options,
            head_config=head_options,
            head=head,
            training=cfg,
            report=progress.report,
            progress_factory=progress.factory,
        )
    finally:
        progress.stop()
    summary = {
        "model": model,
        "branch": branch,
        "version": result.version,
        "manifest": result.manifest,
        "labels": result.labels,
        "accuracy": result.metrics["accuracy"],
        "macro_f1": result.metrics["macro_f1"],
        "steps": result.training.steps,
        "epochs": result.training.epochs_run,
        "best_epoch": result.training.best_epoch,
        "kept": result.training.kept,
        "early_stopping": result.training.early_stop_note or "on",
        "stopped_early": result.training.stopped_early,
        "class_weights": result.training.class_weights,
        "label_smoothing": result.training.label_smoothing,
        "train_seconds": round(result.training.seconds, 2),
        "feature_seconds": round(result.feature_seconds, 2),
        "features_cached": result.features_cached,
        "log_dir": str(result.log_dir),
    }
    if as_json:
        print_json(summary)
        return
    out.print(
        f"added branch {branch} to {model} (v{result.version} {result.manifest})\n"
        f"  labels   {', '.join(result.labels)}\n"
        f"  eval     accuracy {result.metrics['accuracy']:.4f}  macro-F1 {result.metrics['macro_f1']:.4f}"
        f" on {result.metrics['support']} rows\n"
        f"  trained  {result.training.steps} steps, {result.training.epochs_run} epochs (best {result.training.best_epoch})"
        f" in {result.training.seconds:.1f}s; trunk features {result.feature_seconds:.1f}s"
        f"{' (cached)' if result.features_cached else ''}\n"
        f"  saved    {_kept_text(result.training)}\n"
        f"  logs     {result.log_dir}",
        markup=False,
    )
