"""The module ``scaler distill`` trains: the model's trunk, one adapter per teacher and a router.

Each teacher's **adapter** maps the trunk's pooled representation (student dim ``d``) to the
teacher's feature space, one small projection per recorded teacher layer (``LayerNorm`` then
``Linear(d, dim)``). The **router** is a gating plugin instance from the registry (``topk``,
``switch`` or any installed one) built over the teachers instead of experts
(``num_experts = number of teachers``): its ``combine`` weights each example's per-teacher
feature loss (each teacher's loss scaled by its batch mean), a balance term on its mean
probabilities keeps every teacher in use, and its own balance loss is added (weighted) to the
trunk's MoE aux loss. See ``DistillModule.forward``.
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

    def _per_teacher(self, pooled: Tensor, targets: Mapping[str, Mapping[int, Tensor]]) -> Tensor:
        """(B, N): each teacher's per-example loss, averaged over its layers."""
        per = []
        for name in self.order:
            preds = self.adapters[name](pooled)
            layer_losses = [
                feature_loss(preds[layer], targets[name][layer], self.loss_kind) for layer in preds
            ]
            per.append(torch.stack(layer_losses, 0).mean(0))
        return torch.stack(per, 1)

    def forward(
        self, states: Tensor, mask: Tensor, targets: Mapping[str, Mapping[int, Tensor]]
    ) -> dict[str, Tensor]:
        """states (B, T, d), mask (B, T); targets[teacher][layer]: (B, dim).

        Returns ``objective`` (what to minimise), the router-weighted ``feature`` loss (what to
        report), per-teacher per-example losses ``per_teacher`` (B, N), router ``weights`` (B, N)
        and ``probs``, the router's ``balance`` term, the trunk's ``aux`` and the router's
        ``router_aux``.

        The objective is built so that no teacher can take the router over:

        * each teacher's loss is divided by its own batch mean (detached), so teachers whose
          features are easier to fit, or simply smaller, do not look better to the router;
        * the trunk learns from the router-weighted losses; each adapter learns its teacher on
          every row (the weight the router did not give it is made up on a detached copy of the
          trunk's output), so a teacher with little weight still keeps a trained adapter;
        * ``balance`` = ``N * sum_t mean(p_t)^2 - 1`` on the router's probabilities: 0 when the
          teachers are used equally on average, ``N - 1`` when one takes every row. A soft
          router (``k`` = every teacher) sends every row everywhere, so the gating's own
          load-based balance loss is constant there and cannot hold it.
        """
        out = run_trunk(self.trunk, states, mask)
        pooled = out.pooled
        per_teacher = self._per_teacher(pooled, targets)  # (B, N)
        scale = per_teacher.detach().mean(0).clamp_min(1e-12)  # (N,)
        routing = self.router(pooled)
        weights = routing.combine  # (B, N), rows sum to 1 (or to the chosen teacher's probability)
        objective = (weights * per_teacher / scale).sum(1).mean()
        if len(self.order) > 1:
            rest = (1.0 - weights.detach()).clamp_min(0.0)
            objective = objective + (rest * self._per_teacher(pooled.detach(), targets) / scale).sum(1).mean()
        importance = routing.probs.mean(0)
        balance = len(self.order) * importance.pow(2).sum() - 1.0
        return {
            "objective": objective,
            "feature": (weights * per_teacher).sum(1).mean(),
            "per_teacher": per_teacher.detach(),
            "weights": weights.detach(),
            "probs": routing.probs.detach(),
            "balance": balance,
            "aux": out.aux_loss,
            "router_aux": routing.aux_loss,
        }


__all__ = ["LOSSES", "DistillModule", "TeacherAdapter", "build_router", "feature_loss", "layer_key"]
