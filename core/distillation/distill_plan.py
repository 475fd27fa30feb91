"""A ``scaler distill`` run's plan (``run.json`` in its run folder) and what it reads from the
store before training: the teachers' entries, their shared texts and their checked features.

A run folder (``STORE/runs/MODEL/distill-STAMP``) holds ``run.json`` (this plan: the model, the
version it starts from, the config), ``metrics.jsonl`` (logged like ``scaler train``),
``checkpoints/step-N`` (``training.checkpoint``: safetensors state and optimizer, RNG) and,
once saved, ``result.json``. ``--resume RUN`` reads the plan back, so a resumed run is exactly
the run that was started.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.atomic import atomic_write_bytes
from scaler_wizard.distillation.distill_module import LOSSES
from scaler_wizard.distillation.feature_banks import read_texts, teacher_features
from scaler_wizard.errors import DistillError, FeatureBankMismatchError, ModelNotFoundError, did_you_mean
from scaler_wizard.manifests.model import Manifest
from scaler_wizard.manifests.teachers import TeacherEntry
from scaler_wizard.training.clock import utc_stamp

RUN_FILE = "run.json"
RESULT_FILE = "result.json"


@dataclass
class DistillConfig:
    """How to distil. ``teachers`` are trained (adapter + router); ``frozen`` take part (their
    adapters predict, the router weights them) but their adapters are not trained."""

    teachers: list[str]
    frozen: list[str] = field(default_factory=list)
    steps: int = 100
    loss: str = "mse"
    batch_size: int = 16
    lr: float = 2e-3
    lr_trunk: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    grad_clip: float = 1.0
    freeze_trunk: bool = False
    router: str = "topk"
    router_config: dict[str, Any] = field(default_factory=dict)
    aux_loss_weight: float = 0.01
    router_aux_weight: float = 0.01
    #: weight of the router's balance term (``DistillModule.forward``); 0 lets it collapse
    balance_weight: float = 1.0
    eval_split: float = 0.1
    seed: int = 0
    checkpoint_interval: int = 50
    keep_checkpoints: int = 2
    collapse_threshold: float = 0.95
    collapse_window: int = 10
    allow_stale_branches: bool = False
    cache_float16: bool = False
    #: existing branches trained on their task alongside (``BranchSpec.to_json()`` each)
    branches: list[dict[str, Any]] = field(default_factory=list)
    task_weight: float = 1.0
    lr_branches: float = 1e-3

    def __post_init__(self) -> None:
        if not self.teachers:
            raise DistillError("give at least one teacher to train (--teachers)")
        both = sorted(set(self.teachers) & set(self.frozen))
        if both:
            raise DistillError(
                f"teacher {both[0]!r} is both trained (--teachers) and frozen (--freeze-teachers)"
            )
        if len(set(self.teachers)) != len(self.teachers) or len(set(self.frozen)) != len(self.frozen):
            raise DistillError("a teacher is named twice")
        if self.loss not in LOSSES:
            raise DistillError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size)):
            if value < 1:
                raise DistillError(f"{name} must be at least 1, not {value}")
        if not 0.0 < self.eval_split < 1.0:
            raise DistillError(f"the held-out split must be between 0 and 1, not {self.eval_split}")
        if self.checkpoint_interval < 1 or self.collapse_window < 1:
            raise DistillError("--checkpoint-interval and the collapse window must be at least 1")
        if not (self.balance_weight >= 0.0 and math.isfinite(self.balance_weight)):
            raise DistillError(f"--router-balance must be a finite number >= 0, not {self.balance_weight}")

    @property
    def order(self) -> list[str]:
        """Every teacher of the run, in the router's order: the frozen first, then the trained."""
        return [*self.frozen, *self.teachers]


@dataclass
class DistillPlan:
    model: str
    start_manifest: str
    config: DistillConfig

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "distill",
            "model": self.model,
            "start_manifest": self.start_manifest,
            "config": asdict(self.config),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DistillPlan:
        if d.get("kind") != "distill":
            raise DistillError("not a distillation run folder (its run.json is another kind of run)")
        return cls(model=d["model"], start_manifest=d["start_manifest"], config=DistillConfig(**d["config"]))


def new_run_dir(store: ContentStore, model: str) -> Path:
    """``STORE/runs/MODEL/distill-STAMP`` (``-2``, ``-3``... when runs start within a second)."""
    base = store.root / "runs" / model / f"distill-{utc_stamp()}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_plan(run_dir: Path, plan: DistillPlan) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / RUN_FILE).exists():
        raise DistillError(f"{run_dir} already holds a run (continue it with --resume {run_dir})")
    atomic_write_bytes(run_dir / RUN_FILE, json.dumps(plan.to_json(), indent=2).encode())


