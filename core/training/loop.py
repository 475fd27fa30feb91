"""``scaler train``: multi-task training of the MoE trunk, gating, adapters and heads.

The base stays frozen (checked: no base parameter requires grad, and its bytes hash the same
after the run as before). Every batch mixes all the run's branches (temperature sampling,
``mixed_sampler``); the loss is the mean over the batch's examples of each example's own
branch loss, plus ``aux_loss_weight`` times the summed load-balancing losses of the MoE
layers. Runs on Hugging Face ``accelerate``: one process, or many under ``accelerate launch``
(gloo on CPU, NCCL on GPUs). Only the main process writes the run folder, the caches' files
it owns, the banks and the manifest.

**Stale branches.** Training the trunk changes every branch's outputs. A branch the run does
not train would silently start answering differently, so the run is refused while such
branches exist, unless ``allow_stale_branches``: then their banks are kept as they were, their
``trunk`` field keeps the trunk they were trained on (so it no longer matches the model's), and
their ``provenance.stale`` says which version and run left them behind.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import hashlib
import json
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.atomic import atomic_write_bytes
from scaler_wizard.banks.hashing import sha256_file
from scaler_wizard.branch import Branch, TrunkOutput
from scaler_wizard.caches.base_states import TokenStates, cached_states
from scaler_wizard.errors import DataError, ScalerError
from scaler_wizard.modeling.base_encoder import BaseEncoder
from scaler_wizard.modeling.compose import compose, new_branch, save_version, trunk_id
from scaler_wizard.modeling.fingerprint import fingerprint_of, probe_logits
from scaler_wizard.modeling.model import ScalerModel, Trunk
from scaler_wizard.training.branch_fit import _lr_lambda, check_finite_weights, finite_loss
from scaler_wizard.training.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from scaler_wizard.training.config import BranchSpec, TrainConfig, TrainConfigError
from scaler_wizard.training.data import LabelledData, load_train_eval
from scaler_wizard.training.events import TrainEvents
from scaler_wizard.training.finish import finished_version, plan_digest
from scaler_wizard.training.metrics import classification_metrics
from scaler_wizard.training.monitor import MetricsLog, QualityChecks
from scaler_wizard.training.sampler import MixedBatchSampler, derived_seed, sampling_probabilities
from scaler_wizard.version import __version__
from scaler_wizard.versions.history import next_version

RUN_FILE = "run.json"
RESULT_FILE = "result.json"
RUN_FORMAT = "scaler-wizard/train-run"
PARAM_GROUPS = ("experts", "gating", "adapters", "heads")


# -- the plan: what a run does, written to RUN_DIR/run.json before any step ----------------
@dataclass
class RunPlan:
    model: str
    start_manifest: str
    start_version: int
    branches: list[BranchSpec]
    config: TrainConfig
    allow_stale_branches: bool = False
    stale: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    data_sha256: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "model": self.model,
            "start_manifest": self.start_manifest,
            "start_version": self.start_version,
            "branches": [b.to_json() for b in self.branches],
            "config": self.config.to_json(),
            "allow_stale_branches": self.allow_stale_branches,
            "stale": self.stale,
            "new": self.new,
            "data_sha256": self.data_sha256,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunPlan:
        if raw.get("format") != RUN_FORMAT:
            raise ScalerError(f"not a scaler train run file (format {raw.get('format')!r})")
        return cls(
            model=raw["model"],
            start_manifest=raw["start_manifest"],
            start_version=int(raw["start_version"]),
            branches=[BranchSpec.from_json(b) for b in raw["branches"]],
            config=TrainConfig(**raw["config"]),
            allow_stale_branches=bool(raw.get("allow_stale_branches")),
            stale=list(raw.get("stale", [])),
            new=list(raw.get("new", [])),
            data_sha256=dict(raw.get("data_sha256", {})),
            created=str(raw.get("created", "")),
        )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def stale_branches(manifest: dict[str, Any], trained: Sequence[str]) -> list[str]:
    """Branches of the model that a run training ``trained`` would leave stale."""
    return sorted(set(manifest["branches"]) - set(trained))


def plan_run(
    store: ContentStore,
    model: str,
    branches: Sequence[BranchSpec],
    config: TrainConfig,
    *,
    allow_stale_branches: bool = False,
) -> RunPlan:
    """Check everything cheap (names, files, stale branches) before anything is loaded."""
    if not branches:
        raise TrainConfigError("no branches to train: give --branch NAME=FILE (or 'branches' in --config)")
    names = [b.name for b in branches]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TrainConfigError(f"branch {dupes[0]!r} is given twice")
    from scaler_wizard.versions.history import resolve_version

    name, h = resolve_version(store, model)
    if "@" in model or model.startswith("sha256:"):
        raise TrainConfigError(
            "train a model by name (its current version); roll back first to train an older one"
        )
    manifest = store.get_manifest(h)
    stale = stale_branches(manifest, names)
    if stale and not allow_stale_branches:
        raise ScalerError(
            f"training the trunk changes every branch's outputs, and these branches of {name!r} are not in "
            f"this run: {', '.join(stale)} (add each with --branch NAME=FILE, or pass --allow-stale-branches "
            "to keep them as they are, marked stale)"
        )
    if config.batch_size < len(branches):
        raise TrainConfigError(
            f"batch size {config.batch_size} is smaller than the number of branches ({len(branches)})"
        )
    hashes = {}
    for spec in branches:
        for path in (spec.data, spec.eval_data):
            if path is not None and not Path(path).is_file():
                raise DataError(f"{path}: no such file (branch {spec.name})")
        hashes[spec.name] = str(sha256_file(spec.data))
        if spec.eval_data is not None:
            hashes[f"{spec.name}:eval"] = str(sha256_file(spec.eval_data))
    return RunPlan(
        model=name,
        start_manifest=str(h),
        start_version=int(manifest["version"]),
        branches=[_absolute(b) for b in branches],
        config=config,
        allow_stale_branches=allow_stale_branches,
        stale=stale,
        new=[n for n in names if n not in manifest["branches"]],
        data_sha256=hashes,
        created=_now(),
    )


def _absolute(spec: BranchSpec) -> BranchSpec:
    """The spec with absolute paths (a resumed run may start from another folder)."""
    eval_data = Path(spec.eval_data).resolve() if spec.eval_data else None
    return dataclasses.replace(spec, data=Path(spec.data).resolve(), eval_data=eval_data)


def write_plan(run_dir: Path, plan: RunPlan) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / RUN_FILE).exists():
        raise ScalerError(f"{run_dir} already holds a run (continue it with --resume {run_dir})")
    atomic_write_bytes(run_dir / RUN_FILE, json.dumps(plan.to_json(), indent=2).encode())


def read_plan(run_dir: Path) -> RunPlan:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ScalerError(f"{run_dir} is not a training run folder (no {RUN_FILE})")
    try:
        return RunPlan.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise ScalerError(f"{path}: unreadable run file: {exc}".splitlines()[0]) from exc


def default_run_dir(store: ContentStore, model: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return store.root / "runs" / model / f"train-{stamp}"


# -- data --------------------------------------------------------------------------------
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


def _targets(data: LabelledData, labels: list[str], where: str) -> Tensor:
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({lab for lab in data.labels if lab not in index})
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not among the branch's labels {labels}")
    return torch.tensor([index[lab] for lab in data.labels], dtype=torch.long)


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
        train_y=_targets(train, labels, str(spec.data)),
        eval_y=_targets(evald, labels, str(spec.eval_data or spec.data)),
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
            rows = [
                s.example(i).float() for s, (_, i) in zip(flat_parts, items, strict=True) if s is not None
            ]
            states = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T, d)
            lengths = torch.tensor([r.shape[0] for r in rows])
            mask = torch.arange(states.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
            return {"states": states, "mask": mask, "branch": branch, "target": target}
        texts = [self.parts[k].train.texts[i] for k, i in items]
        batch = self.base.tokenize(texts)
        return {**batch, "branch": branch, "target": target}


# -- the module that DDP wraps: trunk + the run's branches ---------------------------------
class MultiTaskModule(nn.Module):
    """Trunk and branches (the very modules of the ScalerModel, shared, not copied)."""

    def __init__(self, trunk: Trunk, branches: dict[str, Branch], order: Sequence[str]) -> None:
        super().__init__()
        self.trunk = trunk
        self.branches = nn.ModuleDict({n: branches[n] for n in order})
        self.order = list(order)

    def forward(self, states: Tensor, mask: Tensor, branch: Tensor, target: Tensor) -> dict[str, Tensor]:
        """states (B, T, d), mask (B, T) bool, branch (B,) index into ``order``, target (B,)."""
        assert states.dim() == 3 and mask.shape == states.shape[:2], (states.shape, mask.shape)
        out = self.trunk(states, mask)
        n = states.shape[0]
        task = states.new_zeros(())
        example_loss = states.new_zeros(n)
        correct = states.new_zeros(n)
        for k, name in enumerate(self.order):
            module: Branch = self.branches[name]  # type: ignore[assignment]
            rows = (branch == k).nonzero().flatten()
            if rows.numel() == 0:
                # This process's share of the batch has no example of the branch: a zero that
                # still touches its parameters, so DDP sees every parameter used every step.
                task = task + sum(p.sum() for p in module.parameters()) * 0.0
                continue
            sub = TrunkOutput(
                pooled=out.pooled.index_select(0, rows),
                hidden=out.hidden.index_select(0, rows),
                mask=out.mask.index_select(0, rows),
                aux_loss=out.aux_loss,
            )
            logits = module(sub)  # (n_k, labels_k)
            y = target.index_select(0, rows)
            task = task + module.head.loss(logits, y) * rows.numel()
            with torch.no_grad():
                example_loss[rows] = F.cross_entropy(logits.float(), y, reduction="none")
                correct[rows] = (logits.argmax(-1) == y).to(correct.dtype)
        if out.stats:
            load = torch.stack([s.load * s.tokens for s in out.stats])  # (L, E) assignment counts
        else:
            load = states.new_zeros((0, 0))
        return {
            "loss": task / max(n, 1),
            "aux": out.aux_loss,
            "example_loss": example_loss,
            "correct": correct,
            "load": load.detach(),
            "tokens": mask.sum().to(states.dtype),
        }


def parameter_groups(module: MultiTaskModule, config: TrainConfig) -> list[dict[str, Any]]:
    """The recipe's four groups. A parameter that fits none of them is a bug, not a guess."""
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in PARAM_GROUPS}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if parts[0] == "trunk":
            groups["gating" if len(parts) > 3 and parts[3] == "gating" else "experts"].append(p)
        elif parts[0] == "branches" and parts[2] == "adapter":
            groups["adapters"].append(p)
        elif parts[0] == "branches" and parts[2] == "head":
            groups["heads"].append(p)
        else:
            raise ScalerError(f"parameter {name} belongs to no parameter group")
    lrs = {
        "experts": config.lr_experts,
        "gating": config.lr_gating,
        "adapters": config.lr_adapters,
        "heads": config.lr_heads,
    }
    return [
        {"params": groups[g], "lr": lrs[g], "name": g, "weight_decay": config.weight_decay}
        for g in PARAM_GROUPS
        if groups[g]
    ]


