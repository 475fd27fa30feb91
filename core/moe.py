"""The Mixture-of-Experts layer: a gating plugin routes tokens, experts are FFNs.

Dispatch sorts the (token, expert) assignments by expert once, runs each expert on its
contiguous slice and scatters the weighted results back with one ``index_add_``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from scaler_wizard.manifests.model import PluginRef


@dataclass
class Routing:
    """A gating decision for N tokens over E experts."""

    combine: Tensor  # (N, E) weight of expert e's output for token n; 0 = not sent
    aux_loss: Tensor  # () load-balancing loss, unweighted
    probs: Tensor  # (N, E) router probabilities, for utilisation statistics
    dropped: int = 0  # token->expert assignments dropped by a capacity limit


class Gating(nn.Module):
    """Base class of gating plugins: ``forward(x: (N, d)) -> Routing``."""

    num_experts: int

    def forward(self, x: Tensor) -> Routing:  # pragma: no cover - interface
        raise NotImplementedError

    def experts_per_token(self) -> int | None:
        """At most how many experts a token is sent to at inference, when that is fixed (top-k:
        ``k``); ``None`` when it varies. The ONNX export uses it for a gather-only dispatch."""
        return None


def load_balancing_loss(probs: Tensor, assigned: Tensor, k: int) -> Tensor:
    """Switch-Transformer balance loss generalised to top-k: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the N*k assignments that went to expert e (before any
    capacity drop), ``P_e`` the mean router probability of e. It is 1.0 when both are
    uniform and grows as routing concentrates.
    """
    n, e = probs.shape
    if n == 0:
        return probs.new_zeros(())
    f = assigned.float().sum(0) / (n * k)  # (E,)
    p = probs.mean(0)  # (E,)
    return e * torch.sum(f * p)


def apply_capacity(combine: Tensor, capacity: int) -> tuple[Tensor, int]:
    """Keep at most ``capacity`` tokens per expert.

    Overflow rule: an over-full expert keeps the tokens with the largest routing weight
    (ties: lower token index first) and drops the rest; a dropped token simply gets no
    contribution from that expert (the residual connection still carries it).
    """
    n = combine.shape[0]
    if n <= capacity:
        return combine, 0
    assigned = combine > 0
    scores = torch.where(assigned, combine, torch.full_like(combine, -1.0))
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices[:capacity]  # (C, E)
    keep = torch.zeros_like(assigned)
    keep.scatter_(0, order, True)
    keep &= assigned
    dropped = int(assigned.sum().item() - keep.sum().item())
    return combine * keep, dropped


@dataclass
class MoEStats:
    """Per-layer routing statistics for monitoring."""

    load: Tensor  # (E,) fraction of assignments per expert
    importance: Tensor  # (E,) mean router probability per expert
    dropped: int
    tokens: int


class MoELayer(nn.Module):
    """Pre-norm residual MoE block: ``h + moe(norm(h))``, identity when freshly built."""

    def __init__(self, hidden_size: int, num_experts: int, expert_hidden: int, gating: Gating) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.expert_hidden = expert_hidden
        self.norm = nn.LayerNorm(hidden_size)
        self.gating = gating
        #: the manifest's plugin_ref for the gating (plugin, complete config, provider)
        self.gating_ref: PluginRef | None = None
        d, h, e = hidden_size, expert_hidden, num_experts
        self.w_in = nn.Parameter(torch.empty(e, d, h))
        self.b_in = nn.Parameter(torch.zeros(e, h))
        # Zero output projections: a fresh layer adds exactly 0, so a new model starts
        # exactly as good as its base.
        self.w_out = nn.Parameter(torch.zeros(e, h, d))
        self.b_out = nn.Parameter(torch.zeros(e, d))
        nn.init.normal_(self.w_in, std=d**-0.5)

    def expert_inner(self, index: int, x: Tensor) -> Tensor:
        """Expert ``index``'s hidden activation on tokens x (n, d) -> (n, expert_hidden): what its
        output projection reads (the pruning refit solves that projection on it)."""
        return F.gelu(x @ self.w_in[index] + self.b_in[index])

    def expert(self, index: int, x: Tensor) -> Tensor:
        """Expert ``index`` on tokens x (n, d) -> (n, d)."""
        return self.expert_inner(index, x) @ self.w_out[index] + self.b_out[index]

    def _dispatch(self, xn: Tensor, combine: Tensor) -> Tensor:
        """Every expert on its tokens, weighted and summed: (N, d), (N, E) -> (N, d).

        One ``nonzero`` and a stable sort by expert put each expert's tokens in one contiguous
        slice of a single gathered copy; per expert only the FFN itself runs (two matmuls, two
        bias adds, a GELU); the gate weights are applied and the results scattered back once
        for all experts. Fewer, larger kernels than a gather + scatter per expert, which is
        what keeps it fast when other processes share the CPUs (each parallel region waits at
        a barrier for every thread). The arithmetic is the per-expert loop's, in the same order
        (a token's experts are added in ascending expert order), so outputs keep their bits."""
        tok, exp = combine.nonzero(as_tuple=True)
        if tok.numel() == 0:
            return torch.zeros_like(xn)
        order = exp.argsort(stable=True)
        tok, exp = tok[order], exp[order]
        counts = torch.bincount(exp, minlength=self.num_experts).tolist()
        xs = xn.index_select(0, tok)
        outs = [self.expert(e, chunk) for e, chunk in enumerate(xs.split(counts)) if counts[e]]
        ys = torch.cat(outs) * combine[tok, exp].unsqueeze(1)
        return torch.zeros_like(xn).index_add_(0, tok, ys)

    def forward(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, MoEStats]:
        """hidden (B, T, d), mask (B, T) bool -> (B, T, d), aux loss, stats. Padding is not routed."""
        assert hidden.dim() == 3 and hidden.shape[-1] == self.hidden_size, hidden.shape
        x = hidden[mask]  # (N, d) real tokens only
        xn = self.norm(x)
        routing = self.gating(xn)
        combine = routing.combine  # (N, E)
        assert combine.shape == (x.shape[0], self.num_experts), combine.shape
        y = self._dispatch(xn, combine)
        out = hidden.index_put((mask,), x + y)
        n = max(int(x.shape[0]), 1)
        stats = MoEStats(
            # the share of tokens each expert computes: a chosen expert whose weight underflows
            # to 0 is neither computed (``_dispatch`` skips it) nor counted
            load=((combine > 0).float().sum(0) / n).detach(),
            importance=routing.probs.detach().mean(0)
            if x.shape[0]
            else routing.probs.new_zeros(self.num_experts),
            dropped=routing.dropped,
            tokens=int(x.shape[0]),
        )
        return out, routing.aux_loss, stats
