"""The module ``scaler train`` trains (and DDP wraps): the trunk and the run's branches, with
the recipe's parameter groups and the check that the base stays frozen."""

from __future__ import annotations

import hashlib
from collections.abc import Container, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaler_wizard.branch import Branch, TrunkOutput, shared_base_layers
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.base_encoder import BaseEncoder
from scaler_wizard.modeling.model import Trunk
from scaler_wizard.training.base_layers import BaseBlocks
from scaler_wizard.training.config import TrainConfig

PARAM_GROUPS = ("experts", "gating", "adapters", "heads", "base_layers")


def run_trunk(trunk: Trunk, states: Tensor, mask: Tensor) -> TrunkOutput:
    """The trunk over base ``states``: (B, T, d) the base's last layer; or (B, T, n + 1, d)
    the ``n`` layers below it then the last, which the output carries as ``base_layers``
    for the branches that read them (``BranchAdapter.base_layers``)."""
    if states.dim() == 3:
        return trunk(states, mask)
    layers = states.unbind(2)
    out = trunk(layers[-1], mask)
    out.base_layers = tuple(layers[:-1])
    return out


def base_states(base: BaseEncoder, batch: dict[str, Tensor], lower: int) -> Tensor:
    """The frozen base over a tokenised ``batch``: (B, T, d), or (B, T, lower + 1, d) with the
    ``lower`` layers below the last (the layout :func:`run_trunk` and the cache take)."""
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden, below = base.forward_layers(ids, mask, lower, adapter=None, grad=False, **extra)
    return torch.stack([*below, hidden], dim=2) if lower else hidden


class MultiTaskModule(nn.Module):
    """Trunk and branches (the very modules of the ScalerModel, shared, not copied); with
    ``base_blocks``, the base blocks the run trains too (``training.base_layers``)."""

    def __init__(
        self,
        trunk: Trunk,
        branches: dict[str, Branch],
        order: Sequence[str],
        base_blocks: BaseBlocks | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.branches = nn.ModuleDict({n: branches[n] for n in order})
        self.order = list(order)
        self.base_blocks = base_blocks
        #: base layers below the last the states carry (those the branches read, or with
        #: base_blocks as many as hold the lowest trained block's input)
        self.lower = (
            base_blocks.lower
            if base_blocks is not None
            else shared_base_layers(self.branches[n] for n in self.order)  # type: ignore[misc]
        )

    def trunk_input(self, states: Tensor, mask: Tensor) -> Tensor:
        """The states the trunk takes: as given, or run through the trained base blocks."""
        return states if self.base_blocks is None else self.base_blocks(states, mask)

    def forward(self, states: Tensor, mask: Tensor, branch: Tensor, target: Tensor) -> dict[str, Tensor]:
        """states (B, T, d) (or (B, T, n + 1, d), see :func:`run_trunk`), mask (B, T) bool,
        branch (B,) index into ``order``, target (B,)."""
        assert states.dim() in (3, 4) and mask.shape == states.shape[:2], (states.shape, mask.shape)
        out = run_trunk(self.trunk, self.trunk_input(states, mask), mask)
        n = states.shape[0]
        task = states.new_zeros(())
        example_loss = states.new_zeros(n)
        correct = states.new_zeros(n)
        for k, name in enumerate(self.order):
            module: Branch = self.branches[name]  # type: ignore[assignment]
            rows = (branch == k).nonzero().flatten()
            if rows.numel() == 0:
                # This process's share of the batch has no example of the branch: a zero that
                # still touches its parameters, so DDP sees every parameter used every step.
                task = task + sum(p.sum() for p in module.parameters()) * 0.0
                continue
            sub = TrunkOutput(
                pooled=out.pooled.index_select(0, rows),
                hidden=out.hidden.index_select(0, rows),
                mask=out.mask.index_select(0, rows),
                aux_loss=out.aux_loss,
                base_layers=tuple(layer.index_select(0, rows) for layer in out.base_layers),
            )
            logits = module(sub)  # (n_k, labels_k)
            y = target.index_select(0, rows)
            task = task + module.head.loss(logits, y) * rows.numel()
            with torch.no_grad():
                example_loss[rows] = F.cross_entropy(logits.float(), y, reduction="none")
                correct[rows] = (logits.argmax(-1) == y).to(correct.dtype)
        if out.stats:
            load = torch.stack([s.load * s.tokens for s in out.stats])  # (L, E) assignment counts
        else:
            load = states.new_zeros((0, 0))
        return {
            "loss": task / max(n, 1),
            "aux": out.aux_loss,
            "example_loss": example_loss,
            "correct": correct,
            "load": load.detach(),
            "tokens": mask.sum().to(out.hidden.dtype),
        }


def parameter_groups(module: MultiTaskModule, config: TrainConfig) -> list[dict[str, Any]]:
    """The recipe's four groups. A parameter that fits none of them is a bug, not a guess."""
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in PARAM_GROUPS}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if parts[0] == "base_blocks":
            groups["base_layers"].append(p)
        elif parts[0] == "trunk":
            groups["gating" if len(parts) > 3 and parts[3] == "gating" else "experts"].append(p)
        elif parts[0] == "branches" and parts[2] == "adapter":
            groups["adapters"].append(p)
        elif parts[0] == "branches" and parts[2] == "head":
            groups["heads"].append(p)
        else:
            raise ScalerError(f"parameter {name} belongs to no parameter group")
    lrs = {
        "experts": config.lr_experts,
        "gating": config.lr_gating,
        "adapters": config.lr_adapters,
        "heads": config.lr_heads,
        "base_layers": config.lr_base_layers,
    }
    return [
        {"params": groups[g], "lr": lrs[g], "name": g, "weight_decay": config.weight_decay}
        for g in PARAM_GROUPS
        if groups[g]
    ]


def base_digest(base: BaseEncoder, trained: Container[str] = ()) -> tuple[str, int]:
    """(sha256 of every base tensor's name, dtype, shape and bytes; trainable parameter
    count), both leaving out the tensors named in ``trained`` (the blocks a run trains)."""
    h = hashlib.sha256()
    for name, tensor in sorted(base.model.state_dict().items()):
        if name in trained:
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    trainable = sum(
        p.numel() for n, p in base.model.named_parameters() if p.requires_grad and n not in trained
    )
    return h.hexdigest(), trainable
