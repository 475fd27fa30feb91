"""``scaler export --format onnx``: base + MoE trunk + the chosen branches' tails as ONE ONNX graph.

The export holds::

    DEST/model.onnx        inputs input_ids, attention_mask[, token_type_ids] (int64, dynamic
                           batch and sequence axes); one output logits_<branch> per branch
    DEST/model.int8.onnx   with --int8: the same graph, weights quantized (quantize_dynamic)
    DEST/tokenizer files   the base's tokenizer, verbatim (tokenizer.json, vocab.txt, ...)
    DEST/export.json       model, version, manifest hash, exporter version, branches (labels,
                           strategy, head, output name), max |Δ logits| vs torch, accuracies

Each graph's ``metadata_props`` carry the same facts (``scaler.*`` keys). The graph is traced
(``torch.onnx.export``, TorchScript exporter) from ``onnx_graph.ExportGraph``, then run with
onnxruntime on the fingerprint probe texts plus long texts and compared with the torch model
(``ScalerModel.forward``): a branch whose logits differ by more than ``TOLERANCE`` refuses the
export. Everything is written into a temporary folder next to ``DEST`` and renamed into place
at the end; nothing is left behind on failure.

onnx and onnxruntime (the ``onnx`` extra) are imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import BranchNotFoundError, ExportError, did_you_mean
from scaler_wizard.exporting.onnx_check import (
    EvalSet,
    accuracy,
    describe,
    max_abs_diff,
    onnx_predictions,
    open_session,
    pooled_max_abs_diff,
    quantize_int8,
)
from scaler_wizard.exporting.onnx_graph import ExportGraph, ExportPooled, ExportTail
from scaler_wizard.exporting.peft_export import SkippedBranch
from scaler_wizard.exporting.staging import check_dest, staged
from scaler_wizard.manifests.facts import branch_trunk_problem, trunk_id
from scaler_wizard.modeling.base_encoder import BASE_FILES
from scaler_wizard.modeling.compose import compose
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.plugin_manager import Registry

#: The version of this exporter (graph layout, metadata keys): a backend cache keys on it.
EXPORTER_VERSION = 2
#: Largest max |Δ logits| (fp32 ONNX vs torch) an export accepts.
TOLERANCE = 1e-4
OPSET = 17
GRAPH_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INFO_FILE = "export.json"


@dataclass(frozen=True)
class OnnxBranch:
    name: str
    strategy: str
    head: str
    labels: tuple[str, ...]
    multilabel: bool
    max_abs_diff: float  # fp32 graph vs torch, over the probe set
    int8_max_abs_diff: float | None = None
    #: per eval file: {"fp32": accuracy, "int8": accuracy or None, "rows": n}
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return f"logits_{self.name}"


@dataclass(frozen=True)
class OnnxExportResult:
    dest: Path
    model: str
    version: int
    manifest_hash: str
    inputs: tuple[str, ...]
    branches: tuple[OnnxBranch, ...]
    skipped: tuple[SkippedBranch, ...]
    files: tuple[str, ...]
    int8: bool

    @property
    def max_abs_diff(self) -> float:
        return max((b.max_abs_diff for b in self.branches), default=0.0)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): "
            "pip install 'scaler-wizard[onnx]'"
        ) from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No tracer/deprecation warnings or quantizer log lines on the user's terminal (the probe
    check is the proof)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _choose(model: ScalerModel, names: Sequence[str] | None) -> tuple[list[str], list[SkippedBranch]]:
    assert model.origin is not None
    manifest, label = model.origin.manifest, f"{model.origin.name}@{model.origin.manifest.version}"
    chosen: list[str] = []
    skipped: list[SkippedBranch] = []
    if names:
        for b in names:
            if b not in manifest.branches:
                raise BranchNotFoundError(
                    f"no branch named {b!r} in {label} {did_you_mean(b, list(manifest.branches))}",
                    branch=b,
                    model=model.origin.name,
                    available=list(manifest.branches),
                )
            problem = branch_trunk_problem(manifest, b)
            if problem is not None:
                raise ExportError(f"cannot export {problem}")
            if b not in chosen:
                chosen.append(b)
        return chosen, skipped
    for b, entry in manifest.branches.items():
        problem = branch_trunk_problem(manifest, b)
        if problem is None:
            chosen.append(b)
        else:
            skipped.append(SkippedBranch(b, entry.strategy.plugin, problem))
    if not chosen:
        what = "it has no branches" if not manifest.branches else "every branch is stale"
        raise ExportError(f"nothing to export as ONNX from {label}: {what}")
    return chosen, skipped


def _check_gatings(model: ScalerModel) -> None:
    """A capacity limit at inference makes a token's output depend on the batch: refused."""
    assert model.origin is not None
    for i, layer in enumerate(model.trunk.layers):
        cfg = getattr(layer.gating, "config", None)
        if getattr(cfg, "capacity_at_inference", False) and getattr(cfg, "capacity_factor", None) is not None:
            plugin = model.origin.manifest.trunk.layers[i].gating.plugin
            raise ExportError(
                f"cannot export trunk.layers[{i}] (gating {plugin!r}) to ONNX: it caps expert "
                "capacity at inference, which makes outputs depend on the batch"
            )


