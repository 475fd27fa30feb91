"""What a branch is: an adapter (from a strategy plugin) and a head (from a head plugin)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from scaler_wizard.encoder_host import EncoderHost


@dataclass
class TrunkOutput:
    """The shared representation, computed once per input whatever the number of branches."""

    pooled: Tensor  # (B, d)
    hidden: Tensor  # (B, T, d) token states after the MoE layers
    mask: Tensor  # (B, T) bool, True for real tokens
    aux_loss: Tensor  # () sum of the MoE layers' balance losses
    stats: list[Any] = field(default_factory=list)  # one MoEStats per layer
    #: (issue 12) the base encoder's token states of the layers directly below its last, each
    #: (B, T, d), bottom to top: as many as the branches of the pass asked for
    #: (``BranchAdapter.base_layers``, the most of them), possibly more than one adapter reads:
    #: an adapter reading ``n`` takes the last ``n``. Empty unless a branch asks.
    base_layers: tuple[Tensor, ...] = ()


class BranchAdapter(nn.Module):
    """Base class of branch strategies: maps the trunk output to this branch's features.

    The default kind works on the shared trunk output, its bank is its ``state_dict``. A
    strategy that changes the base encoder itself (LoRA inside attention) sets
    ``needs_base_pass`` (the model then runs base + trunk once more with it active, and
    ``branch add`` cannot cache features) and ``bank_format = "folder"`` with
    ``export_folder``/``import_folder`` (its bank is then a folder bank). Such a strategy
    reaches the base only through the ``EncoderHost`` protocol (``scaler_wizard.encoder_host``)
    its methods receive as ``base``: it injects its adapters into ``base.model`` and registers
    an ``AdapterSwitch`` that turns a branch's adapter on for that branch's own pass.
    """

    out_features: int
    #: how many of the base's layers below its last this adapter reads (``TrunkOutput.base_layers``,
    #: the last ``base_layers`` of them); the model computes them in the shared pass, and
    #: ``branch add`` caches them with the token states (``features = "tokens"``).
    base_layers: int = 0
    needs_base_pass: bool = False
    bank_format: str = "safetensors"  # or "folder"
    bank_layout: str = ""  # for folder banks: what the folder is, e.g. "peft"

    def forward(self, trunk: TrunkOutput) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def attach(self, base: EncoderHost, branch: str) -> None:
        """Called when a new branch joins a model (before training)."""

    def detach(self, base: EncoderHost, branch: str) -> None:
        """Called when the branch leaves a model."""

    def export_folder(self, base: EncoderHost, branch: str, dest: Path, *, base_name: str) -> Path:
        """Write the folder bank under ``dest``; return the folder to store. ``base_name``:
        how the bank may name its base (a Hub id where there is one)."""
        raise NotImplementedError

    def import_folder(self, base: EncoderHost, branch: str, folder: Path) -> None:
        """Load the folder bank (a read-only view of verified files)."""
        raise NotImplementedError

    def check_folder(self, files: Mapping[str, Path], *, where: str) -> None:
        """Check a stored folder bank without loading it (``scaler verify``): ``files`` maps
        each member's name in the folder to its verified file. Raise a ``ScalerError`` (one
        line, starting with ``where``) for a bank ``import_folder`` would refuse."""

    def trainable_parameters(self, base: EncoderHost, branch: str) -> list[nn.Parameter]:
        """What ``branch add`` trains for this adapter (the head's parameters come on top)."""
        return [p for p in self.parameters() if p.requires_grad]


@dataclass
class Prediction:
    """A branch's answer for one input."""

    label: str | list[str]
    score: float
    scores: dict[str, float]


class Head(nn.Module):
    """Base class of task heads: features (B, in) -> logits (B, num_labels)."""

    multilabel: bool = False

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """targets: (B,) int64 class indices, or (B, L) float 0/1 for multi-label heads."""
        return F.cross_entropy(logits, targets)

    def probabilities(self, logits: Tensor) -> Tensor:
        return F.softmax(logits, dim=-1)

    def decode(self, probs: Tensor, labels: list[str]) -> list[Prediction]:
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(labels[best], row[best], dict(zip(labels, row, strict=True))))
        return out


class Branch(nn.Module):
    """Adapter + head + the label names, as composed from a manifest entry."""

    def __init__(self, adapter: BranchAdapter, head: Head, labels: list[str]) -> None:
        super().__init__()
        self.adapter = adapter
        self.head = head
        self.labels = list(labels)
        #: manifest entry without banks: strategy/head plugin_refs, labels, provenance, metrics
        self.entry: dict[str, Any] = {"labels": self.labels}

    def forward(self, trunk: TrunkOutput) -> Tensor:
        return self.head(self.adapter(trunk))  # (B, num_labels)

    @torch.inference_mode()
    def predict(self, trunk: TrunkOutput) -> list[Prediction]:
        return self.decode(self(trunk))

    def decode(self, logits: Tensor) -> list[Prediction]:
        """This branch's logits (B, L) -> one Prediction per row."""
        return self.head.decode(self.head.probabilities(logits), self.labels)


def shared_base_layers(modules: Iterable[Branch]) -> int:
    """How many base layers below the last the shared pass must carry for ``modules``: the
    most any of them reads (each takes its own last ``n``, so the others do not change it)."""
    return max((int(getattr(m.adapter, "base_layers", 0)) for m in modules), default=0)