def read_plan(run_dir: Path) -> DistillPlan:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise DistillError(f"{run_dir} is not a distillation run folder (no {RUN_FILE})")
    try:
        return DistillPlan.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise DistillError(f"{path}: unreadable run file: {exc}".splitlines()[0]) from exc


def resolve_run_dir(store: ContentStore, model: str, run: str) -> Path:
    """``--resume RUN``: a run folder path, or a run's name under ``STORE/runs/MODEL``."""
    path = Path(run)
    if path.is_dir():
        return path
    named = store.root / "runs" / model / run
    if named.is_dir():
        return named
    raise DistillError(
        f"no distillation run {run!r} (neither a folder nor a run of model {model!r})", model=model
    )


def start_manifest(store: ContentStore, model: str) -> tuple[str, Manifest]:
    head = store.get_ref(model)
    if head is None:
        raise ModelNotFoundError(
            f"no model {model!r} in {store.root} {did_you_mean(model, store.models())}",
            name=model,
            available=store.models(),
        )
    return str(head), store.manifest(head)


def check_plan(manifest: Manifest, plan: DistillPlan) -> dict[str, TeacherEntry]:
    """The run's teachers' entries; DistillError for an unknown teacher, teachers on other texts,
    a frozen teacher with no adapter to keep, or branches a trunk change would leave stale."""
    cfg = plan.config
    entries = {}
    for name in cfg.order:
        entry = manifest.teachers.get(name)
        if entry is None:
            have = ", ".join(sorted(manifest.teachers)) or "none"
            raise DistillError(
                f"model {plan.model!r} has no teacher {name!r} (has {have}; add one with `scaler teacher add`)",
                teacher=name,
                model=plan.model,
            )
        entries[name] = entry
    for name in cfg.frozen:
        if entries[name].adapter is None:
            raise DistillError(
                f"teacher {name!r} has no adapter to keep frozen: distil it first (--teachers {name})",
                teacher=name,
                model=plan.model,
            )
    first = cfg.order[0]
    for name in cfg.order[1:]:
        if entries[name].data.texts != entries[first].data.texts:
            raise DistillError(
                f"teachers {first!r} and {name!r} ran over different texts: distil teachers of the same data "
                "together (add them with the same --data)",
                teacher=name,
                model=plan.model,
            )
    if not cfg.freeze_trunk and not cfg.allow_stale_branches:
        trained = {b["name"] for b in cfg.branches}
        live = sorted(
            n
            for n, e in manifest.branches.items()
            if n not in trained and not (e.provenance or {}).get("stale")
        )
        if live:
            raise DistillError(
                f"distilling into the trunk changes what branch(es) {', '.join(live)} answer: train them along "
                "(--branch NAME=FILE), or pass --allow-stale-branches (they are marked stale), or --freeze-trunk",
                model=plan.model,
            )
    return entries


def load_features(
    store: ContentStore, entries: Mapping[str, TeacherEntry]
) -> tuple[list[str], dict[str, dict[int, Tensor]]]:
    """The run's texts (the teachers' shared texts object) and each teacher's features by layer,
    float32, every bank checked against its entry and the texts (FeatureBankMismatchError)."""
    first = next(iter(entries.values()))
    texts = read_texts(store, first.data.texts)
    if len(texts) != first.data.rows:
        raise FeatureBankMismatchError(
            f"the texts object holds {len(texts)} texts, not {first.data.rows}", field="rows"
        )
    out: dict[str, dict[int, Tensor]] = {}
    for name, entry in entries.items():
        out[name] = {}
        for layer in entry.layers:
            rows = teacher_features(store, entry, layer, texts=texts, name=name)
            tensor = rows if isinstance(rows, Tensor) else rows.tensor()
            out[name][layer] = tensor.to(torch.float32).clone()
    return texts, out


def held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): a seeded shuffle, ``fraction`` held out (at least one row each)."""
    if n < 2:
        raise DistillError(f"a teacher's data needs at least 2 texts to hold some out, not {n}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    k = min(n - 1, max(1, round(n * fraction)))
    return sorted(perm[k:]), sorted(perm[:k])


__all__ = [
    "RESULT_FILE",
    "RUN_FILE",
    "DistillConfig",
    "DistillPlan",
    "check_plan",
    "held_out_split",
    "load_features",
    "new_run_dir",
    "read_plan",
    "resolve_run_dir",
    "start_manifest",
    "write_plan",
]
