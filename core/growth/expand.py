"""``scaler expand``: grow a model's trunk, prove it computes the same, commit one new version.

1. Compose the model's current version and load every branch.
2. Apply the operator to a copy of the trunk (the composed trunk is not touched).
3. Run every branch on the probe set (the fingerprint probe texts, or given ones) with the old
   trunk and with the new one; refuse (:class:`GrowthError`, nothing stored) when the largest
   |delta logits| exceeds the tolerance (1e-5).
4. Under the store lock: write the new trunk's banks, and derive the version with the one
   builder (``with_trunk``). Branches recorded on the old trunk are *re-recorded* on the new
   one, since they were just shown to compute the same there; their provenance gains a
   ``growth`` record (operator, arguments, the version, the trunk they came from, their
   measured delta). A branch already stale stays as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import GrowthError, ModelNotFoundError
from scaler_wizard.growth.commit import commit_trunk
from scaler_wizard.growth.operators import Operator
from scaler_wizard.manifests.facts import is_stale, trunk_ids
from scaler_wizard.manifests.model import BranchEntry, Manifest, thaw
from scaler_wizard.modeling.compose import compose
from scaler_wizard.modeling.fingerprint import PROBE_SET, PROBE_TEXTS
from scaler_wizard.modeling.model import ScalerModel, Trunk

#: the largest |delta logits| an expansion may cause on any branch (float32)
TOLERANCE = 1e-5
_BATCH = 32


@dataclass
class ExpandResult:
    model: str
    operator: str
    arguments: dict[str, Any]
    details: list[dict[str, Any]]
    max_delta: float
    deltas: dict[str, float]  # per branch
    probe: str
    probes: int
    tolerance: float
    parent: str
    parent_version: int
    old_trunk: str
    manifest: str | None = None  # None: checked only (--dry-run)
    version: int | None = None
    new_trunk: str | None = None
    rerecorded: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_probe_file(path: Path) -> list[str]:
    """Probe texts from a file: one text per non-empty line."""
    try:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise GrowthError(f"--probe {path}: cannot read it ({exc.__class__.__name__})") from exc
    texts = [t for t in texts if t]
    if not texts:
        raise GrowthError(f"--probe {path}: no texts (one per line)")
    return texts


@torch.inference_mode()
def _logits(model: ScalerModel, names: list[str], texts: Sequence[str]) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, len(texts), _BATCH):
        batch = model.base.tokenize(list(texts[start : start + _BATCH]), model.device)
        logits = model(**batch, branches=names).logits
        for n in names:
            out[n].append(logits[n].float().cpu())
    return {n: torch.cat(v) for n, v in out.items()}


def measure(
    model: ScalerModel, new_trunk: Trunk, texts: Sequence[str]
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per branch max |delta logits| between the model's trunk and ``new_trunk`` on ``texts``.

    With no branches, the pooled trunk output is compared instead (key ``(trunk)``)."""
    names = model.branch_names
    old_trunk = model.trunk
    model.eval()
    new_trunk.eval()
    if not names:
        with torch.inference_mode():
            deltas = []
            for start in range(0, len(texts), _BATCH):
                batch = model.base.tokenize(list(texts[start : start + _BATCH]), model.device)
                mask = batch["attention_mask"]
                hidden = model.base(batch["input_ids"], mask)
                a = old_trunk(hidden, mask.bool()).pooled
                b = new_trunk(hidden, mask.bool()).pooled
                deltas.append(float((a - b).abs().max()))
        return {"(trunk)": max(deltas)}, {}
    before = _logits(model, names, texts)
    model.trunk = new_trunk
    try:
        after = _logits(model, names, texts)
    finally:
        model.trunk = old_trunk
    return {n: float((after[n] - before[n]).abs().max()) for n in names}, after


def _rerecord(
    parent: Manifest, new_tid: str, record: dict[str, Any], deltas: dict[str, float]
) -> tuple[dict[str, BranchEntry], list[str]]:
    """The parent's branches recorded on its trunk, moved onto ``new_tid`` with a growth record."""
    old_ids = trunk_ids(parent)
    entries: dict[str, BranchEntry] = {}
    for name, entry in parent.branches.items():
        if entry.trunk is None or entry.trunk not in old_ids or is_stale(entry):
            continue
        prov = thaw(entry.provenance or {})
        growth = list(prov.get("growth") or [])
        growth.append({**record, "from_trunk": entry.trunk, "max_abs_delta": deltas.get(name)})
        prov["growth"] = growth
        entries[name] = dataclasses.replace(entry, trunk=new_tid, provenance=prov)
    return entries, sorted(entries)


def _message(op: Operator, max_delta: float, n_branches: int) -> str:
    args = ", ".join(f"{k} {v}" for k, v in op.arguments().items() if v is not None)
    return (
        f"expand {op.name}: {args} (max |delta logits| {max_delta:.2e} <= {TOLERANCE:.0e} "
        f"on {n_branches} branches)"
    )


def expand(
    store: ContentStore,
    name: str,
    op: Operator,
    *,
    probe_texts: Sequence[str] | None = None,
    tolerance: float = TOLERANCE,
    dry_run: bool = False,
) -> ExpandResult:
    """Grow model ``name``'s trunk with ``op``; a new version when it provably computes the same."""
    head = store.get_ref(name)
    if head is None:
        raise ModelNotFoundError(f"no model named {name!r}", name=name, available=store.models())
    model = compose(store, str(head))
    assert model.origin is not None
    parent = model.origin.manifest
    model.load_all_branches()
    new_trunk = op.apply(model.trunk)
    texts = list(probe_texts) if probe_texts is not None else list(PROBE_TEXTS)
    if not texts:
        raise GrowthError(f"{op.name}: no probe texts to check the expansion on", operator=op.name)
    deltas, _ = measure(model, new_trunk, texts)
    worst = max(deltas.values()) if deltas else 0.0
    result = ExpandResult(
        model=name,
        operator=op.name,
        arguments=op.arguments(),
        details=op.details(),
        max_delta=worst,
        deltas=deltas,
        probe=PROBE_SET if probe_texts is None else "file",
        probes=len(texts),
        tolerance=tolerance,
        parent=str(head),
        parent_version=parent.version,
        old_trunk=trunk_ids(parent)[0],
    )
    if not worst <= tolerance:  # NaN refuses too
        where = max(deltas, key=lambda n: deltas[n])
        raise GrowthError(
            f"{op.name}: max |delta logits| {worst:.3g} on branch {where!r} exceeds {tolerance:.0e}: "
            "not function-preserving, nothing stored",
            operator=op.name,
            max_delta=worst,
        )
    if dry_run:
        return result

    def rerecord(new_tid: str, version: int) -> tuple[dict[str, BranchEntry], list[str]]:
        record: dict[str, Any] = {"operator": op.name, "arguments": op.arguments(), "since_version": version}
        if op.details():
            record["details"] = op.details()
        return _rerecord(parent, new_tid, record, deltas)

    message = _message(op, worst, len(parent.branches))
    done = commit_trunk(
        store, name, str(head), parent, new_trunk, message=message, doing="expanding", rerecord=rerecord
    )
    result.manifest, result.version, result.new_trunk, result.rerecorded = (
        done.manifest,
        done.version,
        done.new_trunk,
        done.rerecorded,
    )
    return result


__all__ = ["TOLERANCE", "ExpandResult", "expand", "measure", "read_probe_file"]
