"""``scaler branch add``: train a new branch on a labelled file and register it as a new version.

Nothing already in the model is touched: existing branches are never even loaded, so their
manifest entries and banks are carried over byte for byte.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.store import validate_name
from scaler_wizard.branch import Branch
from scaler_wizard.caches.features import cached_features, feature_kind
from scaler_wizard.errors import DataError, ScalerError
from scaler_wizard.modeling.compose import compose, new_branch, save_version, trunk_id
from scaler_wizard.modeling.fingerprint import fingerprint_of, probe_logits
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.plugin_manager import get_registry
from scaler_wizard.training.branch_fit import (
    EPOCHS_CACHED,
    EPOCHS_IN_ENCODER,
    BranchTrainingConfig,
    TrainingResult,
    config_dict,
    early_stop_note,
    fit,
    train_branch,
)
from scaler_wizard.training.data import LabelledData, load_train_eval
from scaler_wizard.training.preflight import preflight_branch
from scaler_wizard.version import __version__


@dataclass
class BranchAddResult:
    model: str
    branch: str
    manifest: BankHash
    version: int
    labels: list[str]
    metrics: dict[str, Any]
    training: TrainingResult
    feature_seconds: float
    features_cached: bool
    log_dir: Path


@dataclass
class DataSpec:
    path: Path
    text_column: str = "text"
    label_column: str = "label"
    eval_path: Path | None = None
    eval_split: float = 0.1


Reporter = Callable[[str, dict[str, Any]], None]
#: The CLI ``branch add``'s strategy when none is named (issue 12: attention pooling over cached
#: token states). The library's ``add_branch`` keeps ``"lora"`` as its default argument.
DEFAULT_STRATEGY = "attn-mlp"


def _targets(data: LabelledData, labels: list[str], where: str) -> torch.Tensor:
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({lab for lab in data.labels if lab not in index})
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not in the training labels {labels}")
    return torch.tensor([index[lab] for lab in data.labels], dtype=torch.long)


def _epochs_total(training: BranchTrainingConfig, n_train: int) -> int:
    """Epochs the run will do at most (early stopping may end it sooner), for a progress total."""
    if training.max_steps is None:
        return int(training.epochs or EPOCHS_CACHED)
    return max(1, -(-training.max_steps // max(1, -(-n_train // training.batch_size))))


def _train_in_encoder(
    model: ScalerModel,
    name: str,
    branch: Branch,
    train_data: LabelledData,
    train_y: torch.Tensor,
    eval_data: LabelledData,
    eval_y: torch.Tensor,
    training: BranchTrainingConfig,
    log_dir: Path,
    note: Reporter,
) -> TrainingResult:
    """Train a strategy whose adapter is inside the base: base + trunk run in every step."""
    torch.manual_seed(training.seed)

    def batch_logits(idx: torch.Tensor) -> torch.Tensor:
        batch = model.base.tokenize([train_data.texts[i] for i in idx.tolist()], model.device)
        return branch(model.encode_batch(batch, adapter=name, grad=True))

    @torch.no_grad()
    def eval_logits() -> torch.Tensor:
        out = []
        for start in range(0, len(eval_data), 64):
            batch = model.base.tokenize(eval_data.texts[start : start + 64], model.device)
            out.append(branch(model.encode_batch(batch, adapter=name)))
        return torch.cat(out)

    return fit(
        branch,
        n_train=len(train_data),
        train_y=train_y,
        eval_y=eval_y,
        batch_logits=batch_logits,
        eval_logits=eval_logits,
        adapter_params=branch.adapter.trainable_parameters(model.base, name),
        config=training,
        log_dir=log_dir,
        on_epoch=lambda r: note("epoch", r),
    )


def add_branch(
    store: ContentStore,
    model_name: str,
    branch_name: str,
    data: DataSpec,
    *,
    strategy: str = "lora",
    strategy_config: dict[str, Any] | None = None,
    head: str = "linear",
    head_config: dict[str, Any] | None = None,
    training: BranchTrainingConfig | None = None,
    log_root: Path | None = None,
    report: Reporter | None = None,
    progress_factory: Callable[[str, int], Callable[[int], None]] | None = None,
) -> BranchAddResult:
    """Check everything cheap first, then compute features, train, evaluate, save a version."""
    training = training or BranchTrainingConfig()
    note = report or (lambda _event, _info: None)
    validate_name(branch_name, what="branch")
    registry = get_registry()  # plugins and their configs are checked before any data is read
    registry.get("strategy", strategy, where="--strategy").build_config(
        strategy_config, where="strategy.config"
    )
    registry.get("head", head, where="--head").build_config(head_config, where="head.config")
    existing = store.get_manifest(store.resolve(model_name))["branches"]
    if branch_name in existing:
        raise ScalerError(
            f"model {model_name!r} already has a branch {branch_name!r} "
            f"(remove it first with `scaler branch remove {model_name} {branch_name}`, or pick another name)"
        )
    full, train_data, eval_data = load_train_eval(
        data.path,
        text_column=data.text_column,
        label_column=data.label_column,
        eval_path=data.eval_path,
        eval_split=data.eval_split,
        seed=training.seed,
        progress=progress_factory,  # (issue 10 item 19) "reading data" in bytes, from the first chunk
    )
    labels = full.label_names()
    # -- preflight (engineer D, issue 10 item 9): every manifest rule, before any training --
    preflight_branch(
        store.get_manifest(store.resolve(model_name)),
        branch_name,
        strategy=strategy,
        strategy_config=strategy_config,
        head=head,
        head_config=head_config,
        labels=labels,
    )
    # -- end preflight --
    train_y = _targets(train_data, labels, str(data.path))
    eval_y = _targets(eval_data, labels, str(data.eval_path or data.path))
    note(
        "data",
        {
            "train": len(train_data),
            "eval": len(eval_data),
            "labels": labels,
            "counts": full.counts(),
            "warnings": full.warnings + eval_data.warnings,  # printed by the CLI (item 19)
        },
    )

    model = compose(store, model_name)
    assert model.origin is not None
    tid = trunk_id(model.origin.manifest)
    hidden = model.trunk_hidden_size()
    torch.manual_seed(training.seed)  # the new branch's initial weights follow --seed too
    branch = new_branch(
        hidden_size=hidden,
        labels=labels,
        strategy=strategy,
        strategy_config=strategy_config,
        head=head,
        head_config=head_config,
    )
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log_dir = (log_root or store.root / "runs") / model_name / f"{branch_name}-{stamp}-{os.getpid()}"
    model.trunk.requires_grad_(False)  # frozen during branch add, whatever the strategy
    t0 = time.perf_counter()
    if branch.adapter.needs_base_pass:
        # The adapter lives inside the encoder: no cache is possible, train end to end.
        training = replace(
            training, epochs=training.epochs or EPOCHS_IN_ENCODER, patience=min(training.patience, 2)
        )
        note(
            "training",
            {
                "epochs": _epochs_total(training, len(train_data)),  # progress total
                "early_stop": early_stop_note(training, len(eval_data)),  # (issue 12) "" when on
            },
        )
        model.add_branch(branch_name, branch)
        feature_seconds, cached = 0.0, False
        result = _train_in_encoder(
            model, branch_name, branch, train_data, train_y, eval_data, eval_y, training, log_dir, note
        )
    else:
        training = replace(training, epochs=training.epochs or EPOCHS_CACHED)
        note(
            "training",
            {
                "epochs": _epochs_total(training, len(train_data)),  # progress total
                "early_stop": early_stop_note(training, len(eval_data)),  # (issue 12) "" when on
            },
        )
        texts = train_data.texts + eval_data.texts
        progress = progress_factory("trunk features", len(texts)) if progress_factory else None
        # (issue 12) the features the strategy declares: pooled rows, or cached token states
        kind = feature_kind(branch.adapter)
        feats, cached = cached_features(store, model, tid, texts, kind=kind, progress=progress)
        feature_seconds = time.perf_counter() - t0
        note("features", {"seconds": feature_seconds, "cached": cached, "rows": len(texts)})
        train_x, eval_x = feats[: len(train_data)], feats[len(train_data) :]
        torch.manual_seed(training.seed)
        result = train_branch(
            branch,
            train_x,
            train_y,
            eval_x,
            eval_y,
            training,
            log_dir=log_dir,
            on_epoch=lambda r: note("epoch", r),
        )
        model.add_branch(branch_name, branch)

    fp = fingerprint_of(probe_logits(model, [branch_name])[branch_name])
    branch.entry.update(
        {
            "trunk": tid,
            "metrics": {
                "accuracy": result.eval_metrics["accuracy"],
                "macro_f1": result.eval_metrics["macro_f1"],
                "eval_rows": len(eval_data),
                "per_class": result.eval_metrics["per_class"],
                "confusion_matrix": result.eval_metrics["confusion_matrix"],
            },
            "provenance": {
                "data": full.source,
                "train_rows": len(train_data),
                "eval": eval_data.source,
                "label_counts": full.counts(),
                "training": {
                    **config_dict(training),
                    "steps": result.steps,
                    "epochs_run": result.epochs_run,
                    "best_epoch": result.best_epoch,
                    "kept": result.kept,  # (issue 12) "best" eval epoch, or "last" on a tiny eval split
                    "class_weights": result.class_weights,
                    "seconds": round(result.seconds, 3),
                },
                "library": {"distribution": "scaler-wizard", "version": __version__},
                "torch": torch.__version__,
            },
            "fingerprint": fp,
        }
    )
    manifest_hash = save_version(store, model, message=f"add branch {branch_name}")
    saved = store.get_manifest(manifest_hash)  # (issue 10 #11) rebased saves keep model.origin
    return BranchAddResult(
        model=model_name,
        branch=branch_name,
        manifest=manifest_hash,
        version=int(saved["version"]),
        labels=labels,
        metrics=result.eval_metrics,
        training=result,
        feature_seconds=feature_seconds,
        features_cached=cached,
        log_dir=log_dir,
    )
