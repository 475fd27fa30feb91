"""Label names -> class indices: the targets both ``branch add`` and ``train`` learn."""

from __future__ import annotations

import torch
from torch import Tensor

from scaler_wizard.errors import DataError
from scaler_wizard.training.data import LabelledData


def label_targets(data: LabelledData, labels: list[str], where: str, *, known_as: str) -> Tensor:
    """The (N,) long tensor of each row's index in ``labels``. A label outside ``labels`` is a
    DataError naming the file (``where``) and at most five such labels; ``known_as`` names
    the label list in that message (e.g. "the branch's labels")."""
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({lab for lab in data.labels if lab not in index})
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not {known_as} {labels}")
    return torch.tensor([index[lab] for lab in data.labels], dtype=torch.long)
