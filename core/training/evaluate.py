"""Evaluation during ``scaler train``: every branch on its eval rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from scaler_wizard.branch import Branch
from scaler_wizard.modeling.base_encoder import BaseEncoder
from scaler_wizard.modeling.model import Trunk
from scaler_wizard.training.batches import BranchData
from scaler_wizard.training.metrics import classification_metrics
from scaler_wizard.training.multitask import MultiTaskModule, base_states, run_trunk


def eval_branch(
    trunk: Trunk,
    branch: Branch,
    part: BranchData,
    base: BaseEncoder,
    device: torch.device,
    lower: int = 0,
    trunk_input: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and the full classification metrics on the branch's eval rows
    (``lower``: the base layers below the last the run's states carry, see ``run_trunk``;
    ``trunk_input``: what turns them into the trunk's input, ``MultiTaskModule.trunk_input``)."""
    preds: list[int] = []
    loss_sum = 0.0
    n = len(part.eval)
    with torch.no_grad():
        for start in range(0, n, 128):
            idx = list(range(start, min(n, start + 128)))
            if part.eval_states is not None:
                states, mask = part.eval_states.batch(idx)
            else:
                batch = base.tokenize([part.eval.texts[i] for i in idx], device)
                states = base_states(base, batch, lower)
                mask = batch["attention_mask"].bool()
            states, mask = states.to(device), mask.to(device)
            if trunk_input is not None:
                states = trunk_input(states, mask)
            logits = branch(run_trunk(trunk, states, mask)).float()
            y = part.eval_y[idx].to(device)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            preds += logits.argmax(-1).tolist()
    metrics = classification_metrics(part.eval_y.tolist(), preds, part.labels)
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics


def evaluate(
    module: MultiTaskModule, parts: Sequence[BranchData], base: BaseEncoder, device: torch.device
) -> dict[str, dict[str, Any]]:
    was = module.training
    module.eval()
    try:
        return {
            p.name: eval_branch(
                module.trunk,
                module.branches[p.name],  # type: ignore[arg-type]
                p,
                base,
                device,
                module.lower,
                module.trunk_input,
            )
            for p in parts
        }
    finally:
        module.train(was)
