"""``scaler expand OPERATOR MODEL ...``: grow the trunk without changing what the model computes.

Each operator makes one new version, after checking on every branch that max |delta logits|
over a probe set is at most 1e-5 (refusing, with nothing stored, otherwise). See docs/growth.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from scaler_wizard.cli.state import open_store, out, print_json

expand_app = typer.Typer(
    help="Grow a model (more experts, a new MoE layer, wider experts, a deeper base), proven function-preserving.",
    no_args_is_help=True,
)

_Model = Annotated[str, typer.Argument(help="Model name (its current version is expanded).")]
_Probe = Annotated[
    Path | None,
    typer.Option("--probe", help="Probe texts, one per line (default: the built-in fingerprint probe set)."),
]
_Seed = Annotated[int, typer.Option("--seed", help="Seed for the new weights.")]
_DryRun = Annotated[bool, typer.Option("--dry-run", help="Measure the delta, store nothing.")]
_Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def register(app: typer.Typer) -> None:
    """Add ``scaler expand`` to ``app``."""
    app.add_typer(expand_app, name="expand")


def _run(model: str, op: Any, probe: Path | None, dry_run: bool, as_json: bool) -> None:
    from scaler_wizard.growth.expand import expand, read_probe_file

    store = open_store()
    texts = read_probe_file(probe) if probe is not None else None
    result = expand(store, model, op, probe_texts=texts, dry_run=dry_run)
    if as_json:
        print_json(result.to_json())
        return
    args = ", ".join(f"{k} {v}" for k, v in result.arguments.items() if v is not None)
    per = ", ".join(f"{n} {d:.2e}" for n, d in sorted(result.deltas.items()))
    check = (
        f"max |delta logits| {result.max_delta:.2e} <= {result.tolerance:.0e} over {result.probes} probe "
        f"texts ({per})"
    )
    if result.manifest is None:
        out.print(
            f"{model}: {result.operator} ({args}) would preserve the model: {check}; nothing stored",
            markup=False,
        )
        return
    out.print(
        f"expanded {model}: {result.operator} ({args}) -> v{result.version} {result.manifest}", markup=False
    )
    out.print(f"  {check}", markup=False)
    for d in result.details:
        out.print(
            f"  layer {d['layer']}: {d['experts_before']} -> {d['experts_after']} experts, "
            f"new experts' logit {d['new_logit']:.2f} (never chosen at inference, on any input)",
            markup=False,
        )
    moved = ", ".join(result.rerecorded) or "none"
    out.print(f"  branches re-recorded on the new trunk {str(result.new_trunk)[:19]}: {moved}", markup=False)
    out.print(f"  undo: scaler rollback {model} {result.parent_version}", markup=False)


@expand_app.command("add-experts")
def add_experts(
    model: _Model,
    count: Annotated[int, typer.Option("--count", "-n", help="Experts to add to each layer grown.")] = 1,
    layer: Annotated[
        int | None, typer.Option("--layer", help="Trunk layer index (default: every layer).")
    ] = None,
    seed: _Seed = 0,
    probe: _Probe = None,
    dry_run: _DryRun = False,
    as_json: _Json = False,
) -> None:
    """Add experts that no input is routed to until trained (gating topk or switch)."""
    from scaler_wizard.growth.operators import AddExperts

    _run(model, AddExperts(count=count, layer=layer, seed=seed), probe, dry_run, as_json)


@expand_app.command("add-layer")
def add_layer(
    model: _Model,
    at: Annotated[
        int | None, typer.Option("--at", help="Insert before this trunk layer (default: after the last).")
    ] = None,
    experts: Annotated[
        int | None, typer.Option("--experts", help="Experts (default: the neighbour's).")
    ] = None,
    expert_hidden: Annotated[
        int | None, typer.Option("--expert-hidden", help="Expert FFN width (default: the neighbour's).")
    ] = None,
    gating: Annotated[
        str | None, typer.Option("--gating", help="Gating plugin (default: the neighbour's).")
    ] = None,
    gating_config: Annotated[
        str | None, typer.Option("--gating-config", help="Gating config as JSON (default: the neighbour's).")
    ] = None,
    seed: _Seed = 0,
    probe: _Probe = None,
    dry_run: _DryRun = False,
    as_json: _Json = False,
) -> None:
    """Insert a fresh MoE layer: zero output projections, so it adds exactly 0 until trained."""
    from scaler_wizard.errors import GrowthError
    from scaler_wizard.growth.operators import AddLayer

    config = None
    if gating_config is not None:
        try:
            config = json.loads(gating_config)
        except json.JSONDecodeError as exc:
            raise GrowthError(
                f"add-layer: --gating-config is not JSON: {exc.msg}", operator="add-layer"
            ) from exc
        if not isinstance(config, dict):
            raise GrowthError("add-layer: --gating-config must be a JSON object", operator="add-layer")
    op = AddLayer(
        at=at,
        num_experts=experts,
        expert_hidden=expert_hidden,
        gating=gating,
        gating_config=config,
        seed=seed,
    )
    _run(model, op, probe, dry_run, as_json)


@expand_app.command("widen")
def widen(
    model: _Model,
    hidden: Annotated[int, typer.Option("--hidden", help="The experts' new FFN hidden size.")],
    layer: Annotated[
        int | None, typer.Option("--layer", help="Trunk layer index (default: every layer).")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="duplicate (Net2Net: copy units, split their outgoing weights) or zero (new units output 0).",
        ),
    ] = "duplicate",
    seed: _Seed = 0,
    probe: _Probe = None,
    dry_run: _DryRun = False,
    as_json: _Json = False,
) -> None:
    """Widen the experts' FFN hidden size."""
    from scaler_wizard.growth.operators import Widen

    _run(model, Widen(hidden=hidden, layer=layer, method=method, seed=seed), probe, dry_run, as_json)


