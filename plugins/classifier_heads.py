"""Built-in head modules: ``linear`` (single-label softmax) and ``multilabel`` (independent sigmoids)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from scaler_wizard.branch import Head, Prediction


@dataclass
class LinearHeadConfig:
    """Linear classifier, softmax over the labels."""

    dropout: float = field(
        default=0.1, metadata={"help": "dropout on the features while training", "minimum": 0, "maximum": 1}
    )


class LinearHead(Head):
    def __init__(self, config: LinearHeadConfig, *, in_features: int, labels: list[str]) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(in_features, len(labels))

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.dropout(features))  # (B, L)


@dataclass
class MultiLabelHeadConfig:
    """Independent sigmoid per label; a label is predicted when its probability >= threshold."""

    dropout: float = field(default=0.1, metadata={"minimum": 0, "maximum": 1})
    threshold: float = field(default=0.5, metadata={"minimum": 0, "maximum": 1})


class MultiLabelHead(Head):
    multilabel = True

    def __init__(self, config: MultiLabelHeadConfig, *, in_features: int, labels: list[str]) -> None:
        super().__init__()
        self.threshold = config.threshold
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(in_features, len(labels))

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.dropout(features))

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets.float())

    def probabilities(self, logits: Tensor) -> Tensor:
        return logits.sigmoid()

    def decode(self, probs: Tensor, labels: list[str]) -> list[Prediction]:
        out = []
        for row in probs.tolist():
            chosen = [lab for lab, p in zip(labels, row, strict=True) if p >= self.threshold]
            score = min((p for p in row if p >= self.threshold), default=max(row))
            out.append(Prediction(chosen, score, dict(zip(labels, row, strict=True))))
        return out
