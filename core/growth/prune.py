"""``scaler experts prune``: remove the experts routing rarely uses; one new version.

1. Compose the model's current version and load every branch.
2. Run it once over the given texts, counting per layer how many tokens each expert is routed
   to (its *utilisation*: the share of the layer's tokens sent to it; under top-k the shares
   sum to k, uniform routing gives each k/E).
3. In every layer remove the experts whose utilisation is below the threshold, keeping at least
   the gating's k (refused otherwise: GrowthError, nothing stored). Their ``w_in``/``b_in``/
   ``w_out``/``b_out`` slices and their router and noise rows go; the gating plugin and config
   stay (a ``capacity_factor`` is kept as it is: the capacity ``ceil(f N k / E)`` is per expert,
   so the total stays ``f N k``).
4. The kept experts' output projections are refit by least squares on the same texts' tokens
   (``growth/prune_refit.py``; off with ``refit=False`` / ``--no-refit``), so each pruned layer
   gives what the unpruned one gave as nearly as its kept experts can.
   Pruning is still not function-preserving: the branches' accuracy on the labelled data given
   for them (``--eval``) and the max |delta logits| over the texts are measured before and after.
5. Under the store lock, the new trunk's banks and one version through ``with_trunk``. The
   branches recorded on the old trunk are re-recorded on the new one (not stale: the user chose
   to prune and was shown the effect) with new fingerprints and a ``growth`` provenance record
   holding the measured effect; a branch already stale stays as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import ContentStore
from scaler_wizard.branch import shared_base_layers
from scaler_wizard.errors import DataError, GrowthError, ModelNotFoundError
from scaler_wizard.growth.commit import commit_trunk
from scaler_wizard.growth.experts import SUPPORTED_GATINGS
from scaler_wizard.growth.prune_refit import REFIT_RIDGE, REFIT_TOKENS, refit_pruned, sample_tokens
from scaler_wizard.manifests.facts import is_stale, trunk_ids
from scaler_wizard.manifests.model import BranchEntry, Manifest, thaw
from scaler_wizard.modeling.compose import compose, new_trunk_layer
from scaler_wizard.modeling.fingerprint import fingerprint_of, probe_logits
from scaler_wizard.modeling.model import ScalerModel, Trunk
from scaler_wizard.modeling.row_routing import length_order
from scaler_wizard.moe import MoELayer
from scaler_wizard.training.config import BranchSpec
from scaler_wizard.training.data import FORMATS, load_labelled
from scaler_wizard.training.metrics import classification_metrics
from scaler_wizard.training.readers import read_columns
from scaler_wizard.training.targets import label_targets

_OP = "prune"
_BATCH = 32


@dataclass
class LayerPrune:
    layer: int
    utilization: list[float]  # per expert (before), share of the layer's tokens
    kept: list[int]
    removed: list[int]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "experts_before": len(self.utilization),
            "experts_after": len(self.kept),
            "kept": self.kept,
            "removed": self.removed,
            "utilization": [round(u, 6) for u in self.utilization],
        }


@dataclass
class PruneResult:
    model: str
    threshold: float
    data: str
    data_sha256: str
    texts: int
    tokens: int
    layers: list[dict[str, Any]]
    deltas: dict[str, float]  # per branch, max |delta logits| over the texts (and eval rows)
    max_delta: float
    accuracy: dict[str, dict[str, Any]]  # per evaluated branch: before/after accuracy and macro-F1
    parent: str
    parent_version: int
    old_trunk: str
    manifest: str | None = None  # None: measured only (--dry-run)
    version: int | None = None
    new_trunk: str | None = None
    rerecorded: list[str] = dataclasses.field(default_factory=list)
    #: the least-squares refit of the kept experts' output projections: {tokens, ridge,
    #: skipped_layers}; None: off
    refit: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_texts(path: Path, text_column: str = "text") -> list[str]:
    """The texts of ``path``: a column of a CSV/TSV/JSONL/Parquet file, or a .txt file's lines."""
    if not path.is_file():
        raise DataError(f"--data {path}: no such file", path=path)
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"--data {path}: cannot read it ({exc.__class__.__name__})", path=path) from exc
        texts = [t.strip() for t in lines if t.strip()]
    else:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"--data {path}: unknown format {path.suffix!r} (use .txt, .csv, .tsv, .jsonl or .parquet)",
                path=path,
            )
        cols = read_columns(path, fmt, text_column, text_column)
        texts = [t for t in cols.texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"--data {path}: no texts", path=path)
    return texts


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _top_k(layer: MoELayer, index: int) -> int:
    ref = layer.gating_ref
    if ref is None:
        raise GrowthError(f"prune: trunk layer {index} has no gating reference", operator=_OP)
    if ref.plugin not in SUPPORTED_GATINGS:
        raise GrowthError(
            f"prune: trunk layer {index}: gating {ref.plugin!r} is not one this command can prune "
            f"(it knows {', '.join(SUPPORTED_GATINGS)})",
            operator=_OP,
        )
    keys = set(layer.gating.state_dict())
    router = getattr(layer.gating, "router", None)
    if (
        not isinstance(router, torch.nn.Linear)
        or router.bias is not None
        or not keys
        <= {
            "router.weight",
            "noise.weight",
        }
    ):
        raise GrowthError(
            f"prune: trunk layer {index}: gating parameters {sorted(keys)} are not a bias-free router",
            operator=_OP,
        )
    return 1 if ref.plugin == "switch" else int(ref.config_dict().get("k", 1))


