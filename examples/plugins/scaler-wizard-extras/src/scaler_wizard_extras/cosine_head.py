"""Head ``cosine``: one learnt prototype per label, logits = s * cos(features, prototype).

A cosine (prototype) classifier in the style of normalised-softmax / few-shot heads:
the feature norm cannot dominate the decision, and the temperature ``s`` is learnt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaler_wizard.branch import Head


@dataclass
class CosineHeadConfig:
    """Prototype head: softmax over scale * cosine(features, prototype of each label)."""

    scale: float = field(
        default=10.0,
        metadata={"help": "initial scale (inverse temperature) s", "exclusiveMinimum": 0},
    )
    learn_scale: bool = field(default=True, metadata={"help": "train s with the prototypes"})
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the features while training", "minimum": 0, "maximum": 1}
    )


class CosineHead(Head):
    log_scale: Tensor

    def __init__(self, config: CosineHeadConfig, *, in_features: int, labels: list[str]) -> None:
        super().__init__()
        if not labels:
            raise ValueError("a cosine head needs at least one label")
        self.dropout = nn.Dropout(config.dropout)
        self.prototypes = nn.Parameter(torch.empty(len(labels), in_features))  # (L, D)
        nn.init.normal_(self.prototypes, std=in_features**-0.5)
        log_scale = torch.tensor(math.log(config.scale))
        if config.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:  # still saved in the bank, so a composed head is exactly the trained one
            self.register_buffer("log_scale", log_scale)

    def forward(self, features: Tensor) -> Tensor:
        x = F.normalize(self.dropout(features), dim=-1)  # (B, D)
        p = F.normalize(self.prototypes, dim=-1)  # (L, D)
        return self.log_scale.exp() * (x @ p.t())  # (B, L)
