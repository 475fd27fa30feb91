"""``scaler report RUN_DIR``: PNG plots of a training run from its ``metrics.jsonl``.

* ``loss.png``      total, task and aux loss per step; per-branch train loss (smoothed) and eval loss
* ``accuracy.png``  per-branch train accuracy (smoothed) and eval accuracy
* ``experts.png``   expert utilisation per layer as a heatmap (step x expert; 1.0 = fair share)

Needs matplotlib (the ``[train]`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaler_wizard.errors import ScalerError
from scaler_wizard.training.monitor import METRICS_FILE, read_records


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def render_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the plots; return their paths."""
    records = read_records(run_dir / METRICS_FILE)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    warnings = [r for r in records if r.get("event") == "warning"]
    if not train:
        raise ScalerError(f"{run_dir}: no training steps logged in {METRICS_FILE}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ScalerError("scaler report needs matplotlib: pip install 'scaler-wizard[train]'") from exc
    out_dir = out_dir or run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in train]
    window = max(1, len(train) // 50)
    names = list(train[-1]["branches"])
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    ax1.plot(steps, _smooth([r["loss"] for r in train], window), label="total")
    ax1.plot(steps, _smooth([r["task_loss"] for r in train], window), label="task")
    ax1b = ax1.twinx()
    ax1b.plot(steps, _smooth([r["aux_loss"] for r in train], window), color="tab:red", alpha=0.7, label="aux")
    ax1b.set_ylabel("aux (load-balancing) loss", color="tab:red")
    for w in warnings:
        ax1.axvline(w["step"], color="tab:orange", alpha=0.3, linewidth=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title(f"losses (smoothed over {window} steps; orange: warnings)")
    ax1.legend(loc="upper right")
    for name in names:
        xs = [r["step"] for r in train if r["branches"][name]["examples"]]
        ys = [r["branches"][name]["loss"] for r in train if r["branches"][name]["examples"]]
        (line,) = ax2.plot(xs, _smooth(ys, window), label=f"{name} train")
        ev = [(r["step"], r["branches"][name]["loss"]) for r in evals if name in r["branches"]]
        if ev:
            ax2.plot(*zip(*ev, strict=True), "o--", color=line.get_color(), label=f"{name} eval")
    ax2.set_xlabel("step")
    ax2.set_ylabel("cross-entropy")
    ax2.set_title("per-branch loss")
    ax2.legend()
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        xs = [r["step"] for r in train if r["branches"][name]["examples"]]
        ys = [r["branches"][name]["accuracy"] for r in train if r["branches"][name]["examples"]]
        (line,) = ax.plot(xs, _smooth(ys, max(window, 5)), alpha=0.6, label=f"{name} train")
        ev = [(r["step"], r["branches"][name]["accuracy"]) for r in evals if name in r["branches"]]
        if ev:
            ax.plot(*zip(*ev, strict=True), "o-", color=line.get_color(), label=f"{name} eval")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title("per-branch accuracy")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "accuracy.png"))

    layers = len(train[-1]["expert_load"])
    if layers and train[-1]["expert_load"][0]:
        fig, axes = plt.subplots(layers, 1, figsize=(10, 1.2 + 1.6 * layers), squeeze=False)
        for li in range(layers):
            experts = len(train[-1]["expert_load"][li])
            grid = [[r["expert_load"][li][e] * experts for r in train] for e in range(experts)]
            im = axes[li][0].imshow(
                grid,
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                vmin=0,
                vmax=max(2.0, max(max(row) for row in grid)),
                extent=(steps[0] - 0.5, steps[-1] + 0.5, experts - 0.5, -0.5),
            )
            axes[li][0].set_ylabel(f"layer {li}\nexpert")
            fig.colorbar(im, ax=axes[li][0], label="utilisation (1 = fair share)")
        axes[-1][0].set_xlabel("step")
        axes[0][0].set_title("expert utilisation")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / "experts.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
