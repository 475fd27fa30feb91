"""Built-in strategy ``attn-mlp``'s adapter: attention pooling over the trunk's token states + an MLP.

Per branch, over the shared trunk output (no pass of its own through the base):

* multi-head attention pooling: each head scores every real token of ``TrunkOutput.hidden``
  (masked) with a learned query and takes a softmax-weighted sum of its ``d / heads`` slice of
  the (normalised) token states; the heads' sums are projected (``d -> d``) and added to the
  mean-pooled vector;
* a two-layer MLP (``d -> hidden -> d``, GELU, pre-LayerNorm) added residually.

Both residual branches start at zero, so a new branch starts from the trunk's pooled output
(the ``lora`` starting point) and learns which tokens matter. ``branch add`` trains it on
cached token states (``features = "tokens"``), so training never runs the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from scaler_wizard.branch import BranchAdapter, TrunkOutput


@dataclass
class AttnMLPConfig:
    """Attention pooling over token states, then a residual two-layer MLP."""

    #: what ``branch add`` uses on small data (an eval split under 50 rows) for the fields not
    #: given: a narrow MLP. TREC, 8 rows a class, five samples: 74.7% mean with 8, 68.4% with
    #: 256 (docs/status.md, session 23); the attention pooling and the mix do the work there.
    small_data: ClassVar[dict[str, Any]] = {"hidden": 8}

    heads: int = field(
        default=4,
        metadata={
            "help": "attention-pooling heads (each pools a d/heads slice; must divide d)",
            "minimum": 1,
        },
    )
    hidden: int = field(default=256, metadata={"help": "width of the MLP's hidden layer", "minimum": 1})
    dropout: float = field(
        default=0.1,
        metadata={"help": "dropout on the token states and in the MLP", "minimum": 0, "maximum": 1},
    )


class AttentionMLP(BranchAdapter):
    #: what ``branch add`` caches for it: the trunk's token states, not only the pooled vector
    features = "tokens"

    def __init__(self, config: AttnMLPConfig, *, hidden_size: int) -> None:
        super().__init__()
        self.out_features = hidden_size
        self.heads = config.heads
        self.dropout = nn.Dropout(config.dropout)
        self.token_norm = nn.LayerNorm(hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.score = nn.Linear(hidden_size, config.heads)  # one query per head
        if hidden_size % config.heads:
            raise ValueError(f"heads ({config.heads}) must divide the hidden size ({hidden_size})")
        self.proj = nn.Linear(hidden_size, hidden_size)  # the heads' pooled slices -> d
        self.mlp_in = nn.Linear(hidden_size, config.hidden)
        self.mlp_out = nn.Linear(config.hidden, hidden_size)
        self.act = nn.GELU()
        for zero in (self.proj, self.mlp_out):  # start exactly at the pooled vector
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def forward(self, trunk: TrunkOutput) -> Tensor:
        return self.tail(trunk.hidden, trunk.mask, trunk.pooled)

    def tail(self, x: Tensor, mask: Tensor, pooled: Tensor) -> Tensor:
        """Token states ``x`` (B, T, d), ``mask`` (B, T) and the vector they add to (B, d)."""
        b, t, d = x.shape
        h = self.dropout(self.token_norm(x))
        scores = self.score(h).masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min)  # (B, T, H)
        weights = torch.softmax(scores, dim=1)  # over tokens
        per_head = h.reshape(b, t, self.heads, d // self.heads)  # (B, T, H, d/H)
        attended = torch.einsum("bth,bthk->bhk", weights, per_head).reshape(b, d)
        z = pooled + self.proj(attended)
        return z + self.mlp_out(self.dropout(self.act(self.mlp_in(self.mlp_norm(z)))))


@dataclass
class AttnMixConfig(AttnMLPConfig):
    """A learned mix of the encoder's last layers, then attention pooling and a residual MLP."""

    layers: int = field(
        default=3,
        metadata={
            "help": "how many of the encoder's last layers to mix (the top one is the trunk's "
            "output, the others the base's layers below it); 1 = the trunk's output alone",
            "minimum": 1,
            "maximum": 64,
        },
    )


class AttentionMix(AttentionMLP):
    """``attn-mix``: :class:`AttentionMLP` over a softmax mix of the top ``layers`` layers.

    The mix starts uniform and is learned with the rest; its pooled vector is the masked mean
    of the mixed states. The base layers come from the shared pass (``TrunkOutput.base_layers``)
    and, while ``branch add`` trains, from the token cache, which then holds them too.
    """

    def __init__(self, config: AttnMixConfig, *, hidden_size: int) -> None:
        super().__init__(config, hidden_size=hidden_size)
        self.base_layers = config.layers - 1
        self.mix = nn.Parameter(torch.zeros(config.layers))

    def forward(self, trunk: TrunkOutput) -> Tensor:
        n = self.base_layers
        if len(trunk.base_layers) < n:
            raise ValueError(
                f"attn-mix reads {n} base layers below the last, the trunk output carries "
                f"{len(trunk.base_layers)}"
            )
        # Written for serving many branches: every step is one pass over the (B, T, d) states
        # (no stacked copy of the layers, no permuted copy per head), so a branch costs a few
        # memory passes over the batch's tokens on top of the one shared trunk pass.
        lower = trunk.base_layers[len(trunk.base_layers) - n :]
        weights = torch.softmax(self.mix, dim=0).to(trunk.hidden.dtype)
        x = trunk.hidden * weights[-1]
        for i, layer in enumerate(lower):
            x = torch.addcmul(x, layer, weights[i])  # one pass per layer
        mask = trunk.mask
        m = mask.to(x.dtype).unsqueeze(1)  # (B, 1, T)
        pooled = torch.bmm(m, x).squeeze(1) / m.sum(-1).clamp(min=1.0)  # masked mean (B, d)
        b, t, d = x.shape
        h = self.dropout(self.token_norm(x))
        scores = self.score(h).masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min)  # (B, T, H)
        attn = torch.softmax(scores, dim=1).transpose(1, 2)  # (B, H, T), over tokens
        # every head's weights over every slice, then each head's own slice: (B, H, H, d/H) diagonal
        every = torch.bmm(attn, h).reshape(b, self.heads, self.heads, d // self.heads)
        attended = torch.diagonal(every, dim1=1, dim2=2).transpose(1, 2).reshape(b, d)
        z = pooled + self.proj(attended)
        return z + self.mlp_out(self.dropout(self.act(self.mlp_in(self.mlp_norm(z)))))
