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

    def _per_teacher(
        self,
        pooled: Tensor,
        targets: Mapping[str, Mapping[int, Tensor]],
        keep: dict[str, dict[int, Tensor]] | None = None,
    ) -> Tensor:
        """(B, N): each teacher's per-example loss, averaged over its layers (predictions kept
        in ``keep``, detached, when given)."""
        per = []
        for name in self.order:
            preds = self.adapters[name](pooled)
            if keep is not None:
                keep[name] = {layer: p.detach() for layer, p in preds.items()}
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
        preds: dict[str, dict[int, Tensor]] = {}
        per_teacher = self._per_teacher(pooled, targets, preds)  # (B, N)
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
            "preds": preds,
        }


class ExplainedVariance:
    """Each teacher's held-out R², accumulated over batches: ``1 - SSE / SST`` of the adapter's
    predictions against the teacher's features (summed over feature dimensions, ``SST`` around
    the held-out mean), averaged over the teacher's layers. 0 is what predicting the mean gives;
    a loss that falls a lot from a random adapter's can still explain little (issue 14). A
    teacher whose held-out features do not vary (one row) has no R² and is left out."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], list[Tensor]] = {}
        self.rows: dict[tuple[str, int], int] = {}

    def add(
        self, preds: Mapping[str, Mapping[int, Tensor]], targets: Mapping[str, Mapping[int, Tensor]]
    ) -> None:
        for name, layers in preds.items():
            for layer, pred in layers.items():
                y = targets[name][layer].double()
                sse, total, squares = (pred.double() - y).pow(2).sum(), y.sum(0), y.pow(2).sum(0)
                acc = self.sums.get((name, layer))
                self.sums[name, layer] = (
                    [sse, total, squares]
                    if acc is None
                    else [a + b for a, b in zip(acc, (sse, total, squares), strict=True)]
                )
                self.rows[name, layer] = self.rows.get((name, layer), 0) + len(y)

    def result(self) -> dict[str, float]:
        by_teacher: dict[str, list[float]] = {}
        for (name, layer), (sse, total, squares) in self.sums.items():
            n = self.rows[name, layer]
            sst = float((squares - total.pow(2) / n).sum())
            if sst > 1e-12 * max(float(squares.sum()), 1e-300):  # constant features: R² undefined
                by_teacher.setdefault(name, []).append(1.0 - float(sse) / sst)
        return {name: sum(v) / len(v) for name, v in by_teacher.items()}


__all__ = [
    "LOSSES",
    "DistillModule",
    "ExplainedVariance",
    "TeacherAdapter",
    "build_router",
    "feature_loss",
    "layer_key",
]