@expand_app.command("add-base-layer")
def add_base_layer(
    model: _Model,
    at: Annotated[
        int | None,
        typer.Option("--at", help="Insert before this base block (default: on top, after the last)."),
    ] = None,
    probe: _Probe = None,
    dry_run: _DryRun = False,
    as_json: _Json = False,
) -> None:
    """Grow the base in depth: a copy of a neighbouring block with its output projections zeroed
    (LLaMA-Pro), as a new base bank. Pre-LN bases only (a post-LN block is never the identity)."""
    from scaler_wizard.growth.base_grow import add_base_layer as grow_base
    from scaler_wizard.growth.expand import read_probe_file

    store = open_store()
    texts = read_probe_file(probe) if probe is not None else None
    result = grow_base(store, model, at=at, probe_texts=texts, dry_run=dry_run)
    if as_json:
        print_json(result.to_json())
        return
    d = result.details[0]
    per = ", ".join(f"{n} {v:.2e}" for n, v in sorted(result.deltas.items()))
    check = (
        f"max |delta logits| {result.max_delta:.2e} <= {result.tolerance:.0e} over {result.probes} probe "
        f"texts ({per})"
    )
    what = (
        f"block {d['at']} = copy of block {d['copied_from']} with {', '.join(d['zeroed'])} zeroed, "
        f"{d['layers'][0]} -> {d['layers'][1]} blocks"
    )
    if result.manifest is None:
        out.print(
            f"{model}: add-base-layer ({what}) would preserve the model: {check}; nothing stored",
            markup=False,
        )
        return
    out.print(f"expanded {model}: add-base-layer -> v{result.version} {result.manifest}", markup=False)
    out.print(f"  {what}; the new block adds max {d['identity_delta']:.2e} to its input", markup=False)
    out.print(f"  {check}", markup=False)
    moved = ", ".join(result.rerecorded) or "none"
    out.print(f"  branches re-recorded on the new trunk {str(result.new_trunk)[:19]}: {moved}", markup=False)
    out.print(f"  undo: scaler rollback {model} {result.parent_version}", markup=False)
