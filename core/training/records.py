"""The records a ``scaler train`` run writes to its metrics log: start, train step, eval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def start_record(rows: dict[str, int], probs: Sequence[float], processes: int) -> dict[str, Any]:
    """Before step 1: each branch's training rows and sampling probability."""
    return {
        "event": "start",
        "step": 0,
        "branches": {
            name: {"train_rows": n, "sampling_p": pr}
            for (name, n), pr in zip(rows.items(), probs, strict=True)
        },
        "processes": processes,
    }


def per_branch(examples: Tensor, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Loss and accuracy of each branch's examples in a step; ``examples`` rows are
    (loss, correct, branch index)."""
    out = {}
    for k, name in enumerate(names):
        rows = examples[examples[:, 2] == k]
        out[name] = {
            "loss": float(rows[:, 0].mean()) if len(rows) else float("nan"),
            "accuracy": float(rows[:, 1].mean()) if len(rows) else float("nan"),
            "examples": len(rows),
        }
    return out


def step_record(
    step: int, stats: dict[str, Any], seconds: float, names: Sequence[str], peak_memory_mb: float
) -> dict[str, Any]:
    """A train step: losses, gradient norm, learning rates, throughput, per-branch loss and
    accuracy, and each MoE layer's expert load (shares of its token assignments)."""
    return {
        "event": "train",
        "step": step,
        "loss": stats["loss"],
        "task_loss": stats["task_loss"],
        "aux_loss": stats["aux_loss"],
        "grad_norm": stats["grad_norm"],
        "lr": stats["lr"],
        "tokens": stats["tokens"],
        "tokens_per_s": stats["tokens"] / seconds if seconds > 0 else 0.0,
        "step_seconds": seconds,
        "peak_memory_mb": peak_memory_mb,
        "branches": per_branch(stats["examples"], names),
        "expert_load": [[c / max(sum(row), 1e-12) for c in row] for row in stats["load_counts"]],
    }


def eval_record(at: int, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An evaluation: each branch's accuracy, macro-F1 and loss."""
    short = {n: {k: m[k] for k in ("accuracy", "macro_f1", "loss")} for n, m in results.items()}
    return {"event": "eval", "step": at, "branches": short}
