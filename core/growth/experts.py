"""Adding experts to an MoE layer without changing what it computes, for every input.

The construction (docs/growth.md has the argument in full):

* The router sees ``xn = gamma * z + beta``, the layer norm of a token, where ``z`` always sums
  to zero over the features and ``|z|^2 <= d``. So for ``v = 1 / gamma`` the dot product
  ``v . xn = sum(beta / gamma) =: b`` is the *same number for every token*: a bias channel in a
  router that has no bias. A new expert's router row ``(L / b) v`` gives it the constant logit
  ``L`` on every input.
* Every existing logit ``r_e . xn`` is at least ``r_e . beta - sqrt(d) |P(r_e * gamma)|``
  (``P`` removes the mean) on every input. ``L`` is put a margin below the smallest of these
  bounds: the new experts are never among the top k (``topk``), and under ``switch`` their
  probability ``exp(L - max)`` is below float32 resolution, so the chosen expert's weight does
  not move.
* When ``|b|`` is too small (a norm bias still at zero), ``beta`` is first moved by a small
  ``delta`` orthogonal to every existing router and noise row, which leaves their logits as
  they were, and each existing expert's ``b_in`` absorbs ``delta @ w_in``: the layer computes
  the same function and ``b`` is now usable.
* New experts get fresh ``w_in`` (as a fresh layer) and zero output projections.

Trainability: the new logit is an ordinary trainable row (the load-balancing loss pushes it
up). Under noisy ``topk`` the new expert's noise row is a constant too: while training its
logit gets noise of standard deviation about half its gap, so it is sometimes chosen and its
weights get gradient; at inference there is no noise, so routing is exactly as before.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from scaler_wizard.errors import GrowthError
from scaler_wizard.modeling.compose import new_trunk_layer
from scaler_wizard.moe import MoELayer

#: gating plugins (built in) whose routing this module knows how to extend exactly
SUPPORTED_GATINGS = ("topk", "switch")
#: |b| (the bias channel's value) below this is first raised to it by moving the norm bias
MIN_BIAS = 1.0
#: logits the new experts stay below every existing logit by (topk: only the order matters)
TOPK_GAP = 1.0
#: switch weighs the chosen expert by its full-softmax probability: the new ones take exp(-gap) < 1e-6 of it
SWITCH_GAP = 14.0
_U32 = 2.0**-24
#: subsets examined for the top-k floor before falling back to the plain minimum
_MAX_SUBSETS = 4096
_OP = "add-experts"


@dataclass(frozen=True)
class ExpertsAdded:
    """What :func:`add_experts` did to one layer (for the provenance and the report)."""

    layer: int
    before: int
    after: int
    new_logit: float
    exploration_std: float | None
    norm_bias_moved: float  # |delta|: 0.0 when the norm bias was usable as it was

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "experts_before": self.before,
            "experts_after": self.after,
            "new_logit": round(self.new_logit, 6),
            "exploration_std": None if self.exploration_std is None else round(self.exploration_std, 6),
            "norm_bias_moved": round(self.norm_bias_moved, 9),
        }


def _refuse(index: int, why: str) -> GrowthError:
    return GrowthError(f"add-experts: trunk layer {index}: {why}", operator=_OP)


def check_gating(layer: MoELayer, index: int) -> dict[str, Any]:
    """The layer's gating config, or GrowthError saying why experts cannot be added exactly."""
    ref = layer.gating_ref
    if ref is None:
        raise _refuse(index, "the layer has no gating reference (not built by compose)")
    if ref.plugin not in SUPPORTED_GATINGS:
        raise _refuse(
            index,
            f"gating {ref.plugin!r} is not one this command can extend exactly "
            f"(it knows {', '.join(SUPPORTED_GATINGS)}): its routing of a new expert is unknown",
        )
    cfg = ref.config_dict()
    if cfg.get("capacity_factor") is not None and cfg.get("capacity_at_inference"):
        raise _refuse(
            index,
            "its capacity limit applies at inference and depends on the number of experts, "
            "so more experts would drop different tokens",
        )
    gate = layer.gating
    router = getattr(gate, "router", None)
    keys = set(gate.state_dict())
    if (
        not isinstance(router, torch.nn.Linear)
        or router.bias is not None
        or not keys <= {"router.weight", "noise.weight"}
    ):
        raise _refuse(index, f"gating {ref.plugin!r} has parameters {sorted(keys)}, not a bias-free router")
    if not layer.norm.elementwise_affine or layer.norm.bias is None:
        raise _refuse(index, "its layer norm has no affine weight and bias")
    return cfg


