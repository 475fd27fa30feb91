"""Command ``scaler expert-usage MODEL [TEXT...]``: each trunk layer's gating, and how the
given texts' tokens spread over its experts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer


def expert_usage(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    texts: Annotated[
        list[str] | None,
        typer.Argument(help="Texts to route through the trunk (none: show only each layer's gating)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show each MoE layer's gating plugin and the share of tokens each expert receives."""
    import torch

    from scaler_wizard import ContentStore, compose

    # Global options (`scaler --store PATH ...`) belong to the root command's context.
    store = ContentStore.open(ctx.find_root().params.get("store"))
    composed = compose(store, model)
    loads: list[list[float]] = []
    if texts:
        batch = composed.base.tokenize(list(texts), composed.device)
        with torch.inference_mode():
            trunk = composed.encode(**batch)
        loads = [[round(v, 4) for v in layer_stats.load.tolist()] for layer_stats in trunk.stats]
    rows: list[dict[str, Any]] = []
    for i, layer in enumerate(composed.trunk.layers):
        ref = layer.gating_ref.to_dict()  # the manifest's plugin_ref (a typed PluginRef)
        rows.append(
            {
                "layer": i,
                "gating": ref["plugin"],
                "config": ref["config"],
                "provider": ref["provider"],
                "num_experts": layer.num_experts,
                "load": loads[i] if loads else None,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        provider = f"{row['provider']['distribution']} {row['provider']['version']}"
        typer.echo(
            f"layer {row['layer']}: {row['gating']} {json.dumps(row['config'])} "
            f"({provider}), {row['num_experts']} experts"
        )
        if row["load"] is not None:
            shares = " ".join(f"{v:.2f}" for v in row["load"])
            typer.echo(f"  share of tokens per expert: {shares}")
