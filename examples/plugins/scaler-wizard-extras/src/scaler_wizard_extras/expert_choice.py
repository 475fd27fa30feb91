"""Gating ``expert-choice``: experts choose tokens (Zhou et al. 2022, "Mixture-of-Experts
with Expert Choice Routing").

Token-choice gating (top-k) lets every token pick its k experts, so popular experts
overflow and need a balance loss. Here every expert picks its ``c`` best tokens,
``c = ceil(capacity_factor * N / E)``: each expert does exactly the same work by
construction, and a token may be taken by 0, 1 or up to E experts.

The price: whether a token is chosen depends on the other tokens in the batch, so a
text's output can change slightly with what it is batched with. Use token-choice gating
(the built-in ``topk``) where that matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaler_wizard.moe import Gating, Routing


@dataclass
class ExpertChoiceConfig:
    """Expert-choice routing: each expert takes its top-c tokens, c = ceil(capacity_factor*N/E)."""

    capacity_factor: float = field(
        default=2.0,
        metadata={
            "help": "tokens per expert as a multiple of N/E: on average a token gets this many experts",
            "exclusiveMinimum": 0,
        },
    )
    entropy_weight: float = field(
        default=0.0,
        metadata={
            "help": "aux loss = weight * mean router entropy per token (sharper routing); "
            "0: none, routing is balanced by construction",
            "minimum": 0,
        },
    )


class ExpertChoiceGating(Gating):
    """A linear router; experts, not tokens, do the top-k."""

    def __init__(self, config: ExpertChoiceConfig, *, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.router = nn.Linear(hidden_size, num_experts, bias=False)

    def capacity(self, n_tokens: int) -> int:
        """Tokens each expert takes from a batch of ``n_tokens``."""
        if n_tokens == 0:
            return 0
        return min(n_tokens, math.ceil(self.config.capacity_factor * n_tokens / self.num_experts))

    def forward(self, x: Tensor) -> Routing:
        assert x.dim() == 2, x.shape  # (N, d)
        probs = F.softmax(self.router(x), dim=-1)  # (N, E)
        c = self.capacity(x.shape[0])
        combine_t = torch.zeros_like(probs.t())  # (E, N)
        if c > 0:
            weights, tokens = probs.t().topk(c, dim=-1)  # (E, c): each expert's best tokens
            combine_t = combine_t.scatter(1, tokens, weights)
        combine = combine_t.t().contiguous()  # (N, E)
        if self.config.entropy_weight > 0 and x.shape[0] > 0:
            entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
            aux = self.config.entropy_weight * entropy
        else:
            aux = probs.new_zeros(())
        # No assignment is ever dropped for capacity; the closest thing is a token that no
        # expert chose (it passes through on the residual), which is what we report.
        unrouted = int((combine == 0).all(dim=1).sum().item())
        return Routing(combine=combine, aux_loss=aux, probs=probs, dropped=unrouted)
