"""``scaler consolidate``: a ``scaler train`` run's last checkpoints averaged into banks, one version.

LOCK -> EMA -> SERIALIZE -> COMMIT -> UNLOCK, in this order:

1. Read the run (``run.json``) and its last N complete checkpoints (``checkpoints/step-*``:
   only ``model.safetensors`` is read; the optimizer state, the RNG states and the scheduler
   are left behind, which is what makes the banks smaller than the checkpoints).
2. Average their trainable weights (trunk layers, the run's branch adapters and heads): the
   plain mean, or with ``ema`` the exponential moving average in step order
   (``a <- ema * a + (1 - ema) * c``; the newest checkpoint weighs ``1 - ema``).
3. The parent is the model's head, which must be the version the run started from or the
   version the run saved (else refused: the run's weights belong to another history).
4. Optionally evaluate (the run's eval split) the consolidated weights and the last
   checkpoint's, for the report and the branches' metrics.
5. Under the store lock: the model moved? refuse. Write the banks (content-addressed, so a
   kill leaves only unreferenced objects), store the manifest made by the one builder, move the
   ref last (atomically). A SIGKILL at any moment leaves the ref at the previous version.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from scaler_wizard.banks import ContentStore
from scaler_wizard.branch import Branch
from scaler_wizard.errors import ConflictError, GrowthError, ModelNotFoundError
from scaler_wizard.manifests.facts import banks_of, trunk_id
from scaler_wizard.manifests.model import thaw
from scaler_wizard.modeling.compose import compose, new_branch
from scaler_wizard.modeling.fingerprint import fingerprint_of, probe_logits
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.modeling.saving import TrainedRecord, build_manifest
from scaler_wizard.training.batches import load_branch_data
from scaler_wizard.training.checkpoint import FORMAT, FORMAT_VERSION
from scaler_wizard.training.evaluate import evaluate
from scaler_wizard.training.finish import finished_version, plan_digest
from scaler_wizard.training.multitask import MultiTaskModule
from scaler_wizard.training.plan import RUN_FILE, RunPlan, check_data_unchanged, read_plan
from scaler_wizard.training.provenance import branch_metrics
from scaler_wizard.training.result import read_result
from scaler_wizard.versions.history import next_version

_OP = "consolidate"


@dataclass
class ConsolidateResult:
    model: str
    run: str
    method: str  # "mean" or "ema"
    ema: float | None
    steps: list[int]  # the checkpoints averaged, oldest first
    checkpoint_bytes: int  # the averaged checkpoints on disk (model + optimizer + state)
    checkpoint_model_bytes: int  # their model.safetensors alone
    run_checkpoint_bytes: int  # every checkpoint the run folder holds
    bank_bytes: int  # the banks the new version's trunk and the run's branches are stored in
    eval: dict[str, dict[str, Any]]  # per branch: consolidated vs last checkpoint (empty: not run)
    parent: str
    parent_version: int
    parent_is: str  # "start" (the version the run started from) or "result" (the one it saved)
    manifest: str | None = None
    version: int | None = None
    new_trunk: str | None = None
    branches: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _refuse(message: str) -> GrowthError:
    return GrowthError(f"consolidate: {message}", operator=_OP)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's complete checkpoints ``(step, folder)``, oldest first."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        state = path / "state.json"
        if not (path.is_dir() and state.is_file() and (path / "model.safetensors").is_file()):
            continue
        try:
            doc = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _refuse(f"checkpoint {path} is unreadable ({exc.__class__.__name__})") from exc
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise _refuse(f"checkpoint {path} is not a {FORMAT} v{FORMAT_VERSION} checkpoint")
        found.append((int(doc["step"]), path))
    return sorted(found)


def _bytes(paths: Sequence[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file())


def average(paths: Sequence[Path], ema: float | None) -> dict[str, Tensor]:
    """The mean (or EMA, oldest first) of the checkpoints' model tensors (float64 sums)."""
    acc: dict[str, Tensor] = {}
    last: dict[str, Tensor] = {}
    for path in paths:
        try:
            state = load_file(str(path / "model.safetensors"))
        except (OSError, ValueError) as exc:
            raise _refuse(f"checkpoint {path} is unreadable: {exc}".splitlines()[0]) from exc
        if acc and set(state) != set(last):
            raise _refuse(f"checkpoint {path} holds other tensors than {paths[0]}")
        for key, t in state.items():
            last[key] = t
            if not t.is_floating_point():
                continue
            x = t.double()
            if key not in acc:
                acc[key] = x.clone()
            elif ema is None:
                acc[key] += x
            else:
                acc[key].mul_(ema).add_(x, alpha=1.0 - ema)
        del state
    n = len(paths)
    out = {}
    for key, t in last.items():
        if key in acc:
            out[key] = (acc[key] / n if ema is None else acc[key]).to(t.dtype)
        else:
            out[key] = t
    return out