def base_digest(base: BaseEncoder) -> tuple[str, int]:
    """(sha256 of every base tensor's name, dtype, shape and bytes; trainable parameter count)."""
    h = hashlib.sha256()
    for name, tensor in sorted(base.model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    return h.hexdigest(), trainable


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


# -- results -----------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    model: str
    manifest: str | None
    version: int | None
    steps: int
    seconds: float
    branches: dict[str, dict[str, Any]]
    trunk: dict[str, Any]
    warnings: list[dict[str, Any]]
    stale: list[str]
    resumed_from: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "model": self.model,
            "manifest": self.manifest,
            "version": self.version,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "branches": self.branches,
            "trunk": self.trunk,
            "warnings": self.warnings,
            "stale": self.stale,
            "resumed_from": self.resumed_from,
        }


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


# -- accelerate ----------------------------------------------------------------------------
def make_accelerator() -> Any:
    """One Accelerator per process; global batches are split across processes (split_batches),
    so N processes see exactly the batches one process would."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def broadcast_text(accelerator: Any, text: str | None) -> str:
    """The main process's string, on every process (as bytes in a tensor: no pickle)."""
    if accelerator.num_processes == 1:
        assert text is not None
        return text
    from accelerate.utils import broadcast

    buf = torch.zeros(4096, dtype=torch.uint8)
    if accelerator.is_main_process:
        data = (text or "").encode()
        if len(data) > buf.numel() - 4:
            raise ScalerError("run folder path is too long")
        buf[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
        buf[4 : 4 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    buf = broadcast(buf.to(accelerator.device), from_process=0).cpu()
    n = int.from_bytes(bytes(buf[:4].tolist()), "little")
    return bytes(buf[4 : 4 + n].tolist()).decode()


# -- the run -------------------------------------------------------------------------------
def _eval_branch(
    trunk: Trunk, branch: Branch, part: BranchData, base: BaseEncoder, device: torch.device
) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and the full classification metrics on the branch's eval rows."""
    preds: list[int] = []
    loss_sum = 0.0
    n = len(part.eval)
    with torch.no_grad():
        for start in range(0, n, 128):
            idx = list(range(start, min(n, start + 128)))
            if part.eval_states is not None:
                states, mask = part.eval_states.batch(idx)
            else:
                batch = base.tokenize([part.eval.texts[i] for i in idx], device)
                states = base(batch["input_ids"], batch["attention_mask"])
                mask = batch["attention_mask"].bool()
            logits = branch(trunk(states.to(device), mask.to(device))).float()
            y = part.eval_y[idx].to(device)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            preds += logits.argmax(-1).tolist()
    metrics = classification_metrics(part.eval_y.tolist(), preds, part.labels)
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics


def evaluate(
    module: MultiTaskModule, parts: Sequence[BranchData], base: BaseEncoder, device: torch.device
) -> dict[str, dict[str, Any]]:
    was = module.training
    module.eval()
    try:
        return {
            p.name: _eval_branch(module.trunk, module.branches[p.name], p, base, device)  # type: ignore[arg-type]
            for p in parts
        }
    finally:
        module.train(was)


def _short(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "loss")}


def train_run(
    store: ContentStore,
    run_dir: Path,
    *,
    accelerator: Any = None,
    events: TrainEvents | None = None,
    resume: bool = False,
) -> TrainResult:
    """Run (or continue) the training described by ``run_dir/run.json``; save the new version."""
    acc = accelerator or make_accelerator()
    main = acc.is_main_process
    ev = events if (events is not None and main) else TrainEvents()
    plan = read_plan(run_dir)
    cfg = plan.config
    started = time.perf_counter()

    # 1. Checks that need no model: data unchanged, the model not moved on since the start.
    for spec in plan.branches:
        for key, path in ((spec.name, spec.data), (f"{spec.name}:eval", spec.eval_data)):
            if path is not None and not Path(path).is_file():
                raise DataError(f"{path}: no such file (branch {spec.name})")
            if path is not None and str(sha256_file(path)) != plan.data_sha256.get(key):
                raise DataError(
                    f"{path}: changed since the run started (branch {spec.name}); start a new run"
                )
    head = store.get_ref(plan.model)
    digest = plan_digest(run_dir / RUN_FILE)
    # Killed after saving its version but before result.json: the head is this run's own version.
    saved = None
    if resume and head is not None and head != plan.start_manifest:
        trained = [b.name for b in plan.branches]
        saved = finished_version(
            store, head, start_manifest=plan.start_manifest, digest=digest, branches=trained
        )
    if head != plan.start_manifest and saved is None:
        raise ScalerError(
            f"model {plan.model!r} moved to {head} since this run started from {plan.start_manifest}; "
            "start a new run on the current version"
        )

    # 2. The model: composed from the run's starting version; new branches built (seeded).
    model: ScalerModel = compose(store, plan.start_manifest, device=acc.device)
    assert model.origin is not None
    old_trunk = trunk_id(model.origin.manifest)
    base = model.base
    digest_before, trainable_in_base = base_digest(base)
    if trainable_in_base:
        raise ScalerError(f"the base encoder has {trainable_in_base} trainable parameters: it must be frozen")
    parts: list[BranchData] = []
    branches: dict[str, Branch] = {}
    torch.manual_seed(derived_seed(cfg.seed, "init"))
    for spec in plan.branches:
        existing = spec.name not in plan.new
        labels = list(model.branch(spec.name).labels) if existing else None
        part = load_branch_data(spec, labels, cfg)
        if existing:
            branch = model.branch(spec.name)
        else:
            branch = new_branch(
                hidden_size=model.trunk_hidden_size(),
                labels=part.labels,
                strategy=spec.strategy,
                strategy_config=spec.strategy_config,
                head=spec.head,
                head_config=spec.head_config,
            )
        if branch.adapter.needs_base_pass:
            raise ScalerError(
                f"branch {spec.name}: strategy {branch.entry['strategy']['plugin']!r} keeps its adapter inside the "
                "base encoder, which scaler train keeps frozen; train such branches with `scaler branch add`"
            )
        if branch.head.multilabel:
            raise ScalerError(f"branch {spec.name}: multi-label heads are not supported by scaler train yet")
        if not existing:
            model.add_branch(spec.name, branch)
        branches[spec.name] = branch
        parts.append(part)
    model.to(acc.device)
    probs = sampling_probabilities([len(p.train) for p in parts], cfg.temperature)
    for p, prob in zip(parts, probs, strict=True):
        ev.message(
            f"{p.name}: {len(p.train)} train / {len(p.eval)} eval rows, {len(p.labels)} classes, "
            f"{'new' if p.name in plan.new else 'continued'}, sampled with p={prob:.3f}"
        )

    # 3. Base states: computed once (local main process first), then read from the cache file.
    if cfg.base_cache:
        for p in parts:
            texts = p.train.texts + p.eval.texts
            with acc.local_main_process_first():
                tick = ev.phase(f"base states: {p.name}", len(texts))
                states, hit = cached_states(
                    store,
                    base,
                    model.origin.base_entry,
                    texts,
                    float16=cfg.cache_float16,
                    write=acc.is_local_main_process,
                    device=acc.device,
                    progress=tick,
                )
            n = len(p.train)
            p.train_states = TokenStates(states.flat, states.offsets[: n + 1])
            p.eval_states = TokenStates(states.flat, states.offsets[n:])
            if hit:
                ev.message(f"{p.name}: base states from cache")

    # 4. Module, optimizer, schedule, data.
    module = MultiTaskModule(model.trunk, branches, [p.name for p in parts])
    module.train()
    groups = parameter_groups(module, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup, cfg.steps))
    checkpoints = run_dir / "checkpoints"
    ckpt = None
    if resume:
        path = latest_checkpoint(checkpoints)
        if path is None:
            ev.message("no checkpoint yet: starting from step 0")
        else:
            ckpt = load_checkpoint(path)
            module.load_state_dict(ckpt.model, strict=True)
    if saved is not None and (ckpt is None or ckpt.step < cfg.steps):
        raise ScalerError(f"model {plan.model!r} moved to {head} but this run has no final checkpoint")
    sampler = MixedBatchSampler(
        [len(p.train) for p in parts],
        batch_size=cfg.batch_size,
        temperature=cfg.temperature,
        seed=cfg.seed,
        total_steps=cfg.steps,
        state=ckpt.state["sampler"] if ckpt else None,
    )
    loader = torch.utils.data.DataLoader(
        MixedDataset([len(p.train) for p in parts]),
        batch_sampler=sampler,
        collate_fn=Collate(parts, base, cached=cfg.base_cache),
    )
    if cfg.batch_size % acc.num_processes:
        raise TrainConfigError(
            f"batch size {cfg.batch_size} does not split evenly across {acc.num_processes} processes"
        )
    wrapped, optimizer, loader = acc.prepare(module, optimizer, loader)
    checks = QualityChecks(cfg, num_layers=len(model.trunk.layers))
    totals = {"tokens": 0.0, "train_seconds": 0.0}
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.state["scheduler"])
        checks.load_json(ckpt.state["monitor"])
        totals = dict(ckpt.state["totals"])
        restore_rng(ckpt.rng["tensors"], ckpt.rng["meta"])
        step = ckpt.step
        ev.message(f"resuming from checkpoint {ckpt.path.name} (step {step} of {cfg.steps})")
    # A resumed run drops what the killed one logged after its last checkpoint (all of it if none).
    log = MetricsLog(run_dir, resume_step=(step if ckpt else -1) if resume else None) if main else None

    def write(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(record)

    def warn(records: list[dict[str, Any]]) -> None:
        for r in records:
            write(r)
            ev.warning(r)

    def do_eval(at: int) -> dict[str, dict[str, Any]]:
        results = evaluate(acc.unwrap_model(wrapped), parts, base, acc.device)
        record = {"event": "eval", "step": at, "branches": {n: _short(m) for n, m in results.items()}}
        write(record)
        ev.evaluated(record)
        warn(checks.after_eval(at, {n: m["accuracy"] for n, m in results.items()}))
        return results

    def do_checkpoint(at: int) -> None:
        if main:
            path = save_checkpoint(
                checkpoints,
                step=at,
                model=acc.unwrap_model(wrapped).state_dict(),
                optimizer=optimizer.state_dict(),
                state={
                    "sampler": sampler.state_after(at),
                    "scheduler": scheduler.state_dict(),  # lr_lambdas: None for plain functions
                    "monitor": checks.to_json(),
                    "totals": totals,
                },
                keep=cfg.keep_checkpoints,
            )
            write({"event": "checkpoint", "step": at, "path": str(path)})
            ev.checkpoint(at, path)
        acc.wait_for_everyone()

    try:
        if step == 0 and main:
            write(
                {
                    "event": "start",
                    "step": 0,
                    "branches": {
                        p.name: {"train_rows": len(p.train), "sampling_p": pr}
                        for p, pr in zip(parts, probs, strict=True)
                    },
                    "processes": acc.num_processes,
                }
            )
            do_eval(0)
        ev.start(cfg.steps, step)
        group_names = [g["name"] for g in optimizer.param_groups]
        tick_start = time.perf_counter()
        for batch in loader:
            step += 1
            # Noise and dropout are seeded per step (and process): a resumed run draws exactly
            # what the uninterrupted one drew, whatever happened before.
            torch.manual_seed(derived_seed(cfg.seed, "step", step, acc.process_index))
            if "states" in batch:
                states, mask = batch["states"], batch["mask"]
            else:
                extra = {k: v for k, v in batch.items() if k not in ("branch", "target")}
                states = base(extra.pop("input_ids"), extra.pop("attention_mask"), **extra)
                mask = batch["attention_mask"].bool()
            out = wrapped(states, mask, batch["branch"], batch["target"])
            loss = out["loss"] + cfg.aux_loss_weight * out["aux"]
            acc.backward(loss)
            grad_norm = float(acc.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip))
            lrs = {name: g["lr"] for name, g in zip(group_names, optimizer.param_groups, strict=True)}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # One all-reduce for the scalars and loads, one all-gather for the per-example values.
            load = out["load"].to(torch.float64)
            scalars = torch.cat(
                [
                    torch.stack([loss.detach(), out["loss"].detach(), out["aux"].detach(), out["tokens"]]).to(
                        torch.float64
                    ),
                    load.flatten(),
                ]
            )
            examples = torch.stack(
                [out["example_loss"], out["correct"], batch["branch"].to(out["correct"].dtype)], 1
            ).to(torch.float64)
            if acc.num_processes > 1:
                scalars = acc.reduce(scalars, reduction="sum")
                examples = acc.gather(examples)
            scalars = scalars.cpu()
            examples = examples.cpu()
            nproc = acc.num_processes
            total_loss, task_loss, aux_loss = (float(scalars[i]) / nproc for i in range(3))
            finite_loss(total_loss, step)  # every process sees the same reduced value
            tokens = float(scalars[3])
            load_counts = scalars[4:].reshape(load.shape).tolist()
            now = time.perf_counter()
            seconds = now - tick_start
            tick_start = now
            totals["tokens"] += tokens
            totals["train_seconds"] += seconds
            if main:
                per_branch = {}
                for k, p in enumerate(parts):
                    rows = examples[examples[:, 2] == k]
                    per_branch[p.name] = {
                        "loss": float(rows[:, 0].mean()) if len(rows) else float("nan"),
                        "accuracy": float(rows[:, 1].mean()) if len(rows) else float("nan"),
                        "examples": len(rows),
                    }
                record = {
                    "event": "train",
                    "step": step,
                    "loss": total_loss,
                    "task_loss": task_loss,
                    "aux_loss": aux_loss,
                    "grad_norm": grad_norm,
                    "lr": lrs,
                    "tokens": tokens,
                    "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                    "step_seconds": seconds,
                    "peak_memory_mb": _peak_memory_mb(acc.device),
                    "branches": per_branch,
                    "expert_load": [[c / max(sum(row), 1e-12) for c in row] for row in load_counts],
                }
                write(record)
                ev.step(record)
                warn(checks.after_step(step, grad_norm=grad_norm, aux_loss=aux_loss, load_counts=load_counts))
                if step % cfg.eval_interval == 0 and step < cfg.steps:
                    do_eval(step)
            # Every process takes part (the checkpoint ends with a barrier).
            if step % cfg.checkpoint_interval == 0 and step < cfg.steps:
                do_checkpoint(step)
            if step >= cfg.steps:
                break
            tick_start = time.perf_counter()  # eval and checkpoint time is not step time
        finished_before = ckpt is not None and ckpt.step >= cfg.steps
        final: dict[str, dict[str, Any]] = {}
        if main:
            # Logged before the final checkpoint, so a run killed after that checkpoint has it.
            if finished_before:
                final = evaluate(module, parts, base, acc.device)
            else:
                final = do_eval(cfg.steps)
        if not finished_before:
            do_checkpoint(cfg.steps)
    finally:
        if log is not None:
            log.close()

    digest_after, trainable_after = base_digest(base)
    if digest_after != digest_before or trainable_after:
        raise ScalerError("the base encoder's weights changed during training: refusing to save (a bug)")
    check_finite_weights(module, "the trained model")
    if not main:
        return TrainResult(
            run_dir, plan.model, None, None, cfg.steps, time.perf_counter() - started, {}, {}, [], plan.stale
        )

    # 5. The new version: trained trunk banks + branches, with provenance and metrics.
    first = _first_eval(run_dir)
    model.eval()
    run_info = {
        "command": "scaler train",
        "run": run_dir.name,
        "start_manifest": plan.start_manifest,
        "plan_sha256": digest,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "processes": acc.num_processes,
        "config": cfg.to_json(),
        "data": {p.name: p.full.source["sha256"] for p in parts},
        "seconds": round(totals["train_seconds"], 3),
        "tokens": int(totals["tokens"]),
    }
    for p in parts:
        b = branches[p.name]
        m = final[p.name]
        entry = dict(b.entry)
        entry.pop("trunk", None)  # build_manifest records the new trunk's id
        entry["metrics"] = {
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "eval_loss": m["loss"],
            "eval_rows": len(p.eval),
            "per_class": m["per_class"],
            "confusion_matrix": m["confusion_matrix"],
        }
        entry["provenance"] = {
            "data": p.full.source,
            "train_rows": len(p.train),
            "eval": p.eval.source,
            "label_counts": p.full.counts(),
            "training": run_info,
            "library": {"distribution": "scaler-wizard", "version": __version__},
            "torch": torch.__version__,
        }
        b.entry = entry
    fps = probe_logits(model, [p.name for p in parts])
    for p in parts:
        branches[p.name].entry["fingerprint"] = fingerprint_of(fps[p.name])
    new_version = next_version(store, plan.model, plan.start_version)  # unique after a rollback
    for name in plan.stale:
        old = dict(model.origin.branch_entries[name])
        prov = dict(old.get("provenance") or {})
        prov["stale"] = {
            "since_version": new_version,
            "run": run_dir.name,
            "trained_on_trunk": old.get("trunk", old_trunk),
            "reason": "the trunk was retrained by `scaler train` without this branch (--allow-stale-branches); "
            "its outputs have changed since its metrics and fingerprint were recorded",
        }
        old["provenance"] = prov
        model.origin.branch_entries[name] = old
    names = ", ".join(p.name for p in parts)
    message = f"train trunk with {names}: {cfg.steps} steps, seed {cfg.seed} (run {run_dir.name})"
    if plan.stale:
        message += f"; stale: {', '.join(plan.stale)}"
    h = saved if saved is not None else save_version(store, model, message=message)
    windows = _last_window(run_dir, cfg.check_window)
    result = TrainResult(
        run_dir=run_dir,
        model=plan.model,
        manifest=str(h),
        version=int(store.get_manifest(h)["version"]),
        steps=cfg.steps,
        seconds=time.perf_counter() - started,
        branches={
            p.name: {
                "new": p.name in plan.new,
                "train_loss": windows["branches"].get(p.name, {}).get("loss"),
                "train_accuracy": windows["branches"].get(p.name, {}).get("accuracy"),
                "eval_accuracy_start": (first or {}).get(p.name, {}).get("accuracy"),
                "eval_accuracy": final[p.name]["accuracy"],
                "eval_macro_f1": final[p.name]["macro_f1"],
                "eval_loss": final[p.name]["loss"],
            }
            for p in parts
        },
        trunk={
            "old": old_trunk,
            "new": trunk_id(store.get_manifest(h)),
            "aux_loss": windows["aux_loss"],
            "expert_load": windows["expert_load"],
            "tokens_per_s": totals["tokens"] / totals["train_seconds"] if totals["train_seconds"] else 0.0,
            "peak_memory_mb": _peak_memory_mb(acc.device),
            "processes": acc.num_processes,
            "base_unchanged": True,
        },
        warnings=checks.warnings,
        stale=plan.stale,
        resumed_from=ckpt.step if ckpt is not None else None,
    )
    atomic_write_bytes(run_dir / RESULT_FILE, json.dumps(result.to_json(), indent=2).encode())
    return result