def _strategy(model: ScalerModel, name: str) -> str:
    assert model.origin is not None
    return model.origin.manifest.branches[name].strategy.plugin


def _check_tails(model: ScalerModel, names: Sequence[str]) -> None:
    """Export each after-encoder branch's tail alone (cheap) to name one that cannot export."""
    d = model.base.hidden_size
    hidden = torch.randn(2, 5, d)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for name in names:
        branch = model.branch(name)
        if branch.adapter.needs_base_pass:
            continue
        try:
            with _quiet(), torch.no_grad(), tempfile.TemporaryDirectory(prefix="scaler-onnx-") as tmp:
                torch.onnx.export(
                    ExportTail(branch, model.trunk.pooling).eval(),
                    (hidden, mask),
                    str(Path(tmp) / "tail.onnx"),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=["hidden", "mask"],
                    dynamic_axes={"hidden": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}},
                )
        except Exception as exc:  # the exporter raises many types; one line naming the branch
            raise ExportError(
                f"cannot export branch {name!r} (strategy {_strategy(model, name)!r}) to ONNX: "
                f"{_first_line(exc)}"
            ) from exc


def _export_graph(model: ScalerModel, names: Sequence[str], path: Path) -> tuple[str, ...]:
    example = model.base.tokenize(
        ["a short text", "a somewhat longer example text, with padding in the other rows", "ok"], "cpu"
    )
    has_tt = "token_type_ids" in example
    inputs = ("input_ids", "attention_mask", *(("token_type_ids",) if has_tt else ()))
    outputs = [f"logits_{n}" for n in names]
    graph = ExportGraph(model, names, token_type_ids=has_tt).eval()
    axes = {k: {0: "batch", 1: "sequence"} for k in inputs} | {o: {0: "batch"} for o in outputs}
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                graph,
                tuple(example[k] for k in inputs),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(inputs),
                output_names=outputs,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    except Exception as exc:
        own = [f"{n!r} ({_strategy(model, n)})" for n in names if model.branch(n).adapter.needs_base_pass]
        suspects = f" (in-encoder branches: {', '.join(own)})" if own else ""
        raise ExportError(f"the model does not export to ONNX{suspects}: {_first_line(exc)}") from exc
    return inputs


