"""The growth operators of ``scaler expand``: each maps a trunk to a bigger one computing the same.

* :class:`AddExperts`: more experts in a layer (or every layer), never routed to until trained
  (:mod:`scaler_wizard.growth.experts` has the construction).
* :class:`AddLayer`: a fresh MoE layer inserted at a position; its output projections are zero,
  so it adds exactly 0 to the residual stream, as every fresh trunk layer does.
* :class:`Widen`: wider expert FFNs. ``duplicate`` (Net2Net): each new hidden unit copies an
  existing one's input weights and the copies share its output weights (random shares summing
  to 1, so the copies get different gradients and do not stay twins); ``zero``: new units with
  fresh input weights and zero output weights.

An operator never changes the trunk it is given: it returns a new :class:`Trunk` (unchanged
layers are the same modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from scaler_wizard.errors import GrowthError
from scaler_wizard.growth.experts import ExpertsAdded, add_experts
from scaler_wizard.modeling.compose import new_trunk_layer
from scaler_wizard.modeling.model import Trunk
from scaler_wizard.moe import MoELayer

WIDEN_METHODS = ("duplicate", "zero")


def _layer(trunk: Trunk, index: int, op: str) -> MoELayer:
    n = len(trunk.layers)
    if not 0 <= index < n:
        raise GrowthError(
            f"{op}: --layer {index} is out of range: the trunk has {n} layers (0..{n - 1})", operator=op
        )
    layer = trunk.layers[index]
    assert isinstance(layer, MoELayer)
    return layer


def _targets(trunk: Trunk, layer: int | None, op: str) -> list[int]:
    if layer is None:
        if not len(trunk.layers):
            raise GrowthError(f"{op}: the trunk has no MoE layers", operator=op)
        return list(range(len(trunk.layers)))
    _layer(trunk, layer, op)
    return [layer]


def _rebuilt(trunk: Trunk, layers: list[MoELayer]) -> Trunk:
    new = Trunk(layers, pooling=trunk.pooling)
    return new.train(trunk.training)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class AddExperts:
    """``count`` experts added to layer ``layer`` (every layer when None)."""

    count: int
    layer: int | None = None
    seed: int = 0
    name: str = field(default="add-experts", init=False)
    #: filled by :meth:`apply`, one per layer grown
    done: list[ExpertsAdded] = field(default_factory=list, init=False)

    def arguments(self) -> dict[str, Any]:
        return {"layer": self.layer, "count": self.count, "seed": self.seed}

    def apply(self, trunk: Trunk) -> Trunk:
        gen = _generator(self.seed)
        layers = [lay for lay in trunk.layers if isinstance(lay, MoELayer)]
        self.done = []
        for i in _targets(trunk, self.layer, self.name):
            layers[i], info = add_experts(layers[i], i, self.count, generator=gen)
            self.done.append(info)
        return _rebuilt(trunk, layers)

    def details(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.done]


@dataclass
class AddLayer:
    """A fresh (identity) MoE layer inserted before position ``at`` (the end when None).

    Experts, expert width and gating default to the neighbouring layer's (the one before the
    position, or the first layer when inserting at 0)."""

    at: int | None = None
    num_experts: int | None = None
    expert_hidden: int | None = None
    gating: str | None = None
    gating_config: dict[str, Any] | None = None
    seed: int = 0
    name: str = field(default="add-layer", init=False)

    def arguments(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "experts": self.num_experts,
            "expert_hidden": self.expert_hidden,
            "gating": self.gating,
            "gating_config": self.gating_config,
            "seed": self.seed,
        }

    def apply(self, trunk: Trunk) -> Trunk:
        layers = [lay for lay in trunk.layers if isinstance(lay, MoELayer)]
        n = len(layers)
        at = n if self.at is None else self.at
        if not 0 <= at <= n:
            raise GrowthError(
                f"add-layer: --at {at} is out of range: the trunk has {n} layers (0..{n})", operator=self.name
            )
        if not layers and (self.gating is None or self.num_experts is None):
            raise GrowthError(
                "add-layer: the trunk has no layer to copy the shape from: give --gating and --experts",
                operator=self.name,
            )
        near = layers[max(at - 1, 0)] if layers else None
        ref = near.gating_ref if near is not None else None
        gating = self.gating or (ref.plugin if ref is not None else "topk")
        if self.gating_config is not None:
            config = dict(self.gating_config)
        elif ref is not None and ref.plugin == gating:
            config = ref.config_dict()
        else:
            config = {}
        num_experts = self.num_experts or (near.num_experts if near is not None else 8)
        hidden = self.expert_hidden or (near.expert_hidden if near is not None else None)
        d = layers[0].hidden_size if layers else None
        if d is None:
            raise GrowthError(
                "add-layer: the trunk has no layers to take the hidden size from", operator=self.name
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            fresh = new_trunk_layer(
                hidden_size=d,
                num_experts=num_experts,
                expert_hidden=hidden,
                gating=gating,
                gating_config=config,
            )
        fresh.train(trunk.training)
        return _rebuilt(trunk, [*layers[:at], fresh, *layers[at:]])

    def details(self) -> list[dict[str, Any]]:
        return []


def _widen_layer(layer: MoELayer, hidden: int, method: str, gen: torch.Generator) -> MoELayer:
    e, d, h = layer.num_experts, layer.hidden_size, layer.expert_hidden
    ref = layer.gating_ref
    assert ref is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        wide = new_trunk_layer(
            hidden_size=d,
            num_experts=e,
            expert_hidden=hidden,
            gating=ref.plugin,
            gating_config=ref.config_dict(),
        )
    old = layer.state_dict()
    state = {k: t.detach().clone() for k, t in wide.state_dict().items()}
    for key, value in old.items():
        if key not in ("w_in", "b_in", "w_out", "b_out"):
            state[key] = value.clone()
    w_in, b_in, w_out = old["w_in"], old["b_in"], old["w_out"]
    state["b_out"] = old["b_out"].clone()
    if method == "zero":
        state["w_in"][:, :, :h] = w_in
        state["b_in"][:, :h] = b_in
        state["b_in"][:, h:] = 0.0
        state["w_out"][:, :h] = w_out
        state["w_out"][:, h:] = 0.0
    else:
        for x in range(e):
            # unit j of the wide expert copies unit src[j]; the copies of a unit split its
            # outgoing weights in random shares that sum to 1
            src = torch.cat([torch.arange(h), torch.randint(0, h, (hidden - h,), generator=gen)])
            raw = 0.5 + torch.rand(hidden, generator=gen, dtype=torch.float64)
            total = torch.zeros(h, dtype=torch.float64).index_add_(0, src, raw)
            share = (raw / total[src]).to(w_out.dtype)
            state["w_in"][x] = w_in[x][:, src]
            state["b_in"][x] = b_in[x][src]
            state["w_out"][x] = w_out[x][src] * share[:, None]
    wide.load_state_dict(state, strict=True)
    wide.gating_ref = ref
    return wide.train(layer.training)


@dataclass
class Widen:
    """Expert FFN hidden size of layer ``layer`` (every layer when None) widened to ``hidden``."""

    hidden: int
    layer: int | None = None
    method: str = "duplicate"
    seed: int = 0
    name: str = field(default="widen", init=False)

    def arguments(self) -> dict[str, Any]:
        return {"layer": self.layer, "hidden": self.hidden, "method": self.method, "seed": self.seed}

    def apply(self, trunk: Trunk) -> Trunk:
        if self.method not in WIDEN_METHODS:
            raise GrowthError(
                f"widen: --method must be one of {', '.join(WIDEN_METHODS)}, not {self.method!r}",
                operator=self.name,
            )
        gen = _generator(self.seed)
        layers = [lay for lay in trunk.layers if isinstance(lay, MoELayer)]
        for i in _targets(trunk, self.layer, self.name):
            if self.hidden <= layers[i].expert_hidden:
                raise GrowthError(
                    f"widen: --hidden {self.hidden} is not wider than layer {i}'s experts "
                    f"({layers[i].expert_hidden})",
                    operator=self.name,
                )
            layers[i] = _widen_layer(layers[i], self.hidden, self.method, gen)
        return _rebuilt(trunk, layers)

    def details(self) -> list[dict[str, Any]]:
        return []


Operator = AddExperts | AddLayer | Widen

__all__ = ["WIDEN_METHODS", "AddExperts", "AddLayer", "Operator", "Widen"]
