"""The learning-rate schedule both ``branch add`` and ``train`` use: linear warm-up to the
base rate, then linear decay to 0 at the last step."""

from __future__ import annotations

from collections.abc import Callable

import torch


def warmup_linear_decay(warmup: int, total: int) -> Callable[[int], float]:
    """The factor on the base learning rate at ``step`` (0-based): ``(step + 1) / warmup``
    during the ``warmup`` steps, then ``(total - step) / (total - warmup)``, never below 0.

    A plain function (not a callable object), so ``LambdaLR.state_dict`` stores nothing for
    it and a checkpointed scheduler restores from its step alone."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def warmup_linear_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping every parameter group along :func:`warmup_linear_decay`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(warmup, total))
