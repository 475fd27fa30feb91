"""Per-row branches: one shared trunk pass for a batch whose rows ask for different branches.

Each row names one branch (or several). The shared trunk runs once over the whole batch;
each branch's tail runs only on its rows (the trunk output's rows are selected). A branch
whose adapter lives inside the base encoder (``needs_base_pass``) runs its own base + trunk
pass over its rows only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from scaler_wizard.branch import Branch, Prediction, TrunkOutput, shared_base_layers
from scaler_wizard.errors import RowBranchesError

if TYPE_CHECKING:
    from scaler_wizard.modeling.model import ScalerModel

RowBranches = Sequence[str | Sequence[str]]


@dataclass
class RowRoutes:
    """Which rows each branch runs on, branches in first-use order."""

    rows: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, row_branches: RowBranches, n_rows: int) -> RowRoutes:
        if isinstance(row_branches, str):
            raise RowBranchesError("row_branches takes one branch name per row, not one string")
        entries = list(row_branches)
        if len(entries) != n_rows:
            raise RowBranchesError(f"row_branches has {len(entries)} entries for {n_rows} rows")
        routes: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            names = [entry] if isinstance(entry, str) else list(entry)
            if not names:
                raise RowBranchesError(f"row {i} names no branch")
            for name in dict.fromkeys(names):
                if not isinstance(name, str):
                    raise RowBranchesError(f"row {i}: branch names are strings, not {type(name).__name__}")
                routes.setdefault(name, []).append(i)
        return cls(routes)


def select_rows(trunk: TrunkOutput, rows: Tensor) -> TrunkOutput:
    """The trunk output of ``rows`` only (``aux_loss`` and ``stats`` stay the batch's)."""
    return TrunkOutput(
        pooled=trunk.pooled.index_select(0, rows),
        hidden=trunk.hidden.index_select(0, rows),
        mask=trunk.mask.index_select(0, rows),
        aux_loss=trunk.aux_loss,
        stats=trunk.stats,
        base_layers=tuple(layer.index_select(0, rows) for layer in trunk.base_layers),
    )


def run_rows(
    model: ScalerModel, routes: RowRoutes, modules: Mapping[str, Branch], batch: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor], TrunkOutput | None]:
    """(logits per branch for its rows, row indices per branch, the shared trunk output or
    None when no branch used it)."""
    device = batch["input_ids"].device
    shared_needed = any(not modules[n].adapter.needs_base_pass for n in routes.rows)
    lower = shared_base_layers(modules[n] for n in routes.rows if not modules[n].adapter.needs_base_pass)
    shared = model.encode_batch(batch, base_layers=lower) if shared_needed else None
    logits: dict[str, Tensor] = {}
    indices: dict[str, Tensor] = {}
    for name, rows in routes.rows.items():
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        module = modules[name]
        if module.adapter.needs_base_pass:
            sub = {k: v.index_select(0, idx) for k, v in batch.items()}
            logits[name] = module(
                model.encode_batch(sub, adapter=name, base_layers=module.adapter.base_layers)
            )
        else:
            assert shared is not None
            logits[name] = module(select_rows(shared, idx))
        indices[name] = idx
    return logits, indices, shared


def length_order(texts: Sequence[str]) -> list[int]:
    """Indices of ``texts`` from shortest to longest (stable): batches of neighbours in length
    pad little (sentence-transformers' ``encode`` does the same). Characters stand in for tokens."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


def in_given_order(items: Sequence[Prediction], order: Sequence[int]) -> list[Prediction]:
    """Undo :func:`length_order`: ``items[k]`` answers text ``order[k]``."""
    out = list(items)
    for k, i in enumerate(order):
        out[i] = items[k]
    return out


def predict_routed(
    model: ScalerModel, texts: Sequence[str], row_branches: RowBranches, batch_size: int
) -> list[dict[str, Prediction]]:
    """For each text, ``{branch: Prediction}`` for the branches its row names (batches of
    neighbours in length, as ``predict``; answers in the order given)."""
    if isinstance(texts, str):
        raise TypeError("predict_rows() takes a list of texts, not one string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"predict_rows() takes texts as strings, not {type(bad).__name__}")
    routes = RowRoutes.of(row_branches, len(texts))
    modules = {n: model.branch(n) for n in routes.rows}  # loaded outside inference mode
    entries = list(row_branches)
    order = length_order(texts)
    out: list[dict[str, Prediction]] = [{} for _ in texts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                picked = order[start : start + batch_size]
                chunk = [texts[i] for i in picked]
                chunk_routes = RowRoutes.of([entries[i] for i in picked], len(chunk))
                batch = model.base.tokenize(chunk, model.device)
                logits, indices, _ = run_rows(model, chunk_routes, modules, batch)
                for name, idx in indices.items():
                    for row, pred in zip(idx.tolist(), modules[name].decode(logits[name]), strict=True):
                        out[picked[row]][name] = pred
    finally:
        model.train(was_training)
    return out
