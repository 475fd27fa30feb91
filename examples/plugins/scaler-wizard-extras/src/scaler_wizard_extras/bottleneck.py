"""Branch strategy ``bottleneck``: a Houlsby-style bottleneck adapter on the pooled output.

``z = x + up(dropout(act(down(x))))`` (Houlsby et al. 2019) with ``up`` zero-initialised,
so a new branch starts from the trunk's representation unchanged. Like the built-in
``lora`` it reads only the pooled trunk output, so it shares the single trunk pass (and
``branch add`` can cache trunk features for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from scaler_wizard.branch import BranchAdapter, TrunkOutput

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class BottleneckConfig:
    """Residual bottleneck adapter: down-projection, nonlinearity, zero-initialised up-projection."""

    size: int = field(default=64, metadata={"help": "bottleneck width", "minimum": 1})
    activation: Literal["relu", "gelu", "tanh"] = field(
        default="gelu", metadata={"help": "nonlinearity between the projections"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout inside the bottleneck", "minimum": 0, "maximum": 1}
    )


class BottleneckAdapter(BranchAdapter):
    def __init__(self, config: BottleneckConfig, *, hidden_size: int) -> None:
        super().__init__()
        self.out_features = hidden_size
        self.down = nn.Linear(hidden_size, config.size)
        self.act = _ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.Linear(config.size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, trunk: TrunkOutput) -> Tensor:
        x = trunk.pooled  # (B, d)
        delta: Tensor = self.up(self.dropout(self.act(self.down(x))))  # (B, d)
        return x + delta
