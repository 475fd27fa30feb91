"""``scaler train`` (multi-task training of the trunk and branches) and ``scaler report``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from scaler_wizard.cli.state import err, open_store, out, print_json
from scaler_wizard.training.events import TrainEvents

#: settings whose option is not named after the setting
OPTION_NAMES = {"train_base_layers": "--train-new-base-layers"}


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("report")(report)


def train(
    model: Annotated[str | None, typer.Argument(help="Model name (not needed with --resume).")] = None,
    branch: Annotated[
        list[str] | None,
        typer.Option(
            "--branch",
            "-b",
            help="NAME=FILE[:TEXT_COL:LABEL_COL], repeatable. A new NAME is created (lora strategy), "
            "an existing one continues training.",
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default 1000).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Global batch, mixing every branch (default 64).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="JSON or YAML file: 'branches' and any recipe setting (see docs/training.md)."),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this folder from its last checkpoint.")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for logs and checkpoints (default STORE/runs/MODEL/train-TIME)."),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(min=1, help="Steps between checkpoints (default 500; one at the end always)."),
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Steps between evals (default steps/10).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (splits, new branches, sampling, noise).")] = None,
    allow_stale_branches: Annotated[
        bool,
        typer.Option(
            help="Train even though branches not in this run exist: they keep their banks and are marked stale "
            "(their recorded trunk no longer matches)."
        ),
    ] = False,
    base_cache: Annotated[
        bool | None, typer.Option("--base-cache/--no-base-cache", help="Cache base token states on disk.")
    ] = None,
    cache_float16: Annotated[
        bool | None, typer.Option("--cache-float16", help="Store cached base states as float16.")
    ] = None,
    train_new_base_layers: Annotated[
        bool | None,
        typer.Option(
            "--train-new-base-layers",
            help="Also train the base blocks `scaler expand add-base-layer` inserted (the rest of the base "
            "stays frozen); the version gets a new base bank.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary on stdout.")] = False,
) -> None:
    """Train the MoE trunk, gating, adapters and heads together; save a new version.

    Runs as is on one process, and under `accelerate launch` on several (see docs/training.md).
    """
    from scaler_wizard.training.config import (
        TrainConfigError,
        build_config,
        load_config_file,
        parse_branch_option,
    )
    from scaler_wizard.training.loop import (
        make_accelerator,
        plan_run,
        read_plan,
        read_result,
        start_run,
        train_run,
    )

    overrides: dict[str, Any] = {
        "steps": steps,
        "batch_size": batch_size,
        "checkpoint_every": checkpoint_every,
        "eval_every": eval_every,
        "seed": seed,
        "base_cache": base_cache,
        "cache_float16": cache_float16,
        "train_base_layers": train_new_base_layers,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    store = open_store()
    if resume is not None:
        given = [opt for opt, v in (("--branch", branch), ("--config", config), ("--run-dir", run_dir)) if v]
        given += [OPTION_NAMES.get(k, f"--{k.replace('_', '-')}") for k in overrides]
        if given or allow_stale_branches:
            raise TrainConfigError(
                f"--resume continues a run with the settings in its run.json; drop {', '.join(given) or '--allow-stale-branches'}"
            )
        previous = read_plan(resume)
        if model is not None and model != previous.model:
            raise TrainConfigError(f"{resume} is a run of model {previous.model!r}, not {model!r}")
        done = read_result(resume)
        if done is not None:
            _finished(done, as_json, already=True)
            return
    elif model is None:
        raise typer.BadParameter("give a MODEL (or --resume RUN_DIR)", param_hint="MODEL")
    acc = make_accelerator()
    if resume is None:
        fields, specs = load_config_file(config) if config else ({}, [])
        given_names = set()
        for text in branch or []:
            spec = parse_branch_option(text)
            given_names.add(spec.name)
            specs = [s for s in specs if s.name != spec.name] + [spec]
        cfg = build_config({**fields, **overrides}, where=str(config or "options"))
        assert model is not None
        plan = (
            plan_run(store, model, specs, cfg, allow_stale_branches=allow_stale_branches)
            if acc.is_main_process
            else None
        )
        path = start_run(store, plan, run_dir=run_dir, accelerator=acc)
    else:
        path = resume.resolve()
    events = _RichEvents() if acc.is_main_process and not as_json else _QuietEvents()
    try:
        with events:
            result = train_run(store, path, accelerator=acc, events=events, resume=resume is not None)
    finally:
        _shutdown(acc)
    if acc.is_main_process:
        _finished(result.to_json(), as_json)


def _shutdown(acc: Any) -> None:
    import torch.distributed as dist

    if acc.num_processes > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _finished(result: dict[str, Any], as_json: bool, *, already: bool = False) -> None:
    if as_json:
        print_json({**result, "already_finished": already})
        return
    if already:
        out.print(f"run {result['run_dir']} had already finished:", markup=False)
    table = Table(box=None, pad_edge=False, title=None)
    for col in ("branch", "", "train loss", "train acc", "eval acc", "macro-F1", "eval loss"):
        table.add_column(col, justify="left" if col in ("branch", "") else "right")
    for name, b in result["branches"].items():
        start = b.get("eval_accuracy_start")
        table.add_row(
            name,
            "new" if b.get("new") else "continued",
            _fmt(b.get("train_loss")),
            _fmt(b.get("train_accuracy")),
            (f"{_fmt(start)} -> " if start is not None else "") + _fmt(b.get("eval_accuracy")),
            _fmt(b.get("eval_macro_f1")),
            _fmt(b.get("eval_loss")),
        )
    out.print(table)
    t = result["trunk"]
    loads = t.get("expert_load") or []
    util = "  ".join(
        f"L{i} {min(row) * len(row):.2f}-{max(row) * len(row):.2f}" for i, row in enumerate(loads) if row
    )
    out.print(
        f"trunk    aux loss {_fmt(t.get('aux_loss'), '.4f')}; expert utilisation (min-max, 1 = fair) {util or '-'}\n"
        f"speed    {_fmt(t.get('tokens_per_s'), ',.0f')} tokens/s on {t.get('processes')} process(es); "
        f"peak memory {_fmt(t.get('peak_memory_mb'), ',.0f')} MB; {result['steps']} steps in {result['seconds']:.1f}s\n"
        f"saved    {result['model']} v{result['version']} {result['manifest']}\n"
        f"run      {result['run_dir']}  (plots: scaler report {result['run_dir']})",
        markup=False,
    )
    if t.get("base_layers_trained"):
        blocks = ", ".join(str(i) for i in t["base_layers_trained"])
        out.print(f"base     blocks {blocks} trained (the rest frozen): a new base bank", markup=False)
    if result.get("stale"):
        out.print(
            f"stale    {', '.join(result['stale'])} (their outputs changed; marked in the manifest)",
            markup=False,
        )
    if result.get("warnings"):
        out.print(
            f"warnings {len(result['warnings'])} (see metrics.jsonl); last: {result['warnings'][-1]['message']}",
            markup=False,
        )


class _QuietEvents(TrainEvents):
    """Warnings only (``--json``, and the processes other than the main one)."""

    def __enter__(self) -> _QuietEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def warning(self, record: dict[str, Any]) -> None:
        err.print(f"warning: {record['message']}", markup=False)


class _RichEvents(_QuietEvents):
    """A rich progress bar on stderr; messages and warnings printed above it."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=err,
        )
        self.task: Any = None

    def __enter__(self) -> _RichEvents:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def phase(self, description: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(description, total=total, info="")
        return lambda n: self.progress.advance(task, n)

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False, style="dim")

    def start(self, total_steps: int, start_step: int) -> None:
        self.task = self.progress.add_task("training", total=total_steps, completed=start_step, info="")

    def step(self, record: dict[str, Any]) -> None:
        if self.task is None:
            return
        info = (
            f"loss {record['loss']:.3f} aux {record['aux_loss']:.3f} "
            f"{record['tokens_per_s']:,.0f} tok/s {record['peak_memory_mb']:,.0f} MB"
        )
        self.progress.update(self.task, completed=record["step"], info=info)

    def evaluated(self, record: dict[str, Any]) -> None:
        accs = ", ".join(f"{n} {m['accuracy']:.3f}" for n, m in record["branches"].items())
        self.progress.console.print(f"step {record['step']}: eval accuracy {accs}", markup=False)

    def warning(self, record: dict[str, Any]) -> None:
        self.progress.console.print(f"warning: {record['message']}", markup=False, style="yellow")

    def checkpoint(self, step: int, path: Path) -> None:
        self.progress.console.print(f"step {step}: checkpoint {path}", markup=False, style="dim")


def report(
    run: Annotated[Path, typer.Argument(help="A training run folder (holds metrics.jsonl).")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where to write the PNGs (default RUN/plots).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Plot a training run: loss curves, per-branch accuracy, expert-utilisation heatmap (PNG)."""
    from scaler_wizard.training.report import render_report

    paths = render_report(run, out_dir)
    if as_json:
        print_json([str(p) for p in paths])
    else:
        for p in paths:
            out.print(str(p), markup=False)
