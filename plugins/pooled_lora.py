"""Built-in strategy ``lora``'s adapter: a low-rank adapter on the pooled trunk output.

``z = x + (alpha / r) * B(A(dropout(x)))`` with B zero-initialised, so a new branch starts
from the trunk's representation unchanged. It shares the single trunk pass with every
other branch of this strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor, nn

from scaler_wizard.branch import BranchAdapter, TrunkOutput


@dataclass
class LoRAConfig:
    """Rank-r residual adapter on the pooled representation."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r", "minimum": 1})
    alpha: float = field(
        default=16.0, metadata={"help": "scaling numerator: the update is scaled by alpha/r"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the adapter input", "minimum": 0, "maximum": 1}
    )


class PooledLoRA(BranchAdapter):
    def __init__(self, config: LoRAConfig, *, hidden_size: int) -> None:
        super().__init__()
        self.out_features = hidden_size
        self.scaling = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout)
        self.lora_A = nn.Linear(hidden_size, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, hidden_size, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT does
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, trunk: TrunkOutput) -> Tensor:
        x = trunk.pooled  # (B, d)
        return x + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