def _blame_trunk(model: ScalerModel, inputs: Sequence[str], path: Path, tolerance: float) -> None:
    """Branches differ: if the shared pass alone (base + trunk) already does, the trunk is to
    blame (e.g. a gating whose routing the tracer froze), not the branches."""
    assert model.origin is not None
    example = model.base.tokenize(
        ["a short text", "a somewhat longer example text with padding", "ok"], "cpu"
    )
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                ExportPooled(model).eval(),
                tuple(example[k] for k in inputs),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(inputs),
                output_names=["pooled"],
                dynamic_axes={k: {0: "batch", 1: "sequence"} for k in inputs},
            )
        diff = pooled_max_abs_diff(open_session(path), model)
    except Exception:  # the full graph exported: this one should too; if not, blame the branches
        return
    if diff <= tolerance:
        return
    gatings = sorted({layer.gating.plugin for layer in model.origin.manifest.trunk.layers})
    raise ExportError(
        f"the model's MoE trunk (gating {', '.join(map(repr, gatings))}) does not export to ONNX "
        f"faithfully: its pooled output differs from torch by {describe(diff)} > {tolerance:g}, so every "
        "branch's does"
    )


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in sorted(props.items()):
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def _metadata(info: dict[str, Any], precision: str) -> dict[str, str]:
    props = {
        "scaler.exporter_version": str(info["exporter_version"]),
        "scaler.model": info["model"],
        "scaler.version": str(info["version"]),
        "scaler.manifest": info["manifest_hash"],
        "scaler.trunk_id": info["trunk_id"],
        "scaler.precision": precision,
        "scaler.max_length": str(info["max_length"]),
        "scaler.branches": json.dumps(
            {b["name"]: {k: v for k, v in b.items() if k != "name"} for b in info["branches"]}, sort_keys=True
        ),
    }
    for b in info["branches"]:
        props[f"scaler.labels.{b['name']}"] = json.dumps(b["labels"])
    return props


def _copy_tokenizer(store: ContentStore, model: ScalerModel, folder: Path) -> list[str]:
    assert model.origin is not None
    files = model.origin.manifest.base.files
    written = []
    for name in BASE_FILES:
        if name in files and name != "config.json":
            shutil.copyfile(store.verified_path(files[name]), folder / name)
            written.append(name)
    return written


def _eval_targets(model: ScalerModel, names: Sequence[str], sets: Sequence[EvalSet]) -> dict[str, list[str]]:
    """Per eval set, the exported single-label branches whose labels hold all of its labels."""
    targets: dict[str, list[str]] = {}
    for s in sets:
        wanted = set(s.labels)
        fits = [
            n for n in names if not model.branch(n).head.multilabel and wanted <= set(model.branch(n).labels)
        ]
        if not fits:
            raise ExportError(
                f"{s.name}: its labels ({', '.join(sorted(wanted)[:6])}) are not the labels of any "
                f"exported single-label branch ({', '.join(names)})"
            )
        targets[s.name] = fits
    return targets