def _parent(store: ContentStore, plan: RunPlan, run_dir: Path, head: str) -> str:
    """Which the head is: the run's start or its result (else GrowthError)."""
    if head == plan.start_manifest:
        return "start"
    done = read_result(run_dir)
    if done is not None and done.get("manifest") == head:
        return "result"
    digest = plan_digest(run_dir / RUN_FILE)
    trained = [b.name for b in plan.branches]
    if finished_version(store, head, start_manifest=plan.start_manifest, digest=digest, branches=trained):
        return "result"
    raise _refuse(
        f"model {plan.model!r} is at {head}, neither the version run {run_dir.name} started from "
        f"({plan.start_manifest}) nor the one it saved: its weights belong to another history"
    )


def _branches(model: ScalerModel, plan: RunPlan) -> dict[str, Branch]:
    """The run's branches in the model (a branch the run created and never saved is built
    again, with its labels read from its data as the run did)."""
    out: dict[str, Branch] = {}
    for spec in plan.branches:
        if spec.name in model.branch_names:
            out[spec.name] = model.branch(spec.name)
            continue
        part = load_branch_data(spec, None, plan.config)
        branch = new_branch(
            hidden_size=model.trunk_hidden_size(),
            labels=part.labels,
            strategy=spec.strategy,
            strategy_config=spec.strategy_config,
            head=spec.head,
            head_config=spec.head_config,
        )
        model.add_branch(spec.name, branch)
        out[spec.name] = branch
    return out


