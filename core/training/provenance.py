"""What a branch entry records about how the branch was trained: one builder for ``branch
add`` and ``scaler train``, so both write the same fields in the same order.

A trained branch's entry gets ``metrics`` (:func:`branch_metrics`) and ``provenance``
(:func:`branch_provenance`): the data file (path, sha256, rows), the split, the label
counts, the library and torch versions, and under ``training`` what the command records
about its run (:func:`fit_record` for ``branch add``, :func:`train_run_record` for
``scaler train``). Both hand them to the save as a
:class:`~scaler_wizard.modeling.saving.TrainedRecord` (:func:`trained_record` for
``scaler train``); no entry is edited in place.
"""

from __future__ import annotations

from typing import Any

import torch

from scaler_wizard.modeling.saving import TrainedRecord
from scaler_wizard.training.batches import BranchData
from scaler_wizard.training.branch_fit import BranchTrainingConfig, TrainingResult, config_dict
from scaler_wizard.training.data import LabelledData
from scaler_wizard.versions.builder import CURRENT_LIBRARY

STALE_REASON = (
    "the trunk was retrained by `scaler train` without this branch (--allow-stale-branches); "
    "its outputs have changed since its metrics and fingerprint were recorded"
)


def branch_metrics(metrics: dict[str, Any], eval_rows: int, *, loss: float | None = None) -> dict[str, Any]:
    """The entry's ``metrics``: accuracy, macro-F1, the eval loss (``train`` records it),
    the eval row count, per-class scores and the confusion matrix."""
    out: dict[str, Any] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    if loss is not None:
        out["eval_loss"] = loss
    out.update(
        {
            "eval_rows": eval_rows,
            "per_class": metrics["per_class"],
            "confusion_matrix": metrics["confusion_matrix"],
        }
    )
    return out


def branch_provenance(
    full: LabelledData, train: LabelledData, evald: LabelledData, training: dict[str, Any]
) -> dict[str, Any]:
    """The entry's ``provenance``: the data, the split, the label counts, ``training`` (the
    command's own record of the run) and the library and torch versions."""
    return {
        "data": full.source,
        "train_rows": len(train),
        "eval": evald.source,
        "label_counts": full.counts(),
        "training": training,
        "library": CURRENT_LIBRARY.to_dict(),
        "torch": torch.__version__,
    }


def fit_record(config: BranchTrainingConfig, result: TrainingResult) -> dict[str, Any]:
    """``provenance.training`` of a ``branch add``: the recipe and what the run did."""
    return {
        **config_dict(config),
        "batch_size": result.batch_size or config.batch_size,  # the size used (auto on small data)
        "steps": result.steps,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "kept": result.kept,  # (issue 12) "last" epoch of the schedule, or the "best" eval epoch
        "class_weights": result.class_weights,
        "label_smoothing": result.label_smoothing,  # the one applied (0.0: the head's own loss)
        "seconds": round(result.seconds, 3),
    }


def train_run_record(
    *,
    run: str,
    start_manifest: str,
    plan_sha256: str,
    config: dict[str, Any],
    steps: int,
    seed: int,
    processes: int,
    data: dict[str, str],
    seconds: float,
    tokens: float,
) -> dict[str, Any]:
    """``provenance.training`` of a ``scaler train`` run (shared by every branch it trained;
    ``plan_sha256`` and ``start_manifest`` let ``--resume`` recognise the version it saved)."""
    return {
        "command": "scaler train",
        "run": run,
        "start_manifest": start_manifest,
        "plan_sha256": plan_sha256,
        "steps": steps,
        "seed": seed,
        "processes": processes,
        "config": config,
        "data": data,
        "seconds": round(seconds, 3),
        "tokens": int(tokens),
    }


def stale_record(*, since_version: int, run: str, trained_on_trunk: str) -> dict[str, Any]:
    """``provenance.stale`` of a branch a ``train`` run left behind: which version and run
    did, and the trunk the branch was trained on (``facts.mark_stale`` puts it in place)."""
    return {
        "since_version": since_version,
        "run": run,
        "trained_on_trunk": trained_on_trunk,
        "reason": STALE_REASON,
    }


def mark_stale(entry: dict[str, Any], *, since_version: int, run: str, old_trunk: str) -> dict[str, Any]:
    """A copy of a branch entry (a JSON object) a ``train`` run left behind, with
    :func:`stale_record` as its ``provenance.stale``."""
    old = dict(entry)
    prov = dict(old.get("provenance") or {})
    prov["stale"] = stale_record(
        since_version=since_version, run=run, trained_on_trunk=old.get("trunk", old_trunk)
    )
    old["provenance"] = prov
    return old


def trained_record(
    part: BranchData, metrics: dict[str, Any], run_record: dict[str, Any], fingerprint: dict[str, Any]
) -> TrainedRecord:
    """What the save records for a branch ``scaler train`` trained: its metrics, provenance
    and fingerprint, on the new trunk (its id is recorded when the manifest is built)."""
    return TrainedRecord(
        metrics=branch_metrics(metrics, len(part.eval), loss=metrics["loss"]),
        provenance=branch_provenance(part.full, part.train, part.eval, run_record),
        fingerprint=fingerprint,
    )
