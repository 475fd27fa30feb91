"""The plan of a ``scaler train`` run: what it trains, checked cheaply and written to
``RUN_DIR/run.json`` before any step (a resumed run reads it back and does exactly that)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.atomic import atomic_write_bytes
from scaler_wizard.banks.hashing import sha256_file
from scaler_wizard.errors import DataError, ScalerError
from scaler_wizard.manifests.model import Manifest
from scaler_wizard.training.clock import utc_now_iso, utc_stamp
from scaler_wizard.training.config import BranchSpec, TrainConfig, TrainConfigError

RUN_FILE = "run.json"
RUN_FORMAT = "scaler-wizard/train-run"


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


def stale_branches(manifest: Manifest, trained: Sequence[str]) -> list[str]:
    """Branches of the model that a run training ``trained`` would leave stale."""
    return sorted(set(manifest.branches) - set(trained))


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
    manifest = store.manifest(h, where=f"manifest {h.short} ({name})")
    if config.train_base_layers:
        from scaler_wizard.training.base_layers import inserted_layers

        inserted_layers(manifest.base, name)
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
        start_version=manifest.version,
        branches=[_absolute(b) for b in branches],
        config=config,
        allow_stale_branches=allow_stale_branches,
        stale=stale,
        new=[n for n in names if n not in manifest.branches],
        data_sha256=hashes,
        created=utc_now_iso(),
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
    return store.root / "runs" / model / f"train-{utc_stamp()}"


def check_data_unchanged(plan: RunPlan) -> None:
    """DataError unless every data file of the plan is still there with the bytes it had."""
    for spec in plan.branches:
        for key, path in ((spec.name, spec.data), (f"{spec.name}:eval", spec.eval_data)):
            if path is not None and not Path(path).is_file():
                raise DataError(f"{path}: no such file (branch {spec.name})")
            if path is not None and str(sha256_file(path)) != plan.data_sha256.get(key):
                raise DataError(
                    f"{path}: changed since the run started (branch {spec.name}); start a new run"
                )