def _evaluate(
    module: MultiTaskModule, model: ScalerModel, plan: RunPlan, states: dict[str, dict[str, Tensor]]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(per branch report, per branch metrics of the consolidated weights) on the run's eval split."""
    check_data_unchanged(plan)
    labels = {n: list(b.labels) for n, b in module.branches.items() if isinstance(b, Branch)}
    parts = [load_branch_data(s, labels[s.name], plan.config) for s in plan.branches]
    scores = {}
    for which in ("last", "consolidated"):
        module.load_state_dict(states[which], strict=True)
        scores[which] = evaluate(module, parts, model.base, model.device)
    report = {
        p.name: {
            "rows": len(p.eval),
            "accuracy_last": scores["last"][p.name]["accuracy"],
            "accuracy": scores["consolidated"][p.name]["accuracy"],
            "macro_f1_last": scores["last"][p.name]["macro_f1"],
            "macro_f1": scores["consolidated"][p.name]["macro_f1"],
        }
        for p in parts
    }
    metrics = {
        p.name: branch_metrics(
            scores["consolidated"][p.name], len(p.eval), loss=scores["consolidated"][p.name]["loss"]
        )
        for p in parts
    }
    return report, metrics


def consolidate(
    store: ContentStore,
    name: str,
    run_dir: Path,
    *,
    last: int | None = None,
    ema: float | None = None,
    run_eval: bool = True,
) -> ConsolidateResult:
    """Average run ``run_dir``'s last ``last`` checkpoints (all kept when None) into a new version."""
    if ema is not None and not 0.0 <= ema < 1.0:
        raise _refuse(f"--ema must be in [0, 1), not {ema}")
    plan = read_plan(run_dir)
    if plan.model != name:
        raise _refuse(f"{run_dir} is a run of model {plan.model!r}, not {name!r}")
    head = store.get_ref(name)
    if head is None:
        raise ModelNotFoundError(f"no model named {name!r}", name=name, available=store.models())
    parent_is = _parent(store, plan, run_dir, str(head))
    found = list_checkpoints(run_dir)
    if not found:
        raise _refuse(f"run {run_dir.name} has no complete checkpoint in {run_dir / 'checkpoints'}")
    n = len(found) if last is None else last
    if not 1 <= n <= len(found):
        raise _refuse(f"--last {n}: the run keeps {len(found)} checkpoints (steps {[s for s, _ in found]})")
    chosen = found[-n:]
    paths = [p for _, p in chosen]
    averaged = average(paths, ema)
    model = compose(store, str(head))
    assert model.origin is not None
    parent = model.origin.manifest
    branches = _branches(model, plan)
    module = MultiTaskModule(model.trunk, branches, [s.name for s in plan.branches])
    try:
        module.load_state_dict(averaged, strict=True)
    except RuntimeError as exc:
        raise _refuse(f"the checkpoints do not fit model {name!r}: {exc}".splitlines()[0]) from exc
    report: dict[str, dict[str, Any]] = {}
    metrics: dict[str, dict[str, Any]] = {}
    if run_eval:
        last_state = load_file(str(paths[-1] / "model.safetensors"))
        report, metrics = _evaluate(module, model, plan, {"last": last_state, "consolidated": averaged})
    model.eval()
    run_names = [s.name for s in plan.branches]
    fingerprints = {n: fingerprint_of(v) for n, v in probe_logits(model, run_names).items()}
    steps = [s for s, _ in chosen]
    method = "mean" if ema is None else "ema"
    record = {
        "command": "scaler consolidate",
        "run": run_dir.name,
        "start_manifest": plan.start_manifest,
        "plan_sha256": plan_digest(run_dir / RUN_FILE),
        "steps": steps,
        "method": method,
        "ema": ema,
        "optimizer_state": "dropped",
        "evaluated": run_eval,
    }
    how = f"{method}{'' if ema is None else f' {ema:g}'} of {n} checkpoints (steps {steps[0]}..{steps[-1]})"
    message = f"consolidate run {run_dir.name}: {how}"
    run_dirs = [p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()]
    result = ConsolidateResult(
        model=name,
        run=str(run_dir),
        method=method,
        ema=ema,
        steps=steps,
        checkpoint_bytes=_bytes(paths),
        checkpoint_model_bytes=sum((p / "model.safetensors").stat().st_size for p in paths),
        run_checkpoint_bytes=_bytes(run_dirs),
        bank_bytes=0,
        eval=report,
        parent=str(head),
        parent_version=parent.version,
        parent_is=parent_is,
    )
    with store.lock():
        store.clean_temp(stale_only=True)
        current = store.get_ref(name)
        if current != head:
            raise ConflictError(
                f"model {name!r} moved to {current} while consolidating onto {head}: run it again", model=name
            )
        version = next_version(store, name, parent.version)
        records = {}
        for bname in run_names:
            entry = parent.branches.get(bname)
            prov = thaw(entry.provenance or {}) if entry is not None else {}
            prov["consolidation"] = {**record, "since_version": version}
            kept_metrics = thaw(entry.metrics or {}) if entry is not None and not run_eval else None
            records[bname] = TrainedRecord(
                metrics=metrics.get(bname) or kept_metrics or {},
                provenance=prov,
                fingerprint=fingerprints[bname],
            )
        drafted = build_manifest(
            store,
            trunk=model.trunk,
            branches={b: (model.branch(b) if b in run_names else None) for b in model.branch_names},
            base_entry=parent.base,
            parent=parent,
            name=name,
            version=version,
            message=message,
            base=model.base,
            previous=parent,
            kept=parent.branches,
            records=records,
        )
        h = store.put_manifest(drafted)
        store.set_ref(name, h, expected=current, reason=message)
    banks = [
        bh
        for f, bh, _ in banks_of(drafted)
        if f.startswith("trunk.") or any(f.startswith(f"branches.{b}.") for b in run_names)
    ]
    result.bank_bytes = sum(store.object_path(b).stat().st_size for b in set(banks))
    result.manifest, result.version = str(h), version
    result.new_trunk, result.branches = trunk_id(drafted), run_names
    return result


__all__ = ["ConsolidateResult", "average", "consolidate", "list_checkpoints"]
