"""A ``scaler train`` run's data: each branch's rows and targets, and the mixed batches."""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from scaler_wizard.caches.base_states import TokenStates
from scaler_wizard.caches.token_features import pad_and_mask
from scaler_wizard.modeling.base_encoder import BaseEncoder
from scaler_wizard.training.config import BranchSpec, TrainConfig
from scaler_wizard.training.data import LabelledData, load_train_eval
from scaler_wizard.training.targets import label_targets

#: How ``scaler train``'s label errors name the labels a file's labels must be among.
KNOWN_AS = "among the branch's labels"


@dataclass
class BranchData:
    name: str
    spec: BranchSpec
    labels: list[str]
    full: LabelledData
    train: LabelledData
    eval: LabelledData
    train_y: Tensor
    eval_y: Tensor
    train_states: TokenStates | None = None
    eval_states: TokenStates | None = None


def load_branch_data(spec: BranchSpec, labels: list[str] | None, config: TrainConfig) -> BranchData:
    full, train, evald = load_train_eval(
        spec.data,
        text_column=spec.text_column,
        label_column=spec.label_column,
        eval_path=spec.eval_data,
        eval_split=config.eval_split,
        seed=config.seed,
    )
    if len(evald) > config.eval_max_rows:
        keep = sorted(random.Random(config.seed).sample(range(len(evald)), config.eval_max_rows))
        evald = LabelledData(
            [evald.texts[i] for i in keep],
            [evald.labels[i] for i in keep],
            {**evald.source, "rows": len(keep), "sampled": config.eval_max_rows},
        )
    labels = labels or full.label_names()
    return BranchData(
        name=spec.name,
        spec=spec,
        labels=labels,
        full=full,
        train=train,
        eval=evald,
        train_y=label_targets(train, labels, str(spec.data), known_as=KNOWN_AS),
        eval_y=label_targets(evald, labels, str(spec.eval_data or spec.data), known_as=KNOWN_AS),
    )


class MixedDataset(torch.utils.data.Dataset[tuple[int, int]]):
    """Global index over the concatenated training sets -> (branch index, row)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> tuple[int, int]:
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - self.offsets[k]


class Collate:
    """Rows -> a batch: cached base states (padded) or tokenised texts, branch ids, targets."""

    def __init__(self, parts: Sequence[BranchData], base: BaseEncoder, *, cached: bool) -> None:
        self.parts = parts
        self.base = base
        self.cached = cached

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, Tensor]:
        branch = torch.tensor([k for k, _ in items], dtype=torch.long)
        target = torch.stack([self.parts[k].train_y[i] for k, i in items])
        if self.cached:
            flat_parts = [self.parts[k].train_states for k, _ in items]
            rows = [s.example(i) for s, (_, i) in zip(flat_parts, items, strict=True) if s is not None]
            states, mask = pad_and_mask(rows)  # (B, T, d), (B, T)
            return {"states": states, "mask": mask, "branch": branch, "target": target}
        texts = [self.parts[k].train.texts[i] for k, i in items]
        batch = self.base.tokenize(texts)
        return {**batch, "branch": branch, "target": target}
