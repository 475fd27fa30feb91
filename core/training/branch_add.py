"""``scaler branch add``: train a new branch on a labelled file and register it as a new version.

Nothing already in the model is touched: existing branches are never even loaded, so their
manifest entries and banks are carried over byte for byte.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.branch import Branch
from scaler_wizard.caches.features import cached_features, feature_kind
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.compose import compose, new_branch, save_version, trunk_id
from scaler_wizard.modeling.fingerprint import fingerprint_of, probe_logits
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.modeling.saving import TrainedRecord
from scaler_wizard.names import validate_name
from scaler_wizard.plugin_manager import get_registry
from scaler_wizard.training.branch_fit import (
    EPOCHS_IN_ENCODER,
    BranchTrainingConfig,
    TrainingResult,
    default_epochs,
    early_stop_note,
    fit,
    small_data,
    train_branch,
)
from scaler_wizard.training.clock import utc_stamp
from scaler_wizard.training.data import LabelledData, load_train_eval
from scaler_wizard.training.preflight import preflight_branch
from scaler_wizard.training.provenance import branch_metrics, branch_provenance, fit_record
from scaler_wizard.training.targets import label_targets


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
DEFAULT_STRATEGY = "attn-mix"
#: How ``branch add``'s label errors name the labels an eval file's labels must be among.
KNOWN_AS = "in the training labels"


def _epochs_total(training: BranchTrainingConfig, n_train: int, n_eval: int) -> int:
    """Epochs the run will do at most (early stopping may end it sooner), for a progress total."""
    if training.max_steps is None:
        return int(training.epochs or default_epochs(n_eval))
    return max(1, -(-training.max_steps // max(1, -(-n_train // training.batch_for(n_train)))))


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
    plugins: dict[str, Any] = {
        "strategy": strategy,
        "strategy_config": strategy_config,
        "head": head,
        "head_config": head_config,
    }
    _check_request(store, model_name, branch_name, **plugins)
    rows = _read_data(store, model_name, branch_name, data, training, plugins, progress_factory)
    note(
        "data",
        {
            "train": len(rows.train),
            "eval": len(rows.eval),
            "labels": rows.labels,
            "counts": rows.full.counts(),
            "warnings": rows.full.warnings + rows.eval.warnings,  # printed by the CLI (item 19)
        },
    )

    small = small_data_config(strategy, strategy_config, len(rows.eval))
    if small:  # recorded in the manifest like any config; the user's own fields win
        plugins["strategy_config"] = {**(strategy_config or {}), **small}
        note("small_data_config", {"strategy": strategy, "config": small})

    model = compose(store, model_name)
    assert model.origin is not None
    tid = trunk_id(model.origin.manifest)
    hidden = model.trunk_hidden_size()
    torch.manual_seed(training.seed)  # the new branch's initial weights follow --seed too
    branch = new_branch(hidden_size=hidden, labels=rows.labels, **plugins)
    log_dir = (log_root or store.root / "runs") / model_name / f"{branch_name}-{utc_stamp()}-{os.getpid()}"
    model.trunk.requires_grad_(False)  # frozen during branch add, whatever the strategy
    if branch.adapter.needs_base_pass:
        # The adapter lives inside the encoder: no cache is possible, train end to end.
        training = replace(training, epochs=training.epochs or EPOCHS_IN_ENCODER)
        _note_training(note, training, rows)
        model.add_branch(branch_name, branch)
        feature_seconds, cached = 0.0, False
        result = _train_in_encoder(
            model,
            branch_name,
            branch,
            rows.train,
            rows.train_y,
            rows.eval,
            rows.eval_y,
            training,
            log_dir,
            note,
        )
    else:
        training = replace(training, epochs=training.epochs or default_epochs(len(rows.eval)))
        _note_training(note, training, rows)
        result, feature_seconds, cached = _train_on_features(
            store, model, tid, branch, rows, training, log_dir, note, progress_factory
        )
        model.add_branch(branch_name, branch)

    record = TrainedRecord(
        trunk=tid,
        metrics=branch_metrics(result.eval_metrics, len(rows.eval)),
        provenance=branch_provenance(rows.full, rows.train, rows.eval, fit_record(training, result)),
        fingerprint=fingerprint_of(probe_logits(model, [branch_name])[branch_name]),
    )
    manifest_hash = save_version(
        store, model, message=f"add branch {branch_name}", records={branch_name: record}
    )
    saved = store.manifest(manifest_hash)  # (issue 10 #11) rebased saves keep model.origin
    return BranchAddResult(
        model=model_name,
        branch=branch_name,
        manifest=manifest_hash,
        version=saved.version,
        labels=rows.labels,
        metrics=result.eval_metrics,
        training=result,
        feature_seconds=feature_seconds,
        features_cached=cached,
        log_dir=log_dir,
    )


@dataclass
class _Rows:
    """The labelled data of a ``branch add``: the whole file, its train and eval splits, the
    label names and each split's targets."""

    full: LabelledData
    train: LabelledData
    eval: LabelledData
    labels: list[str]
    train_y: torch.Tensor
    eval_y: torch.Tensor