@dataclass
class Pass:
    """What one trunk computed over a set of texts."""

    logits: dict[str, torch.Tensor]  # per branch (N, labels)
    counts: list[torch.Tensor]  # per layer, tokens routed to each expert (float64)
    tokens: int


class Texts:
    """Texts with their base states, computed once and kept (each trunk reuses them). Batched
    from shortest to longest (little padding); :meth:`run` answers in the order given."""

    def __init__(self, model: ScalerModel, texts: Sequence[str], names: list[str]) -> None:
        self.model, self.names = model, names
        modules = [model.branch(n) for n in names]
        #: branches whose adapter sits inside the base run it themselves, with any trunk
        self.own = [n for n, m in zip(names, modules, strict=True) if m.adapter.needs_base_pass]
        self.lower = shared_base_layers(m for m in modules if not m.adapter.needs_base_pass)
        self.batches: list[tuple[dict[str, torch.Tensor], torch.Tensor, tuple[torch.Tensor, ...]]] = []
        self.order = length_order(texts)
        with torch.inference_mode():
            for start in range(0, len(texts), _BATCH):
                rows = self.order[start : start + _BATCH]
                batch = model.base.tokenize([texts[i] for i in rows], model.device)
                extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
                hidden, lower = model.base.forward_layers(
                    batch["input_ids"], batch["attention_mask"], self.lower, adapter=None, grad=False, **extra
                )
                self.batches.append((dict(batch), hidden, tuple(lower)))

    @torch.inference_mode()
    def run(self, trunk: Trunk) -> Pass:
        """Every branch's logits and the routing counts with ``trunk`` in place of the model's."""
        model = self.model
        model.eval()
        trunk.eval()
        layers = [lay for lay in trunk.layers if isinstance(lay, MoELayer)]
        counts = [torch.zeros(lay.num_experts, dtype=torch.float64) for lay in layers]
        out: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        tokens = 0
        kept = model.trunk
        model.trunk = trunk
        try:
            for batch, hidden, lower in self.batches:
                shared = trunk(hidden, batch["attention_mask"].bool())
                if lower:
                    shared.base_layers = lower
                for i, st in enumerate(shared.stats):
                    counts[i] += st.load.double().cpu() * st.tokens
                tokens += shared.stats[0].tokens if shared.stats else 0
                for n in self.names:
                    branch = model.branch(n)
                    if n in self.own:
                        own = model.encode_batch(batch, adapter=n, base_layers=branch.adapter.base_layers)
                        out[n].append(branch(own).float().cpu())
                    else:
                        out[n].append(branch(shared).float().cpu())
        finally:
            model.trunk = kept
        where = torch.tensor(self.order, dtype=torch.long)
        logits = {}
        for n, parts in out.items():
            sorted_logits = torch.cat(parts)
            logits[n] = torch.empty_like(sorted_logits).index_copy_(0, where, sorted_logits)
        return Pass(logits, counts, tokens)