def _first_eval(run_dir: Path) -> dict[str, Any] | None:
    from scaler_wizard.training.monitor import METRICS_FILE, read_records

    for r in read_records(run_dir / METRICS_FILE):
        if r.get("event") == "eval":
            branches: dict[str, Any] = r["branches"]
            return branches
    return None


def _last_window(run_dir: Path, window: int) -> dict[str, Any]:
    """Means over the last ``window`` train records (what the summary table shows)."""
    from scaler_wizard.training.monitor import METRICS_FILE, read_records

    recs = [r for r in read_records(run_dir / METRICS_FILE) if r.get("event") == "train"][-window:]
    if not recs:
        return {"branches": {}, "aux_loss": None, "expert_load": []}
    out: dict[str, Any] = {"aux_loss": sum(r["aux_loss"] for r in recs) / len(recs), "branches": {}}
    for name in recs[-1]["branches"]:
        vals = [r["branches"][name] for r in recs if r["branches"][name]["examples"]]
        n = sum(v["examples"] for v in vals) or 1
        out["branches"][name] = {
            "loss": sum(v["loss"] * v["examples"] for v in vals) / n,
            "accuracy": sum(v["accuracy"] * v["examples"] for v in vals) / n,
        }
    layers = recs[-1]["expert_load"]
    out["expert_load"] = [
        [sum(r["expert_load"][li][e] for r in recs) / len(recs) for e in range(len(row))]
        for li, row in enumerate(layers)
    ]
    return out


def start_run(
    store: ContentStore,
    plan: RunPlan | None,
    *,
    run_dir: Path | None,
    accelerator: Any,
) -> Path:
    """On the main process write the plan into a new run folder; every process gets its path."""
    path: str | None = None
    if accelerator.is_main_process:
        assert plan is not None
        target = run_dir or default_run_dir(store, plan.model)
        write_plan(target, plan)
        path = str(target.resolve())
    path = broadcast_text(accelerator, path)
    accelerator.wait_for_everyone()
    return Path(path)


__all__ = [
    "BranchSpec",
    "MultiTaskModule",
    "RunPlan",
    "TrainConfig",
    "TrainEvents",
    "TrainResult",
    "make_accelerator",
    "plan_run",
    "read_plan",
    "read_result",
    "start_run",
    "train_run",
]
