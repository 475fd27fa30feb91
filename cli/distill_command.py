"""``scaler distill``: train the trunk on the teachers' stored features (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from scaler_wizard.cli.state import err, open_store, out, print_json
from scaler_wizard.training.events import TrainEvents


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)


def _names(raw: str | None) -> list[str]:
    return [n.strip() for n in (raw or "").split(",") if n.strip()]


def distill(
    model: Annotated[str, typer.Argument(help="Model name.")],
    teachers: Annotated[
        str | None, typer.Option("--teachers", help="Teachers to distil (train their adapters): a,b.")
    ] = None,
    freeze_teachers: Annotated[
        str | None,
        typer.Option(
            "--freeze-teachers",
            help="Teachers already distilled that take part but keep their adapters (their banks unchanged).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 100,
    loss: Annotated[str, typer.Option(help="Feature loss: mse or cosine.")] = "mse",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate of the adapters and the router.")] = 2e-3,
    lr_trunk: Annotated[float, typer.Option(help="Learning rate of the trunk.")] = 1e-3,
    router: Annotated[str, typer.Option(help="Gating plugin routing examples over teachers.")] = "topk",
    router_config: Annotated[
        str | None,
        typer.Option(help="Router config as JSON, e.g. '{\"k\": 1}' (topk default: every teacher)."),
    ] = None,
    router_balance: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Weight of the term keeping every teacher in use on average (0: the router may "
            "give every row to one teacher).",
        ),
    ] = 1.0,
    freeze_trunk: Annotated[
        bool, typer.Option("--freeze-trunk", help="Train only the adapters and the router.")
    ] = False,
    branch: Annotated[
        list[str] | None,
        typer.Option(
            "--branch",
            "-b",
            help="NAME=FILE[:TEXT_COL:LABEL_COL], repeatable: an existing branch keeps training on its task "
            "alongside (its loss added), so it stays current on the new trunk.",
        ),
    ] = None,
    allow_stale_branches: Annotated[
        bool, typer.Option(help="Distil even though the model has branches: they are marked stale.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed (split, init, batches).")] = 0,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 50,
    resume: Annotated[
        str | None, typer.Option(help="Continue this run (a folder, or its name under STORE/runs/MODEL).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary on stdout.")] = False,
) -> None:
    """Train the trunk to reproduce its teachers' stored features (per-teacher adapters, a router)."""
    from scaler_wizard.distillation.distill import DistillConfig, distill_run, start_distill
    from scaler_wizard.distillation.distill_plan import RESULT_FILE, read_plan, resolve_run_dir
    from scaler_wizard.errors import DistillError

    store = open_store()
    if resume is not None:
        if teachers or freeze_teachers or branch:
            raise DistillError(
                "--resume continues a run with the settings in its run.json; drop --teachers/--branch"
            )
        path = resolve_run_dir(store, model, resume).resolve()
        plan = read_plan(path)
        if plan.model != model:
            raise DistillError(f"{path} is a run of model {plan.model!r}, not {model!r}", model=model)
        done = path / RESULT_FILE
        if done.is_file():
            _finished(json.loads(done.read_text(encoding="utf-8")), as_json, already=True)
            return
    else:
        if not _names(teachers):
            raise typer.BadParameter(
                "give the teachers to distil: --teachers a[,b...]", param_hint="--teachers"
            )
        try:
            extra = json.loads(router_config) if router_config else {}
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--router-config") from None
        from scaler_wizard.training.config import parse_branch_option

        specs = [parse_branch_option(text).to_json() for text in branch or []]
        cfg = DistillConfig(
            branches=specs,
            teachers=_names(teachers),
            frozen=_names(freeze_teachers),
            steps=steps,
            loss=loss,
            batch_size=batch_size,
            lr=lr,
            lr_trunk=lr_trunk,
            router=router,
            router_config=extra,
            balance_weight=router_balance,
            freeze_trunk=freeze_trunk,
            allow_stale_branches=allow_stale_branches,
            seed=seed,
            checkpoint_interval=checkpoint_every,
        )
        path = start_distill(store, model, cfg)
    events = _QuietEvents() if as_json else _PrintEvents()
    result = distill_run(store, path, events=events, resume=resume is not None)
    _finished(result.to_json(), as_json)


def _finished(result: dict[str, Any], as_json: bool, *, already: bool = False) -> None:
    if as_json:
        print_json({**result, "already_finished": already})
        return
    if already:
        out.print(f"run {result['run_dir']} had already finished:", markup=False)
    for name, t in result["teachers"].items():
        out.print(
            f"{name:<12} held-out loss {t['eval_loss_before']:.4f} -> {t['eval_loss_after']:.4f}"
            f"{_explained(t)}  router weight {t['router_weight']:.2f}{'  (frozen)' if t['frozen'] else ''}",
            markup=False,
        )
    out.print(
        f"saved    {result['model']} v{result['version']} {result['manifest']}\n"
        f"run      {result['run_dir']}  ({result['steps']} steps in {result['seconds']:.1f}s)",
        markup=False,
    )
    for name, b in (result.get("branches") or {}).get("after", {}).items():
        start = result["branches"]["before"].get(name, {}).get("accuracy")
        out.print(
            f"{name:<12} eval accuracy {start:.3f} -> {b['accuracy']:.3f}  (trained along)", markup=False
        )
    if result.get("warnings"):
        out.print(
            f"warnings {len(result['warnings'])}; last: {result['warnings'][-1]['message']}", markup=False
        )


def _explained(teacher: dict[str, Any]) -> str:
    """``  R² a -> b``: the share of the teacher's held-out feature variance its adapter explains
    (0 = predicting the mean), which a loss's fall from a random adapter's does not show."""
    before, after = teacher.get("explained_before"), teacher.get("explained_after")
    if before is None or after is None:
        return ""
    return f"  R² {before:.2f} -> {after:.2f}"


class _QuietEvents(TrainEvents):
    def warning(self, record: dict[str, Any]) -> None:
        err.print(f"warning: {record['message']}", markup=False)


class _PrintEvents(_QuietEvents):
    """Plain lines on stderr: messages, every tenth step, evals, checkpoints."""

    def message(self, text: str) -> None:
        err.print(text, markup=False)

    def step(self, record: dict[str, Any]) -> None:
        if record["step"] % 10 == 0:
            per = " ".join(f"{n} {v:.4f}" for n, v in record["per_teacher_loss"].items())
            err.print(f"step {record['step']}: loss {record['loss']:.4f} ({per})", markup=False)

    def evaluated(self, record: dict[str, Any]) -> None:
        r2 = record.get("explained", {})
        per = ", ".join(
            f"{n} {v:.4f}" + (f" (R² {r2[n]:.2f})" if n in r2 else "")
            for n, v in record["per_teacher_loss"].items()
        )
        err.print(f"step {record['step']}: held-out feature loss {per}", markup=False)

    def checkpoint(self, step: int, path: Path) -> None:
        err.print(f"step {step}: checkpoint {path}", markup=False)