def plan_prune(trunk: Trunk, counts: list[torch.Tensor], tokens: int, threshold: float) -> list[LayerPrune]:
    """Which experts each layer keeps; GrowthError when a layer would keep fewer than its k."""
    if not 0.0 <= threshold <= 1.0:
        raise GrowthError(f"prune: --min-utilization must be in [0, 1], not {threshold}", operator=_OP)
    if tokens == 0:
        raise GrowthError("prune: the data has no tokens to measure routing on", operator=_OP)
    plans = []
    for i, layer in enumerate(trunk.layers):
        assert isinstance(layer, MoELayer)
        k = _top_k(layer, i)
        share = (counts[i] / tokens).tolist()
        kept = [e for e, u in enumerate(share) if u >= threshold]
        if len(kept) < k:
            need = sorted(share, reverse=True)[k - 1]
            raise GrowthError(
                f"prune: layer {i} would keep {len(kept)} of {len(share)} experts, fewer than its "
                f"top-k {k}: use --min-utilization {need:.4g} or lower",
                operator=_OP,
            )
        plans.append(LayerPrune(i, share, kept, [e for e in range(len(share)) if e not in kept]))
    if not any(p.removed for p in plans):
        low = min(min(p.utilization) for p in plans)
        raise GrowthError(
            f"prune: no expert is below --min-utilization {threshold} (the lowest is {low:.4g}): "
            "nothing to prune",
            operator=_OP,
        )
    return plans


def prune_layer(layer: MoELayer, kept: list[int]) -> MoELayer:
    """A new layer holding only the experts ``kept`` (same gating plugin and config)."""
    ref = layer.gating_ref
    assert ref is not None
    cfg = ref.config_dict()
    if "num_experts" in cfg:
        cfg["num_experts"] = len(kept)
    new = new_trunk_layer(
        hidden_size=layer.hidden_size,
        num_experts=len(kept),
        expert_hidden=layer.expert_hidden,
        gating=ref.plugin,
        gating_config=cfg,
    )
    idx = torch.tensor(kept, dtype=torch.long)
    old = layer.state_dict()
    state = {}
    for key, value in old.items():
        if key in ("w_in", "b_in", "w_out", "b_out", "gating.router.weight", "gating.noise.weight"):
            state[key] = value.index_select(0, idx).clone()
        else:
            state[key] = value.clone()
    new.load_state_dict(state, strict=True)
    if "num_experts" not in cfg:
        new.gating_ref = ref
    return new.train(layer.training)


def pruned_trunk(trunk: Trunk, plans: list[LayerPrune]) -> Trunk:
    layers = []
    for plan, layer in zip(plans, trunk.layers, strict=True):
        assert isinstance(layer, MoELayer)
        layers.append(prune_layer(layer, plan.kept) if plan.removed else layer)
    return Trunk(layers, pooling=trunk.pooling).train(trunk.training)


