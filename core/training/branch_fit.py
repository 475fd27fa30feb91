"""Train one branch (adapter + head) on cached trunk features; everything else stays frozen."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from scaler_wizard.branch import Branch, Head, TrunkOutput
from scaler_wizard.caches.bound_cache import require_finite
from scaler_wizard.caches.feature_shards import Rows, rows_tensor
from scaler_wizard.caches.token_features import TokenRows
from scaler_wizard.errors import ScalerError
from scaler_wizard.training.metrics import classification_metrics
from scaler_wizard.training.schedule import warmup_linear_schedule

#: Default epochs when none are given: cheap on cached features, costly for in-encoder adapters.
#: On cached features 20 when an eval split chooses the epoch (the linear decay then reaches a
#: low rate before early stopping would end the run: with smoothing, TREC +0.3 to +1.6 points
#: and SMS +0.1 to +0.4 against 40, session 23), 40 on small data (a few steps an epoch).
EPOCHS_CACHED = 20
EPOCHS_SMALL_DATA = 40
EPOCHS_IN_ENCODER = 3
#: Fewer eval rows than this cannot tell epochs apart (one row is >2% of accuracy): no early
#: stopping, and the last epoch's weights are kept rather than the luckiest epoch's.
MIN_EVAL_ROWS = 50
#: Classes are "skewed" when the largest has this many times the rows of the smallest.
SKEW_RATIO = 3.0


#: label smoothing when an epoch can be chosen on the eval split: TREC +0.9 points over six
#: seeds in a probe, +1.0 over three in bench_quality (docs/status.md, session 23)
DEFAULT_SMOOTHING = 0.1

#: which epoch's weights ``branch add`` saves (``BranchTrainingConfig.keep``)
KEEP = ("last", "best")
#: epochs without a better eval score before early stopping, when none is given
DEFAULT_PATIENCE = 8

#: ``branch add``'s batch size on enough data, and the smallest it picks on small data
DEFAULT_BATCH, MIN_AUTO_BATCH = 64, 8


@dataclass
class BranchTrainingConfig:
    """Recipe for ``branch add`` (defaults from the source documents where they give one)."""

    epochs: int | None = None  # None: 20 on cached features (40 on small data), 3 in-encoder
    max_steps: int | None = None
    #: None: 64, or on small data fewer rows a batch (at least 8) so an epoch is >= 8 steps
    batch_size: int | None = None
    lr_adapter: float = 5e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500  # capped at 10% of the run's steps
    grad_clip: float = 1.0
    #: early stopping: epochs without a better eval score before stopping (None: 8). Giving
    #: one asks for the best eval epoch (``keep`` "best")
    patience: int | None = None
    #: None: on when the best eval epoch is kept; False: run every epoch (the best eval epoch
    #: is still what is kept with ``keep`` "best")
    early_stop: bool | None = None
    #: which epoch's weights are saved: "last" (the end of the decayed schedule) or "best" (the
    #: best eval macro-F1, with early stopping). None: "best" when a patience or early stopping
    #: is asked for, else "last" — over four seeds the last epoch scored TREC 94.64% where the
    #: epoch picked on 437 eval rows scored 94.11% (docs/status.md, session 24). Small data
    #: (an eval split under MIN_EVAL_ROWS) always keeps the last
    keep: str | None = None
    class_balance: bool | None = None  # None: weight the loss by class when classes are skewed
    #: label smoothing of the cross-entropy (single-label heads that use the built-in loss; a
    #: head with a loss of its own keeps it). None: DEFAULT_SMOOTHING, or 0 on small data (an
    #: eval split under MIN_EVAL_ROWS), where it cost 1-4 points on 8 rows a class
    label_smoothing: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.keep not in (None, *KEEP):
            raise ScalerError(f"keep must be one of {', '.join(KEEP)}, not {self.keep!r}")
        if self.keep == "last" and (self.patience is not None or self.early_stop):
            raise ScalerError(
                "early stopping (a patience) keeps the best eval epoch: it cannot go with keep 'last'"
            )

    def batch_for(self, n_train: int) -> int:
        """The batch size for ``n_train`` training rows: the one given, else 64, or on small
        data ``max(8, n_train // 8)`` (a few-shot set of 48 rows trains 6 steps an epoch,
        not 1)."""
        if self.batch_size is not None:
            return self.batch_size
        return min(DEFAULT_BATCH, max(MIN_AUTO_BATCH, n_train // 8))


@dataclass
class TrainingResult:
    steps: int
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    #: which weights were saved: "last" (the schedule's last epoch) or "best" (best eval epoch)
    kept: str = "last"
    #: why early stopping was off, if it was ("" when it was on)
    early_stop_note: str = ""
    class_weights: list[float] | None = None
    #: the label smoothing the loss used (0.0 where the head's own loss was kept)
    label_smoothing: float = 0.0
    #: the batch size the run used (``BranchTrainingConfig.batch_for``)
    batch_size: int = 0


def _features(x: Tensor) -> TrunkOutput:
    empty = x.new_zeros(())
    return TrunkOutput(pooled=x, hidden=empty, mask=empty.bool(), aux_loss=empty)


#: Cached trunk outputs: pooled rows, or token states (strategies with ``features = "tokens"``).
Features = Union[Rows, TokenRows]  # noqa: UP007 (a runtime alias)


def _trunk_rows(feats: Features, lo: int, hi: int) -> TrunkOutput:
    if isinstance(feats, TokenRows):
        return feats.batch(torch.arange(lo, min(hi, len(feats))))
    return _features(rows_tensor(feats, lo, hi))


def _trunk_batch(feats: Features, idx: Tensor) -> TrunkOutput:
    if isinstance(feats, TokenRows):
        return feats.batch(idx)
    return _features(feats[idx])


@torch.no_grad()
def predict_logits(branch: Branch, feats: Features, batch_size: int = 1024) -> Tensor:
    was = branch.training
    branch.eval()
    if isinstance(feats, TokenRows):
        batch_size = min(batch_size, 256)  # padded token states: keep each batch small
    out = torch.cat([branch(_trunk_rows(feats, i, i + batch_size)) for i in range(0, len(feats), batch_size)])
    branch.train(was)
    return out


def train_branch(
    branch: Branch,
    train_x: Features,
    train_y: Tensor,
    eval_x: Features,
    eval_y: Tensor,
    config: BranchTrainingConfig,
    *,
    log_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainingResult:
    """Train on cached trunk features (the fast path: no encoder in the loop)."""
    # The matmuls here are tiny: more intra-op threads only add synchronisation, which on a
    # busy machine made each step ~20x slower (2 CPUs: 125 steps 6-10 s vs 0.4 s on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(
            branch,
            n_train=len(train_x),
            train_y=train_y,
            eval_y=eval_y,
            batch_logits=lambda idx: branch(_trunk_batch(train_x, idx)),
            eval_logits=lambda: predict_logits(branch, eval_x),
            adapter_params=[p for p in branch.adapter.parameters() if p.requires_grad],
            config=config,
            log_dir=log_dir,
            on_epoch=on_epoch,
        )
    finally:
        torch.set_num_threads(threads)


def fit(
    branch: Branch,
    *,
    n_train: int,
    train_y: Tensor,
    eval_y: Tensor,
    batch_logits: Callable[[Tensor], Tensor],
    eval_logits: Callable[[], Tensor],
    adapter_params: list[torch.nn.Parameter],
    config: BranchTrainingConfig,
    log_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainingResult:
    """The loop: AdamW (adapter/head learning rates), warm-up then linear decay, grad clip.
    The last epoch's weights are kept (:func:`kept_epoch`), or with ``config.keep`` "best" the
    best eval macro-F1 epoch's, with early stopping (``config.patience``; off with
    ``config.early_stop`` False); an eval split under ``MIN_EVAL_ROWS`` rows always keeps the
    last. Skewed classes get a class-balanced loss (heads using the default cross-entropy;
    ``config.class_balance``).

    ``batch_logits(indices)`` gives training logits (with grad) for those training rows,
    ``eval_logits()`` the logits of every eval row.
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    run = _Fit(branch, adapter_params, config, n_train=n_train, train_y=train_y, eval_y=eval_y)
    writer = _tensorboard(log_dir)
    jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8") if log_dir else None
    try:
        while run.step < run.total:
            losses = run.epoch(gen, batch_logits, writer)
            record = run.evaluate(eval_logits, losses)
            if writer:
                writer.add_scalar("eval/accuracy", record["eval_accuracy"], run.step)
                writer.add_scalar("eval/macro_f1", record["eval_macro_f1"], run.step)
            if jsonl:
                jsonl.write(json.dumps(record) + "\n")
                jsonl.flush()
            if on_epoch:
                on_epoch(record)
            if run.should_stop(record):
                break
    finally:
        if writer:
            writer.close()
        if jsonl:
            jsonl.close()
    return run.finish(eval_logits)


