"""Built-in gating modules: noisy top-k (Shazeer et al. 2017) and switch (top-1, Fedus et al. 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaler_wizard.moe import Gating, Routing, apply_capacity, load_balancing_loss


@dataclass
class TopKConfig:
    """Noisy top-k routing with a load-balancing loss and an optional capacity limit."""

    k: int = field(default=2, metadata={"help": "experts per token", "minimum": 1})
    noisy: bool = field(
        default=True, metadata={"help": "add learned Gaussian noise to router logits while training"}
    )
    capacity_factor: float | None = field(
        default=None,
        metadata={"help": "cap tokens per expert at ceil(factor*N*k/E) while training; null = no cap"},
    )
    capacity_at_inference: bool = field(
        default=False, metadata={"help": "also cap at inference (makes outputs depend on the batch)"}
    )

    def __post_init__(self) -> None:
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError("capacity_factor must be > 0 or null")


class TopKGating(Gating):
    """Noisy top-k: weights are the softmax of the k best logits."""

    #: the config field holding the experts per token, which ``init_model(top_k=...)`` fills
    top_k_field = "k"

    def __init__(self, config: TopKConfig, *, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        if config.k > num_experts:
            raise ValueError(f"k={config.k} exceeds num_experts={num_experts}")
        self.config = config
        self.num_experts = num_experts
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.noise = nn.Linear(hidden_size, num_experts, bias=False) if config.noisy else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    def capacity(self, n_tokens: int) -> int | None:
        cf = self.config.capacity_factor
        if cf is None or not (self.training or self.config.capacity_at_inference):
            return None
        return max(1, math.ceil(cf * n_tokens * self.config.k / self.num_experts))

    def experts_per_token(self) -> int | None:
        return int(self.config.k)

    def forward(self, x: Tensor) -> Routing:
        logits = self.router(x)  # (N, E)
        probs = F.softmax(logits, dim=-1)
        noisy = logits
        if self.noise is not None and self.training:
            noisy = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        top_vals, top_idx = noisy.topk(self.config.k, dim=-1)  # (N, k)
        weights = F.softmax(top_vals, dim=-1)
        combine = torch.zeros_like(logits).scatter(1, top_idx, weights)
        # the choice, not ``combine > 0``: a chosen expert's weight can underflow to 0
        chosen = torch.zeros_like(logits).scatter(1, top_idx, torch.ones_like(weights)) > 0
        aux = load_balancing_loss(probs, chosen, self.config.k)
        dropped = 0
        cap = self.capacity(x.shape[0])
        if cap is not None:
            combine, dropped = apply_capacity(combine, cap)
        return Routing(combine=combine, aux_loss=aux, probs=probs, dropped=dropped)


@dataclass
class SwitchConfig:
    """Top-1 (Switch Transformer) routing: weight is the chosen expert's probability."""

    jitter: float = field(
        default=0.0, metadata={"help": "multiplicative input jitter while training", "minimum": 0}
    )
    capacity_factor: float | None = field(default=None, metadata={"help": "as for topk; null = no cap"})
    capacity_at_inference: bool = False

    def __post_init__(self) -> None:
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError("capacity_factor must be > 0 or null")


class SwitchGating(Gating):
    def __init__(self, config: SwitchConfig, *, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.router = nn.Linear(hidden_size, num_experts, bias=False)

    def experts_per_token(self) -> int | None:
        return 1

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.config.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.config.jitter, 1 + self.config.jitter)
        logits = self.router(x)
        probs = F.softmax(logits, dim=-1)
        top_p, top_idx = probs.max(dim=-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter(1, top_idx, top_p)
        chosen = torch.zeros_like(probs).scatter(1, top_idx, torch.ones_like(top_p)) > 0
        aux = load_balancing_loss(probs, chosen, 1)
        dropped = 0
        cf = self.config.capacity_factor
        if cf is not None and (self.training or self.config.capacity_at_inference):
            combine, dropped = apply_capacity(combine, max(1, math.ceil(cf * x.shape[0] / self.num_experts)))
        return Routing(combine=combine, aux_loss=aux, probs=probs, dropped=dropped)