def export_onnx(
    store: ContentStore,
    model_ref: str,
    dest: str | os.PathLike[str],
    *,
    branches: Sequence[str] | None = None,
    int8: bool = False,
    eval_sets: Sequence[EvalSet] = (),
    registry: Registry | None = None,
    tolerance: float = TOLERANCE,
) -> OnnxExportResult:
    """Export ``model_ref`` (base, trunk and ``branches``, default all) as one ONNX graph in ``dest``.

    Checked against the torch model before anything final is written: a branch over
    ``tolerance`` (max |Δ logits|) is a one-line ``ExportError``, as is a branch whose module
    cannot be exported. ``int8`` adds a dynamically quantized graph; ``eval_sets`` measure
    each matching branch's accuracy (fp32, and int8 when made), stored in ``export.json``.
    """
    dest_path = Path(dest).expanduser().absolute()
    check_dest(dest_path)
    _require_onnx()
    model: ScalerModel = compose(store, model_ref, registry=registry)
    assert model.origin is not None
    origin = model.origin
    manifest = origin.manifest
    names, skipped = _choose(model, branches)
    for n in names:
        model.branch(n)  # load (and check) every branch before any work
    _check_gatings(model)
    targets = _eval_targets(model, names, eval_sets)
    _check_tails(model, names)

    with staged(dest_path) as staging:
        graph_path = staging / GRAPH_FILE
        inputs = _export_graph(model, names, graph_path)
        try:
            session = open_session(graph_path)
        except Exception as exc:  # onnxruntime raises its own types
            raise ExportError(f"onnxruntime cannot load the exported graph: {_first_line(exc)}") from exc
        diffs = max_abs_diff(session, model, names)
        bad = {n: d for n, d in diffs.items() if not d <= tolerance}
        if bad:
            _blame_trunk(model, inputs, staging / "trunk.onnx", tolerance)
            worst = max(bad, key=lambda n: bad[n])
            raise ExportError(
                f"the ONNX graph differs from the torch model for branch {worst!r} (strategy "
                f"{_strategy(model, worst)!r}): max |Δ logits| {describe(bad[worst])} > {tolerance:g}"
                + (f" ({len(bad) - 1} more branches over)" if len(bad) > 1 else "")
            )
        int8_diffs: dict[str, float] = {}
        int8_session = None
        if int8:
            try:
                with _quiet():
                    quantize_int8(graph_path, staging / INT8_FILE)
                int8_session = open_session(staging / INT8_FILE)
            except Exception as exc:  # the quantizer and onnxruntime raise many types
                raise ExportError(f"int8 quantization failed: {_first_line(exc)}") from exc
            int8_diffs = max_abs_diff(int8_session, model, names)
        acc: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in names}
        for s in eval_sets:
            fits = targets[s.name]
            fp32 = onnx_predictions(session, model, s.texts, fits)
            q = onnx_predictions(int8_session, model, s.texts, fits) if int8_session is not None else None
            for n in fits:
                labels = model.branch(n).labels
                a32 = accuracy(fp32[n], s.labels, labels)
                a8 = accuracy(q[n], s.labels, labels) if q is not None else None
                acc[n][s.name] = {
                    "rows": len(s.texts),
                    "fp32": a32,
                    "int8": a8,
                    "change": None if a8 is None else a8 - a32,
                }
        del session, int8_session
        exported = tuple(
            OnnxBranch(
                name=n,
                strategy=_strategy(model, n),
                head=manifest.branches[n].head.plugin,
                labels=tuple(model.branch(n).labels),
                multilabel=bool(model.branch(n).head.multilabel),
                max_abs_diff=diffs[n],
                int8_max_abs_diff=int8_diffs.get(n),
                accuracy=acc[n],
            )
            for n in names
        )
        tokenizer = _copy_tokenizer(store, model, staging)
        info: dict[str, Any] = {
            "exporter": "scaler-wizard onnx",
            "exporter_version": EXPORTER_VERSION,
            "model": origin.name,
            "version": manifest.version,
            "manifest_hash": origin.manifest_hash,
            "trunk_id": trunk_id(manifest),
            "max_length": model.base.max_length,
            "pooling": manifest.trunk.pooling,
            "opset": OPSET,
            "inputs": list(inputs),
            "graphs": {"fp32": GRAPH_FILE, **({"int8": INT8_FILE} if int8 else {})},
            "tokenizer_files": tokenizer,
            "tolerance": tolerance,
            "branches": [
                {
                    "name": b.name,
                    "output": b.output,
                    "strategy": b.strategy,
                    "head": b.head,
                    "multilabel": b.multilabel,
                    "labels": list(b.labels),
                    "max_abs_diff": b.max_abs_diff,
                    "int8_max_abs_diff": b.int8_max_abs_diff,
                    "accuracy": b.accuracy,
                }
                for b in exported
            ],
        }
        _set_metadata(graph_path, _metadata(info, "fp32"))
        if int8:
            _set_metadata(staging / INT8_FILE, _metadata(info, "int8"))
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files = tuple(sorted(p.name for p in staging.iterdir()))
    return OnnxExportResult(
        dest=dest_path,
        model=origin.name,
        version=manifest.version,
        manifest_hash=origin.manifest_hash,
        inputs=inputs,
        branches=exported,
        skipped=tuple(skipped),
        files=files,
        int8=int8,
    )


__all__ = [
    "EXPORTER_VERSION",
    "GRAPH_FILE",
    "INFO_FILE",
    "INT8_FILE",
    "TOLERANCE",
    "EvalSet",
    "OnnxBranch",
    "OnnxExportResult",
    "export_onnx",
]