class _Fit:
    """The state of one :func:`fit`: optimizer, schedule, loss, and the best epoch so far."""

    def __init__(
        self,
        branch: Branch,
        adapter_params: list[torch.nn.Parameter],
        config: BranchTrainingConfig,
        *,
        n_train: int,
        train_y: Tensor,
        eval_y: Tensor,
    ) -> None:
        self.branch, self.config, self.n, self.train_y, self.eval_y = branch, config, n_train, train_y, eval_y
        head_params = [p for p in branch.head.parameters() if p.requires_grad]
        pairs = [(adapter_params, config.lr_adapter), (head_params, config.lr_head)]
        groups: list[dict[str, Any]] = [{"params": ps, "lr": lr} for ps, lr in pairs if ps]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.params = adapter_params + head_params
        self.batch = config.batch_for(n_train)
        per_epoch = math.ceil(n_train / self.batch)
        self.total = (
            per_epoch * (config.epochs or default_epochs(len(eval_y)))
            if config.max_steps is None
            else config.max_steps
        )
        warmup = min(config.warmup_steps, max(1, self.total // 10))
        self.scheduler = warmup_linear_schedule(self.optimizer, warmup, self.total)
        self.best_score: tuple[float, float] | None = None
        self.best_state: list[Tensor] | None = None
        self.best_epoch, self.bad_epochs, self.step, self.epoch_no = 0, 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.labels = list(branch.labels)
        self.kept = kept_epoch(config, len(eval_y))
        self.patience = config.patience or DEFAULT_PATIENCE
        self.stop_note = early_stop_note(config, len(eval_y))
        asked = config.label_smoothing
        if asked is None:
            asked = 0.0 if small_data(len(eval_y)) else DEFAULT_SMOOTHING
        self.smoothing = applied_smoothing(branch.head, asked)
        self.loss_fn, self.class_weights = balanced_loss(
            branch, train_y, len(self.labels), config.class_balance, label_smoothing=self.smoothing
        )

    def epoch(
        self, gen: torch.Generator, batch_logits: Callable[[Tensor], Tensor], writer: Any
    ) -> list[float]:
        """One pass over the shuffled training rows (or what is left of the step budget)."""
        config = self.config
        self.epoch_no += 1
        self.branch.train()
        perm = torch.randperm(self.n, generator=gen)
        losses = []
        for start in range(0, self.n, self.batch):
            if self.step >= self.total:
                break
            idx = perm[start : start + self.batch]
            loss = self.loss_fn(batch_logits(idx), self.train_y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            losses.append(finite_loss(loss.item(), self.step))
            if writer:
                writer.add_scalar("train/loss", loss.item(), self.step)
                writer.add_scalar("train/grad_norm", float(gnorm), self.step)
        return losses

    def evaluate(self, eval_logits: Callable[[], Tensor], losses: list[float]) -> dict[str, Any]:
        """The epoch's record: its mean training loss and the eval scores; ``best`` says
        whether it is the epoch kept so far."""
        self.branch.eval()
        pred = eval_logits().argmax(-1)
        metrics = classification_metrics(self.eval_y.tolist(), pred.tolist(), self.labels)
        record = {
            "epoch": self.epoch_no,
            "step": self.step,
            "train_loss": sum(losses) / max(1, len(losses)),
            "eval_accuracy": metrics["accuracy"],
            "eval_macro_f1": metrics["macro_f1"],
            "lr_head": self.optimizer.param_groups[-1]["lr"],
            "elapsed_s": time.perf_counter() - self.started,
        }
        self.score = (metrics["macro_f1"], metrics["accuracy"])
        record["best"] = self.best_score is None or self.score > self.best_score  # the epoch kept so far
        record["kept"] = self.kept
        self.history.append(record)
        return record

    def should_stop(self, record: dict[str, Any]) -> bool:
        """Keep the epoch's weights if it is the best so far; True when patience runs out."""
        if record["best"]:
            self.best_score, self.best_epoch, self.bad_epochs = self.score, self.epoch_no, 0
            if self.kept == "best":
                self.best_state = [p.detach().clone() for p in self.params]
            return False
        self.bad_epochs += 1
        return not self.stop_note and self.bad_epochs >= self.patience

    def finish(self, eval_logits: Callable[[], Tensor]) -> TrainingResult:
        """Put back the kept weights, refuse non-finite ones, and score them."""
        if self.best_state is not None:
            with torch.no_grad():
                for p, best in zip(self.params, self.best_state, strict=True):
                    p.copy_(best)
        check_finite_weights(self.branch)
        self.branch.eval()
        pred = eval_logits().argmax(-1)
        final = classification_metrics(self.eval_y.tolist(), pred.tolist(), self.labels)
        return TrainingResult(
            steps=self.step,
            epochs_run=self.epoch_no,
            best_epoch=self.best_epoch,
            stopped_early=self.step < self.total,
            seconds=time.perf_counter() - self.started,
            history=self.history,
            eval_metrics=final,
            kept=self.kept,
            early_stop_note=self.stop_note,
            class_weights=self.class_weights,
            label_smoothing=self.smoothing,
            batch_size=self.batch,
        )


def small_data(eval_rows: int) -> bool:
    """``branch add``'s one rule for small data: an eval split too small to choose an epoch on
    (under :data:`MIN_EVAL_ROWS`). It keeps the last epoch, runs every epoch, plans
    :data:`EPOCHS_SMALL_DATA`, smooths no labels and takes the strategy's small-data config."""
    return eval_rows < MIN_EVAL_ROWS


def default_epochs(eval_rows: int) -> int:
    """Epochs on cached features when none are given: :data:`EPOCHS_CACHED` when ``eval_rows``
    can choose an epoch, :data:`EPOCHS_SMALL_DATA` on small data."""
    return EPOCHS_SMALL_DATA if small_data(eval_rows) else EPOCHS_CACHED


def kept_epoch(config: BranchTrainingConfig, eval_rows: int) -> str:
    """Which epoch's weights a run saves: "last" on small data and by default, "best" when
    asked for (``keep``) or implied (a patience, or early stopping asked for)."""
    if small_data(eval_rows):
        return "last"
    if config.keep is not None:
        return config.keep
    return "best" if config.patience is not None or config.early_stop else "last"


def early_stop_note(config: BranchTrainingConfig, eval_rows: int) -> str:
    """Why early stopping is off for this run ("" when it is on)."""
    if small_data(eval_rows):
        return (
            f"early stopping off: {eval_rows} eval rows are too few to decide on (fewer than "
            f"{MIN_EVAL_ROWS}); every epoch runs and the last epoch is kept"
        )
    if config.early_stop is False:
        return "early stopping off (--no-early-stop)"
    if kept_epoch(config, eval_rows) == "last":
        return "early stopping off: the whole schedule runs and its last epoch is kept (--keep best: the best eval epoch)"
    return ""


def applied_smoothing(head: Head, label_smoothing: float) -> float:
    """The label smoothing a run applies to ``head``: the one asked for where the head is
    single-label and uses the built-in cross-entropy (``Head.loss``), else 0 (a head with a
    loss of its own, or sigmoid targets, keeps its loss as written)."""
    if not 0.0 <= label_smoothing < 1.0 or not math.isfinite(label_smoothing):
        raise ScalerError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if head.multilabel or type(head).loss is not Head.loss:
        return 0.0
    return float(label_smoothing)


def balanced_loss(
    branch: Branch,
    train_y: Tensor,
    num_labels: int,
    balance: bool | None,
    *,
    label_smoothing: float = 0.0,
) -> tuple[Callable[[Tensor, Tensor], Tensor], list[float] | None]:
    """(loss function, class weights or None). Weights are inverse class frequencies (mean 1
    over the classes present), used when asked, or by default when the classes are skewed
    (largest / smallest >= SKEW_RATIO); single-label targets only. The head's own ``loss`` is
    still what is computed: once per class present in the batch, the results weighted by
    ``weight * rows`` (for a mean-reduced loss, exactly cross-entropy's ``weight=``).
    ``label_smoothing`` (from :func:`applied_smoothing`) > 0 replaces the built-in
    cross-entropy by its smoothed form."""
    head_loss: Callable[[Tensor, Tensor], Tensor] = (
        partial(F.cross_entropy, label_smoothing=label_smoothing) if label_smoothing > 0 else branch.head.loss
    )
    if balance is False or train_y.dim() != 1 or not len(train_y):
        return head_loss, None
    counts = torch.bincount(train_y, minlength=num_labels).float()
    present = counts[counts > 0]
    if balance is None and float(present.max()) < SKEW_RATIO * float(present.min()):
        return head_loss, None
    weights = torch.where(counts > 0, counts.sum() / (len(present) * counts.clamp(min=1)), 0.0)

    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        total, norm = logits.new_zeros(()), 0.0
        for c in torch.unique(targets).tolist():
            rows = targets == c
            share = float(weights[c]) * int(rows.sum())
            total = total + share * head_loss(logits[rows], targets[rows])
            norm += share
        return total / norm

    return loss, [round(float(w), 4) for w in weights]


def finite_loss(value: float, step: int) -> float:
    if not math.isfinite(value):
        raise ScalerError(
            f"training diverged: the loss is {value} at step {step}; nothing saved "
            "(check the data, or lower the learning rate)"
        )
    return value


def check_finite_weights(module: torch.nn.Module, what: str = "the new branch") -> None:
    """Refuse weights holding NaN or infinity before anything is saved."""
    for name, p in module.named_parameters():
        require_finite(p, f"{what}: weight {name}")


def _tensorboard(log_dir: Path | None) -> Any:
    if log_dir is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the JSONL log is always written
        return None
    return SummaryWriter(str(log_dir))


def config_dict(config: BranchTrainingConfig) -> dict[str, Any]:
    return asdict(config)
