"""Optional task losses in ``scaler distill --branch NAME=FILE``: existing branches keep training
on their labelled data alongside the feature loss (``scaler train``'s pieces: its data split,
``MultiTaskModule`` and evaluation), so they stay on the new trunk instead of going stale."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scaler_wizard.banks import ContentStore
from scaler_wizard.branch import Branch, shared_base_layers
from scaler_wizard.caches.base_states import TokenStates, cached_states
from scaler_wizard.caches.token_features import pad_and_mask
from scaler_wizard.errors import DistillError
from scaler_wizard.modeling.fingerprint import fingerprint_of, probe_logits
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.modeling.saving import TrainedRecord
from scaler_wizard.training.batches import BranchData, load_branch_data
from scaler_wizard.training.config import BranchSpec, TrainConfig
from scaler_wizard.training.evaluate import evaluate
from scaler_wizard.training.multitask import MultiTaskModule
from scaler_wizard.training.provenance import trained_record
from scaler_wizard.training.sampler import derived_seed


@dataclass
class BranchTasks:
    parts: list[BranchData]
    module: MultiTaskModule

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]


def branch_lower(model: ScalerModel, specs: Sequence[BranchSpec]) -> int:
    """The base layers below the last the run's branches read (0 without branches)."""
    return shared_base_layers(model.branch(s.name) for s in specs) if specs else 0


def load_branch_tasks(
    store: ContentStore,
    model: ScalerModel,
    specs: Sequence[BranchSpec],
    *,
    seed: int,
    float16: bool,
    device: torch.device,
    phase: Callable[[str, int], Callable[[int], None]],
) -> BranchTasks | None:
    """Each ``--branch``'s data (split as ``scaler train`` splits it) and base states (cached)."""
    if not specs:
        return None
    assert model.origin is not None
    cfg = TrainConfig(seed=seed)
    branches: dict[str, Branch] = {}
    parts = []
    lower = branch_lower(model, specs)
    for spec in specs:
        if spec.name not in model.branch_names:
            raise DistillError(
                f"--branch {spec.name}: the model has no such branch (distil with existing branches; add new "
                "ones with `scaler branch add` or `scaler train`)"
            )
        branch = model.branch(spec.name)
        if branch.adapter.needs_base_pass or branch.head.multilabel:
            raise DistillError(
                f"--branch {spec.name}: its strategy or head cannot train on cached base states; retrain it "
                "with `scaler branch add` after distilling"
            )
        part = load_branch_data(spec, list(branch.labels), cfg)
        texts = part.train.texts + part.eval.texts
        states, _hit = cached_states(
            store,
            model.base,
            model.origin.base_entry,
            texts,
            float16=float16,
            device=device,
            progress=phase(f"base states: {spec.name}", len(texts)),
            lower=lower,
        )
        n = len(part.train)
        part.train_states = TokenStates(states.flat, states.offsets[: n + 1])
        part.eval_states = TokenStates(states.flat, states.offsets[n:])
        branches[spec.name] = branch
        parts.append(part)
    module = MultiTaskModule(model.trunk, branches, [p.name for p in parts])
    return BranchTasks(parts, module)


def branch_batch(tasks: BranchTasks, *, seed: int, step: int, batch_size: int) -> dict[str, Tensor]:
    """The step's task batch: ``batch_size`` rows of each branch, drawn from the step's seed."""
    rows, branch, target = [], [], []
    for k, part in enumerate(tasks.parts):
        g = torch.Generator().manual_seed(derived_seed(seed, "distill-branch", part.name, step))
        assert part.train_states is not None
        for i in torch.randperm(len(part.train), generator=g)[:batch_size].tolist():
            rows.append(part.train_states.example(i))
            branch.append(k)
            target.append(part.train_y[i])
    states, mask = pad_and_mask(rows)
    return {"states": states, "mask": mask, "branch": torch.tensor(branch), "target": torch.stack(target)}


def evaluate_branches(
    tasks: BranchTasks, model: ScalerModel, device: torch.device
) -> dict[str, dict[str, Any]]:
    return evaluate(tasks.module, tasks.parts, model.base, device)


def branch_records(
    tasks: BranchTasks, model: ScalerModel, final: dict[str, dict[str, Any]], run: dict[str, Any]
) -> dict[str, TrainedRecord]:
    """What the save records for each branch the run trained (on the new trunk)."""
    fps = probe_logits(model, tasks.names)
    return {p.name: trained_record(p, final[p.name], run, fingerprint_of(fps[p.name])) for p in tasks.parts}


__all__ = [
    "BranchTasks",
    "branch_batch",
    "branch_lower",
    "branch_records",
    "evaluate_branches",
    "load_branch_tasks",
]