def small_data_config(strategy: str, given: dict[str, Any] | None, eval_rows: int) -> dict[str, Any]:
    """On small data (:func:`~scaler_wizard.training.branch_fit.small_data`), the strategy's own
    small-data defaults for the fields ``given`` does not set: a ``small_data`` mapping on its
    config dataclass (public plugin API; ``attn-mix`` / ``attn-mlp``: a narrow MLP). ``{}``
    otherwise."""
    if not small_data(eval_rows):
        return {}
    config = get_registry().get("strategy", strategy).config
    defaults = getattr(config, "small_data", None) if isinstance(config, type) else None
    if not isinstance(defaults, dict):
        return {}
    return {k: v for k, v in defaults.items() if k not in (given or {})}


def _check_request(
    store: ContentStore,
    model_name: str,
    branch_name: str,
    *,
    strategy: str,
    strategy_config: dict[str, Any] | None,
    head: str,
    head_config: dict[str, Any] | None,
) -> None:
    """The name, the plugins and their configs, and a branch of that name not there yet:
    all checked before any data is read."""
    validate_name(branch_name, what="branch")
    registry = get_registry()
    registry.get("strategy", strategy, where="--strategy").build_config(
        strategy_config, where="strategy.config"
    )
    registry.get("head", head, where="--head").build_config(head_config, where="head.config")
    existing = store.manifest(store.resolve(model_name)).branches
    if branch_name in existing:
        raise ScalerError(
            f"model {model_name!r} already has a branch {branch_name!r} "
            f"(remove it first with `scaler branch remove {model_name} {branch_name}`, or pick another name)"
        )


def _read_data(
    store: ContentStore,
    model_name: str,
    branch_name: str,
    data: DataSpec,
    training: BranchTrainingConfig,
    plugins: dict[str, Any],
    progress_factory: Callable[[str, int], Callable[[int], None]] | None,
) -> _Rows:
    """Read and split the data, check the new manifest would be valid, and index the labels."""
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
    preflight_branch(store.manifest(store.resolve(model_name)), branch_name, labels=labels, **plugins)
    # -- end preflight --
    train_y = label_targets(train_data, labels, str(data.path), known_as=KNOWN_AS)
    eval_y = label_targets(eval_data, labels, str(data.eval_path or data.path), known_as=KNOWN_AS)
    return _Rows(full, train_data, eval_data, labels, train_y, eval_y)


def _note_training(note: Reporter, training: BranchTrainingConfig, rows: _Rows) -> None:
    note(
        "training",
        {
            "epochs": _epochs_total(training, len(rows.train), len(rows.eval)),  # progress total
            "early_stop": early_stop_note(training, len(rows.eval)),  # (issue 12) "" when on
        },
    )


def _train_on_features(
    store: ContentStore,
    model: ScalerModel,
    tid: str,
    branch: Branch,
    rows: _Rows,
    training: BranchTrainingConfig,
    log_dir: Path,
    note: Reporter,
    progress_factory: Callable[[str, int], Callable[[int], None]] | None,
) -> tuple[TrainingResult, float, bool]:
    """(result, seconds spent on features, whether they came from the cache): the trunk's
    features of every row (cached), then the branch trained on them alone."""
    t0 = time.perf_counter()
    texts = rows.train.texts + rows.eval.texts
    progress = progress_factory("trunk features", len(texts)) if progress_factory else None
    # (issue 12) the features the strategy declares: pooled rows, or cached token states
    kind = feature_kind(branch.adapter)
    feats, cached = cached_features(
        store, model, tid, texts, kind=kind, progress=progress, base_layers=branch.adapter.base_layers
    )
    feature_seconds = time.perf_counter() - t0
    note("features", {"seconds": feature_seconds, "cached": cached, "rows": len(texts)})
    train_x, eval_x = feats[: len(rows.train)], feats[len(rows.train) :]
    torch.manual_seed(training.seed)
    result = train_branch(
        branch,
        train_x,
        rows.train_y,
        eval_x,
        rows.eval_y,
        training,
        log_dir=log_dir,
        on_epoch=lambda r: note("epoch", r),
    )
    return result, feature_seconds, cached