def _accuracy(
    model: ScalerModel, new: Trunk, specs: Sequence[BranchSpec], deltas: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per evaluated branch: accuracy and macro-F1 with the old trunk and the new one."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.name not in model.branch_names:
            raise GrowthError(
                f"prune: --eval {spec.name}: the model has no branch {spec.name!r} "
                f"(it has {', '.join(model.branch_names) or 'none'})",
                operator=_OP,
            )
        labels = list(model.branch(spec.name).labels)
        data = load_labelled(
            spec.data, text_column=spec.text_column, label_column=spec.label_column, min_classes=1
        )
        y = label_targets(data, labels, str(spec.data), known_as="among the branch's labels").tolist()
        texts = Texts(model, data.texts, [spec.name])
        logits = {
            "before": texts.run(model.trunk).logits[spec.name],
            "after": texts.run(new).logits[spec.name],
        }
        del texts
        scores = {}
        for when, values in logits.items():
            m = classification_metrics(y, values.argmax(-1).tolist(), labels)
            scores[when] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        delta = float((logits["after"] - logits["before"]).abs().max())
        deltas[spec.name] = max(deltas.get(spec.name, 0.0), delta)
        out[spec.name] = {
            "data": str(spec.data),
            "data_sha256": _sha256(spec.data),
            "rows": len(data),
            **{f"{k}_before": v for k, v in scores["before"].items()},
            **{f"{k}_after": v for k, v in scores["after"].items()},
            "accuracy_change": scores["after"]["accuracy"] - scores["before"]["accuracy"],
            "macro_f1_change": scores["after"]["macro_f1"] - scores["before"]["macro_f1"],
        }
    return out


def _rerecord(
    parent: Manifest,
    new_tid: str,
    record: dict[str, Any],
    deltas: Mapping[str, float],
    accuracy: Mapping[str, Mapping[str, Any]],
    fingerprints: Mapping[str, dict[str, Any]],
) -> tuple[dict[str, BranchEntry], list[str]]:
    """The parent's branches recorded on its trunk, moved onto ``new_tid`` (new fingerprint,
    the measured effect of the pruning in ``provenance.growth``)."""
    old_ids = trunk_ids(parent)
    entries: dict[str, BranchEntry] = {}
    for name, entry in parent.branches.items():
        if entry.trunk is None or entry.trunk not in old_ids or is_stale(entry) or name not in fingerprints:
            continue
        prov = thaw(entry.provenance or {})
        effect: dict[str, Any] = {"max_abs_delta": deltas.get(name)}
        if name in accuracy:
            effect["eval"] = dict(accuracy[name])
        prov["growth"] = [*list(prov.get("growth") or []), {**record, "from_trunk": entry.trunk, **effect}]
        entries[name] = dataclasses.replace(
            entry, trunk=new_tid, provenance=prov, fingerprint=fingerprints[name]
        )
    return entries, sorted(entries)


def prune(
    store: ContentStore,
    name: str,
    *,
    threshold: float,
    data: Path,
    text_column: str = "text",
    evals: Sequence[BranchSpec] = (),
    dry_run: bool = False,
    refit: bool = True,
) -> PruneResult:
    """Remove the experts of model ``name`` routed fewer than ``threshold`` of the tokens of
    ``data``; with ``refit``, solve the kept experts' output projections on those tokens."""
    head = store.get_ref(name)
    if head is None:
        raise ModelNotFoundError(f"no model named {name!r}", name=name, available=store.models())
    texts = read_texts(data, text_column)
    model = compose(store, str(head))
    assert model.origin is not None
    parent = model.origin.manifest
    model.load_all_branches()
    names = model.branch_names
    cached = Texts(model, texts, names)
    before = cached.run(model.trunk)  # the routing statistics, gathered once
    tokens = before.tokens
    plans = plan_prune(model.trunk, before.counts, tokens, threshold)
    new_trunk = pruned_trunk(model.trunk, plans)
    refitted: dict[str, Any] | None = None
    if refit:
        states = [(hidden, batch["attention_mask"].bool()) for batch, hidden, _ in cached.batches]
        sample = sample_tokens(states, REFIT_TOKENS)
        skipped = refit_pruned(model.trunk, new_trunk, sample, REFIT_RIDGE)
        refitted = {"tokens": len(sample), "ridge": REFIT_RIDGE, "skipped_layers": skipped}
        del sample
    after = cached.run(new_trunk)
    del cached
    deltas = {n: float((after.logits[n] - before.logits[n]).abs().max()) for n in names}
    accuracy = _accuracy(model, new_trunk, evals, deltas)
    result = PruneResult(
        model=name,
        threshold=threshold,
        data=str(data),
        data_sha256=_sha256(data),
        texts=len(texts),
        tokens=tokens,
        layers=[p.to_json() for p in plans],
        deltas=deltas,
        max_delta=max(deltas.values(), default=0.0),
        accuracy=accuracy,
        parent=str(head),
        parent_version=parent.version,
        old_trunk=trunk_ids(parent)[0],
        refit=refitted,
    )
    if dry_run:
        return result
    old_trunk = model.trunk
    model.trunk = new_trunk
    try:
        fingerprints = {n: fingerprint_of(v) for n, v in probe_logits(model, names).items()}
    finally:
        model.trunk = old_trunk
    sizes = ", ".join(f"{p.layer}: {len(p.utilization)}->{len(p.kept)}" for p in plans if p.removed)
    how = f"; kept experts refit on {refitted['tokens']} tokens" if refitted else ""
    message = (
        f"prune experts below utilization {threshold:g} (layers {sizes}; "
        f"max |delta logits| {result.max_delta:.3g}{how})"
    )

    def rerecord(new_tid: str, version: int) -> tuple[dict[str, BranchEntry], list[str]]:
        record = {
            "operator": _OP,
            "arguments": {"min_utilization": threshold, "text_column": text_column, "refit": refit},
            "refit": refitted,
            "since_version": version,
            "data": {"path": str(data), "sha256": result.data_sha256, "texts": len(texts), "tokens": tokens},
            "details": result.layers,
        }
        return _rerecord(parent, new_tid, record, deltas, accuracy, fingerprints)

    done = commit_trunk(
        store, name, str(head), parent, new_trunk, message=message, doing="pruning", rerecord=rerecord
    )
    result.manifest, result.version, result.new_trunk, result.rerecorded = (
        done.manifest,
        done.version,
        done.new_trunk,
        done.rerecorded,
    )
    return result


__all__ = [
    "LayerPrune",
    "PruneResult",
    "plan_prune",
    "prune",
    "prune_layer",
    "pruned_trunk",
    "read_texts",
    "Pass",
    "Texts",
]