def _rows(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    gate = layer.gating
    router = getattr(gate, "router", None)
    assert isinstance(router, torch.nn.Linear)  # check_gating made sure
    noise = getattr(gate, "noise", None)
    return router.weight.detach().double(), (
        noise.weight.detach().double() if isinstance(noise, torch.nn.Linear) else None
    )


def _lowest_logit(rows: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(E,) a lower bound of each row's logit over every possible layer-norm output."""
    d = gamma.numel()
    a = rows * gamma  # (E, d)
    spread = (a - a.mean(dim=1, keepdim=True)).norm(dim=1) * math.sqrt(d)
    return rows @ beta - spread


def kth_logit_floor(rows: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, k: int) -> float:
    """A number the k-th largest of the logits ``rows @ xn`` is never below, whatever the input.

    The k-th largest of E logits is the largest over the E-k+1 smallest, so it is at least
    the smallest, over every set S of E-k+1 experts, of max(their mean logit, each one's
    own floor); the mean logit of S is the logit of S's mean row, whose floor is much higher
    than any single row's (rows point in different directions)."""
    e = rows.shape[0]
    single = _lowest_logit(rows, gamma, beta)
    size = e - k + 1
    if size < 1:
        raise ValueError(f"k={k} exceeds the {e} experts")
    if math.comb(e, size) > _MAX_SUBSETS:
        return float(single.min())
    best = math.inf
    for subset in itertools.combinations(range(e), size):
        idx = torch.tensor(subset)
        mean_floor = float(_lowest_logit(rows[idx].mean(0, keepdim=True), gamma, beta)[0])
        best = min(best, max(mean_floor, float(single[idx].max())))
    return best


def add_experts(
    layer: MoELayer, index: int, count: int, *, generator: torch.Generator
) -> tuple[MoELayer, ExpertsAdded]:
    """A new layer: ``layer`` plus ``count`` experts that no input is routed to until trained."""
    if count < 1:
        raise GrowthError(f"add-experts: --count must be at least 1, not {count}", operator=_OP)
    cfg = check_gating(layer, index)
    ref = layer.gating_ref
    assert ref is not None
    d, e_old, h = layer.hidden_size, layer.num_experts, layer.expert_hidden
    gamma = layer.norm.weight.detach().double()
    beta = layer.norm.bias.detach().double()
    if float(gamma.abs().min()) < 1e-6:
        raise _refuse(index, "a layer-norm weight is zero, so the norm's output has no bias channel")
    v = 1.0 / gamma
    router, noise = _rows(layer)
    b_in = layer.b_in.detach().double().clone()
    b = float(v @ beta)
    delta = torch.zeros_like(beta)
    if abs(b) < MIN_BIAS:
        # Move beta along v, orthogonally to every router and noise row (their logits stay).
        span = router if noise is None else torch.cat([router, noise])
        q = torch.linalg.qr(span.T).Q  # (d, r) orthonormal basis of the rows
        pv = v - q @ (q.T @ v)
        n2 = float(pv @ pv)
        if n2 < 1e-6 * float(v @ v):
            raise _refuse(index, "the router rows span the layer norm's bias channel")
        target = MIN_BIAS if b >= 0 else -MIN_BIAS
        delta = (target - b) / n2 * pv
        beta = beta + delta
        b = float(v @ beta)
        w_in = layer.w_in.detach().double()  # (E, d, h): each expert absorbs delta @ w_in
        b_in = b_in - torch.einsum("d,edh->eh", delta, w_in)
    gap = SWITCH_GAP if ref.plugin == "switch" else TOPK_GAP
    k = 1 if ref.plugin == "switch" else int(cfg.get("k", 1))
    floor = kth_logit_floor(router, gamma, beta, k)
    # float32 rounding of a dot product r . xn is at most d * u * |r| |xn| (u = 2^-24), and
    # |xn| <= max|gamma| sqrt(d) + |beta| for every input
    reach = d * _U32 * (float(gamma.abs().max()) * math.sqrt(d) + float(beta.norm()))
    slack = reach * float(router.norm(dim=1).max())
    new_logit = floor - gap - slack
    for _ in range(2):  # the new row's own rounding grows with |new_logit|
        new_logit = floor - gap - slack - reach * abs(new_logit / b) * float(v.norm())
    new_rows = (new_logit / b) * v  # (d,)
    explore: float | None = None
    if noise is not None:
        typical = float((router @ beta).mean()) - new_logit  # gap at the centre of the inputs
        explore = max(1.0, typical / 2)
        s = math.log(math.expm1(explore))  # softplus(s) = explore
        new_noise = (s / b) * v
    # A layer as a fresh one is built (same gating plugin and config, more experts), then filled.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        grown = new_trunk_layer(
            hidden_size=d, num_experts=e_old + count, expert_hidden=h, gating=ref.plugin, gating_config=cfg
        )
    state = {key: t.detach().clone() for key, t in grown.state_dict().items()}
    old = layer.state_dict()
    state["norm.weight"] = old["norm.weight"].clone()
    state["norm.bias"] = beta.to(old["norm.bias"].dtype)
    state["w_in"][:e_old] = old["w_in"]
    state["b_in"][:e_old] = b_in.to(old["b_in"].dtype)
    state["b_in"][e_old:] = 0.0
    state["w_out"][:e_old] = old["w_out"]
    state["w_out"][e_old:] = 0.0
    state["b_out"][:e_old] = old["b_out"]
    state["b_out"][e_old:] = 0.0
    state["gating.router.weight"][:e_old] = old["gating.router.weight"]
    state["gating.router.weight"][e_old:] = new_rows.to(state["gating.router.weight"].dtype)
    if noise is not None:
        state["gating.noise.weight"][:e_old] = old["gating.noise.weight"]
        state["gating.noise.weight"][e_old:] = new_noise.to(state["gating.noise.weight"].dtype)
    grown.load_state_dict(state, strict=True)
    grown.gating_ref = ref
    grown.train(layer.training)
    return grown, ExpertsAdded(
        layer=index,
        before=e_old,
        after=e_old + count,
        new_logit=new_logit,
        exploration_std=explore,
        norm_bias_moved=float(delta.norm()),
    )


__all__ = ["SUPPORTED_GATINGS", "ExpertsAdded", "add_experts", "check_gating", "kth_logit_floor"]
