"""The module ``scaler distill`` trains: the model's trunk, one adapter per teacher and a router.

Each teacher's **adapter** maps the trunk's pooled representation (student dim ``d``) to the
teacher's feature space, one small projection per recorded teacher layer (``LayerNorm`` then
``Linear(d, dim)``). The **router** is a gating plugin instance from the registry (``topk``,
``switch`` or any installed one) built over the teachers instead of experts
(``num_experts = number of teachers``): its ``combine`` weights each example's per-teacher
feature loss, and its own balance loss is added (weighted) to the trunk's MoE aux loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaler_wizard.errors import DistillError
from scaler_wizard.manifests.model import PluginRef, Provider
from scaler_wizard.modeling.model import Trunk
from scaler_wizard.moe import Gating
from scaler_wizard.plugin_manager import get_registry
from scaler_wizard.training.multitask import run_trunk

LOSSES = ("mse", "cosine")


def layer_key(layer: int) -> str:
    return f"layer_{layer}"


class TeacherAdapter(nn.Module):
    """Student pooled (B, d) -> the teacher's features at each of its layers, {layer: (B, dim)}."""

    def __init__(self, student_dim: int, dims: Mapping[int, int]) -> None:
        super().__init__()
        self.layers = [int(layer) for layer in dims]
        self.proj = nn.ModuleDict(
            {
                layer_key(layer): nn.Sequential(nn.LayerNorm(student_dim), nn.Linear(student_dim, dim))
                for layer, dim in dims.items()
            }
        )

    def forward(self, pooled: Tensor) -> dict[int, Tensor]:
        return {layer: self.proj[layer_key(layer)](pooled) for layer in self.layers}


def feature_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-example loss (B,): mean squared error over the features, or 1 - cosine similarity."""
    target = target.to(pred.dtype)
    if kind == "mse":
        return (pred - target).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1)
    raise DistillError(f"--loss must be one of {', '.join(LOSSES)}, not {kind!r}")


def build_router(
    plugin: str, config: Mapping[str, Any] | None, *, hidden_size: int, teachers: Sequence[str]
) -> tuple[Gating, PluginRef]:
    """A gating plugin instance routing examples over ``teachers`` (registry lookup), and its ref.

    ``topk`` defaults to ``k`` = every teacher, without noise: a soft mixture of the teachers."""
    registry = get_registry()
    reg = registry.get("gating", plugin, where="--router")
    raw = dict(config or {})
    if plugin == "topk":
        raw.setdefault("k", len(teachers))
        raw.setdefault("noisy", False)
    cfg, complete = reg.build_config(raw, where="--router-config")
    try:
        gate = reg.factory(cfg, hidden_size=hidden_size, num_experts=len(teachers))
    except (ValueError, TypeError) as exc:
        raise DistillError(f"router {plugin!r} over {len(teachers)} teacher(s): {exc}") from exc
    if not isinstance(gate, Gating):
        raise DistillError(f"gating {plugin!r} factory returned {type(gate).__name__}, not a Gating")
    return gate, PluginRef(plugin=plugin, config=complete, provider=Provider.from_dict(reg.provider()))


class DistillModule(nn.Module):
    """Trunk (the model's own module, shared), adapters by teacher, and the router."""

    def __init__(
        self,
        trunk: Trunk,
        adapters: Mapping[str, TeacherAdapter],
        router: Gating,
        order: Sequence[str],
        loss: str,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.adapters = nn.ModuleDict({n: adapters[n] for n in order})
        self.router = router
        self.order = list(order)
        self.loss_kind = loss

    def forward(
        self, states: Tensor, mask: Tensor, targets: Mapping[str, Mapping[int, Tensor]]
    ) -> dict[str, Tensor]:
        """states (B, T, d), mask (B, T); targets[teacher][layer]: (B, dim). Returns the
        router-weighted ``feature`` loss, per-teacher per-example losses ``per_teacher`` (B, N),
        router ``weights`` (B, N) and ``probs``, the trunk's ``aux`` and the router's ``router_aux``."""
        out = run_trunk(self.trunk, states, mask)
        pooled = out.pooled
        per = []
        for name in self.order:
            preds = self.adapters[name](pooled)
            layer_losses = [
                feature_loss(preds[layer], targets[name][layer], self.loss_kind) for layer in preds
            ]
            per.append(torch.stack(layer_losses, 0).mean(0))
        per_teacher = torch.stack(per, 1)  # (B, N)
        routing = self.router(pooled)
        weights = routing.combine  # (B, N), rows sum to 1 (or to the chosen teacher's probability)
        feature = (weights * per_teacher).sum(1).mean()
        return {
            "feature": feature,
            "per_teacher": per_teacher.detach(),
            "weights": weights.detach(),
            "probs": routing.probs.detach(),
            "aux": out.aux_loss,
            "router_aux": routing.aux_loss,
        }


__all__ = ["LOSSES", "DistillModule", "TeacherAdapter", "build_router", "feature_loss", "layer_key"]
