"""``--backend onnx``: a composed model run by onnxruntime, from graphs exported once and cached.

:class:`OnnxModel` has the surface ``predict``, ``eval`` and ``serve`` use on a ``ScalerModel``
(``branch_names``, ``branch``, ``origin``, ``predict``, ``predict_rows``, ``predict_routed``,
``eval``), so the CLI swaps one for the other and nothing else changes.

**One graph per piece, so adding a branch never changes another branch's graph.** Not one graph
per branch set: a model's graphs are

* ``shared``: base (every in-encoder adapter off) + MoE trunk -> ``pooled``, ``hidden`` and every
  base layer below the last (``base_layer_0`` .. bottom to top). It carries all of them whatever
  the branches, so its bytes depend on the base and trunk only; a run fetches only the layers its
  branches read (the graph and its kernels are the same either way);
* per after-encoder branch a ``tail``: ``(pooled, hidden, mask[, layer_0 ..])`` -> ``logits``, the
  branch's adapter and head only (``base_layers`` of them, the last ones of the shared graph's);
* per in-encoder branch (``needs_base_pass``, e.g. ``peft-lora``) an ``own`` graph: base with its
  adapter on + trunk + its tail (``export.onnx_graph.ExportGraph`` of that branch alone), as
  ``ScalerModel.forward`` gives it its own pass.

Each graph is cached in the store (kind ``onnx``, ``onnx_cache``) under a key of what it is
bound to: the manifest's trunk id and base, the branch's strategy, head, banks and labels (tails
and own graphs), the exporter's and this backend's versions, onnx/onnxruntime/torch versions,
opset and precision. A model with a new branch finds its other branches' graphs under the same
keys: the very same bytes, so the same outputs (``torch.equal``). A graph is checked against the
torch model on the export's probe set (``TOLERANCE``) before it is cached; a cached graph whose
seal does not match is re-exported, never loaded.

``onnx-int8``: each graph through ``onnxruntime.quantization.quantize_dynamic`` (int8 weights,
MatMul/Gemm), cached under its own key; not checked against a tolerance (quantization moves
logits by ~1e-2; ``scaler export --int8 --eval-data`` measures accuracy).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from scaler_wizard.banks import ContentStore
from scaler_wizard.branch import Branch, Prediction, TrunkOutput
from scaler_wizard.errors import ExportError
from scaler_wizard.exporting.onnx_cache import graph_key, read_graph, write_graph
from scaler_wizard.exporting.onnx_check import probe_batches, quantize_int8, torch_logits
from scaler_wizard.exporting.onnx_export import (
    EXPORTER_VERSION,
    OPSET,
    TOLERANCE,
    _check_gatings,
    _first_line,
    _quiet,
    _require_onnx,
)
from scaler_wizard.exporting.onnx_graph import ExportGraph, ExportTrunk
from scaler_wizard.manifests.facts import trunk_id
from scaler_wizard.modeling.model import Origin, ScalerModel
from scaler_wizard.modeling.row_routing import RowBranches, RowRoutes, in_given_order, length_order

log = logging.getLogger(__name__)

#: The version of this backend's graph layout (shared / tail / own): part of every cache key.
BACKEND_VERSION = 1
BACKENDS = ("torch", "onnx", "onnx-int8")
PRECISIONS = {"onnx": "fp32", "onnx-int8": "int8"}


class SharedGraph(nn.Module):
    """Base (adapters off) + trunk -> (pooled, hidden, every base layer below the last)."""

    def __init__(self, model: ScalerModel, lower: int) -> None:
        super().__init__()
        self.base = model.base
        self.trunk = ExportTrunk(model)
        self.lower = lower

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden, layers = self.base.forward_layers(
            input_ids, attention_mask, self.lower, adapter=None, grad=False, **extra
        )
        out = self.trunk(hidden, attention_mask.bool())
        return (out.pooled, out.hidden, *layers)


class TailGraph(nn.Module):
    """One after-encoder branch on the shared graph's outputs -> its logits."""

    def __init__(self, branch: Branch) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, pooled: Tensor, hidden: Tensor, mask: Tensor, *layers: Tensor) -> Tensor:
        trunk = TrunkOutput(
            pooled=pooled, hidden=hidden, mask=mask.bool(), aux_loss=hidden.new_zeros(()), base_layers=layers
        )
        out: Tensor = self.branch(trunk)
        return out


@dataclass
class _Graph:
    role: str  # "shared", "tail" or "own"
    key: str
    session: Any
    inputs: tuple[str, ...]
    #: whether this run exported it (False: read from the cache)
    exported: bool


def parse_backend(value: str) -> str:
    """``value`` if it names a backend, else a one-line ExportError listing them."""
    if value not in BACKENDS:
        raise ExportError(f"unknown backend {value!r}: choose {', '.join(BACKENDS)}")
    return value


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "onnx": str(onnx.__version__),
        "onnxruntime": str(onnxruntime.__version__),
        "torch": str(torch.__version__),
    }


def _session(data: bytes, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def _trace(
    module: nn.Module, args: tuple[Tensor, ...], inputs: Sequence[str], outputs: Sequence[str]
) -> bytes:
    per_row = ("pooled", "logits")  # (batch, features): no sequence axis
    axes = {
        name: {0: "batch"} if name in per_row or name.startswith("logits_") else {0: "batch", 1: "sequence"}
        for name in (*inputs, *outputs)
    }
    with tempfile.TemporaryDirectory(prefix="scaler-onnx-") as tmp, _quiet(), torch.no_grad():
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
        return path.read_bytes()


def _quantize(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="scaler-onnx-int8-") as tmp, _quiet():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        quantize_int8(src, dst)
        return dst.read_bytes()


class OnnxModel:
    """A composed model whose base, trunk and branches run in onnxruntime (CPU).

    Build with :meth:`load` (or :func:`with_backend`). The torch model it wraps gives the
    tokenizer, the branches' labels and decoding (softmax / sigmoid of the logits), and the
    reference every newly exported graph is checked against.
    """

    def __init__(
        self, store: ContentStore, model: ScalerModel, *, precision: str = "fp32", threads: int | None = None
    ):
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8', not {precision!r}")
        if model.origin is None:
            raise ExportError("the ONNX backend runs a stored version (compose it from the store)")
        _require_onnx()
        self.store = store
        self.model = model.eval()
        self.precision = precision
        self.threads = threads
        self.training = False
        self._graphs: dict[str, _Graph] = {}  # "shared", or a branch name
        example = model.base.tokenize(["a b"], "cpu")
        self._has_tt = "token_type_ids" in example
        self._inputs = ("input_ids", "attention_mask", *(("token_type_ids",) if self._has_tt else ()))
        config: Any = model.base.model.config
        self._lower = int(config.num_hidden_layers)  # every base layer below the last, embeddings too

    @classmethod
    def load(
        cls,
        store: ContentStore,
        model_ref: str,
        *,
        branches: Sequence[str] | None = None,
        precision: str = "fp32",
        threads: int | None = None,
    ) -> OnnxModel:
        """Compose ``model_ref`` and prepare ``branches``' graphs (default: every branch)."""
        from scaler_wizard.modeling.compose import compose

        onnx_model = cls(store, compose(store, model_ref), precision=precision, threads=threads)
        onnx_model.prepare(onnx_model.branch_names if branches is None else branches)
        return onnx_model

    # -- the ScalerModel surface the CLI paths use ------------------------------------------
    @property
    def origin(self) -> Origin | None:
        return self.model.origin

    @property
    def branch_names(self) -> list[str]:
        return self.model.branch_names

    def branch(self, name: str) -> Branch:
        return self.model.branch(name)

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        return self

    @property
    def exported(self) -> list[str]:
        """The graphs this object exported (not found in the cache): "shared" or branch names."""
        return [k for k, g in self._graphs.items() if g.exported]

    # -- graphs ---------------------------------------------------------------------------
    def _bound(self, role: str, branch: str | None) -> dict[str, object]:
        origin = self.model.origin
        assert origin is not None
        manifest = origin.manifest
        bound: dict[str, object] = {
            "role": role,
            "backend_version": BACKEND_VERSION,
            "exporter_version": EXPORTER_VERSION,
            "opset": OPSET,
            "precision": "fp32",
            **_versions(),
            "trunk_id": trunk_id(manifest),
            "base": manifest.base.to_dict(),
        }
        if role == "shared":
            bound["lower"] = self._lower
        if branch is not None:
            entry = manifest.branches[branch]
            bound["branch"] = {
                "strategy": entry.strategy.to_dict(),
                "head": entry.head.to_dict(),
                "adapter_bank": entry.adapter_bank,
                "head_bank": entry.head_bank,
                "labels": list(entry.labels),
            }
            if role == "own":
                bound["branch_name"] = branch  # the adapter's name inside the base
        return bound

    def prepare(self, names: Sequence[str]) -> None:
        """Make sure every graph ``names`` need is loaded: from the cache, or exported, checked
        against the torch model and cached."""
        modules = {n: self.branch(n) for n in dict.fromkeys(names)}  # a bad name fails here
        if any(not m.adapter.needs_base_pass for m in modules.values()):
            self._graph("shared", None)
        for n, m in modules.items():
            self._graph("own" if m.adapter.needs_base_pass else "tail", n)

    def _graph(self, role: str, branch: str | None) -> _Graph:
        slot = branch or "shared"
        if slot in self._graphs:
            return self._graphs[slot]
        fp32 = self._bound(role, branch)
        key = graph_key(fp32)
        data = read_graph(self.store, key, fp32)
        exported = data is None
        if data is None:
            data = self._export(role, branch)
            write_graph(self.store, key, fp32, data)
        if self.precision == "int8":
            int8 = {**fp32, "precision": "int8", "fp32_key": key}
            key = graph_key(int8)
            quantized = read_graph(self.store, key, int8)
            exported = exported or quantized is None
            if quantized is None:
                quantized = _quantize(data)
                write_graph(self.store, key, int8, quantized)
            data = quantized
        session = _session(data, self.threads)
        graph = _Graph(role, key, session, tuple(i.name for i in session.get_inputs()), exported)
        self._graphs[slot] = graph
        log.info("onnx %s graph %s %s", role, slot, "exported and cached" if exported else "from the cache")
        return graph

    def _export(self, role: str, branch: str | None) -> bytes:
        """Trace one graph and check it against the torch model on the probe set."""
        model = self.model
        _check_gatings(model)
        batch = model.base.tokenize(
            ["a short text", "a somewhat longer example text, with padding in the other rows", "ok"], "cpu"
        )
        args = tuple(batch[k] for k in self._inputs)
        what = "the base and MoE trunk" if branch is None else f"branch {branch!r} ({self._strategy(branch)})"
        try:
            if role == "shared":
                layers = tuple(f"base_layer_{i}" for i in range(self._lower))
                data = _trace(
                    SharedGraph(model, self._lower), args, self._inputs, ("pooled", "hidden", *layers)
                )
            elif role == "own":
                assert branch is not None
                graph = ExportGraph(model, [branch], token_type_ids=self._has_tt)
                data = _trace(graph, args, self._inputs, (f"logits_{branch}",))
            else:
                assert branch is not None
                module = self.branch(branch)
                k = int(module.adapter.base_layers)
                with torch.inference_mode():
                    out = model.encode_batch(batch, base_layers=k)
                mask = batch["attention_mask"]
                names = ("pooled", "hidden", "mask", *(f"layer_{i}" for i in range(k)))
                tail_args = (
                    out.pooled.clone(),
                    out.hidden.clone(),
                    mask,
                    *(t.clone() for t in out.base_layers),
                )
                data = _trace(TailGraph(module), tail_args, names, ("logits",))
            session = _session(data, self.threads)
        except Exception as exc:  # the exporter and onnxruntime raise many types: one line
            raise ExportError(f"cannot export {what} to ONNX: {_first_line(exc)}") from exc
        self._check(role, branch, session)
        return data

    def _strategy(self, branch: str) -> str:
        assert self.model.origin is not None
        return self.model.origin.manifest.branches[branch].strategy.plugin

    def _check(self, role: str, branch: str | None, session: Any) -> None:
        """max |ONNX - torch| over the probe batches, refused over ``TOLERANCE``."""
        worst = 0.0
        for texts in probe_batches():
            batch = self.model.base.tokenize(texts, "cpu")
            feed = _feed(batch, self._inputs)
            try:
                if role == "shared":
                    with torch.inference_mode():
                        ref = self.model.encode_batch(batch).pooled.numpy()
                    got = session.run(["pooled"], feed)[0]
                else:
                    assert branch is not None
                    ref = torch_logits(self.model, batch, [branch])[branch]
                    if role == "own":
                        got = session.run(None, feed)[0]
                    else:
                        shared = self._graph("shared", None)
                        got = self._tail(branch, session, shared.session, feed)
            except Exception:  # onnxruntime refuses a probe batch: a failure
                got = None
            d = float("inf") if got is None or got.shape != ref.shape else float(np.max(np.abs(got - ref)))
            worst = max(worst, d if d == d else float("inf"))
        if not worst <= TOLERANCE:
            what = (
                "the base and MoE trunk (pooled output)"
                if branch is None
                else (f"branch {branch!r} (strategy {self._strategy(branch)!r})")
            )
            shown = f"{worst:.3g}" if worst != float("inf") else "inf (onnxruntime failed or gave NaN)"
            raise ExportError(f"the ONNX graph of {what} differs from torch: max |Δ| {shown} > {TOLERANCE:g}")

    def _tail(self, branch: str, tail: Any, shared: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
        k = int(self.branch(branch).adapter.base_layers)
        layers = [f"base_layer_{i}" for i in range(self._lower - k, self._lower)]
        pooled, hidden, *lower = shared.run(["pooled", "hidden", *layers], feed)
        tail_feed = {"pooled": pooled, "hidden": hidden, "mask": feed["attention_mask"]}
        tail_feed |= {f"layer_{i}": t for i, t in enumerate(lower)}
        names = {i.name for i in tail.get_inputs()}
        out: np.ndarray = tail.run(None, {n: v for n, v in tail_feed.items() if n in names})[0]
        return out

    # -- running --------------------------------------------------------------------------
    def logits(self, batch: dict[str, Tensor], names: Sequence[str]) -> dict[str, np.ndarray]:
        """``{branch: (B, L) logits}`` for a tokenized batch (one shared pass for every
        after-encoder branch, one own pass per in-encoder branch)."""
        return self._rows(batch, {n: None for n in names})

    def _rows(self, batch: dict[str, Tensor], routes: dict[str, list[int] | None]) -> dict[str, np.ndarray]:
        """Logits of each branch on its rows (None: every row), in the order of its rows."""
        self.prepare(list(routes))
        feed = _feed(batch, self._inputs)
        after = [n for n in routes if self._graphs[n].role == "tail"]
        shared: dict[str, np.ndarray] = {}
        if after:
            k = max(int(self.branch(n).adapter.base_layers) for n in after)
            # only what the tails read (a tail on the pooled output alone needs no token states)
            read = {i for n in after for i in self._graphs[n].inputs}
            wanted: list[str] = [o for o in ("pooled", "hidden") if o in read]
            wanted += [f"base_layer_{i}" for i in range(self._lower - k, self._lower)]
            wanted = wanted or ["pooled"]
            shared = dict(zip(wanted, self._graphs["shared"].session.run(wanted, feed), strict=True))
            shared["mask"] = feed["attention_mask"]
        out: dict[str, np.ndarray] = {}
        for n, rows in routes.items():
            graph = self._graphs[n]
            idx = None if rows is None else np.asarray(rows, dtype=np.int64)
            if graph.role == "own":
                sub = feed if idx is None else {k: v[idx] for k, v in feed.items()}
                out[n] = graph.session.run(None, {k: v for k, v in sub.items() if k in graph.inputs})[0]
                continue
            k = int(self.branch(n).adapter.base_layers)
            tail_feed: dict[str, np.ndarray] = {
                n_: shared[n_] for n_ in ("pooled", "hidden", "mask") if n_ in shared
            }
            tail_feed |= {f"layer_{i}": shared[f"base_layer_{self._lower - k + i}"] for i in range(k)}
            if idx is not None:
                tail_feed = {name: v[idx] for name, v in tail_feed.items()}
            out[n] = graph.session.run(None, {k: v for k, v in tail_feed.items() if k in graph.inputs})[0]
        return out

    def predict(
        self, texts: str | Sequence[str], branches: str | Sequence[str] | None = None, *, batch_size: int = 32
    ) -> dict[str, list[Prediction]] | dict[str, Prediction]:
        """``ScalerModel.predict``'s contract: ``{branch: [Prediction per text]}`` (one string:
        ``{branch: Prediction}``)."""
        names = (
            self.branch_names
            if branches is None
            else [branches]
            if isinstance(branches, str)
            else list(branches)
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        single = isinstance(texts, str)
        items = [texts] if isinstance(texts, str) else list(texts)
        bad = next((t for t in items if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"predict() takes texts as strings, not {type(bad).__name__}")
        modules = {n: self.branch(n) for n in names}
        self.prepare(names)
        order = length_order(items)
        done: dict[str, list[Prediction]] = {n: [] for n in names}
        for start in range(0, len(items), batch_size):
            batch = self.model.base.tokenize([items[i] for i in order[start : start + batch_size]], "cpu")
            logits = self.logits(batch, names)
            for n in names:
                done[n].extend(modules[n].decode(torch.from_numpy(logits[n])))
        out = {n: in_given_order(done[n], order) for n in names}
        if single:
            return {n: preds[0] for n, preds in out.items()}
        return out

    def predict_routed(
        self, texts: Sequence[str], row_branches: RowBranches, batch_size: int = 32
    ) -> list[dict[str, Prediction]]:
        """For each text, ``{branch: Prediction}`` for the branches its row names (the serving
        batcher's call: one shared pass per batch, each tail on its rows)."""
        if isinstance(texts, str):
            raise TypeError("predict_rows() takes a list of texts, not one string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        routes = RowRoutes.of(row_branches, len(texts))
        modules = {n: self.branch(n) for n in routes.rows}
        self.prepare(list(routes.rows))
        entries = list(row_branches)
        order = length_order(texts)
        out: list[dict[str, Prediction]] = [{} for _ in texts]
        for start in range(0, len(texts), batch_size):
            picked = order[start : start + batch_size]
            chunk = [texts[i] for i in picked]
            chunk_routes = RowRoutes.of([entries[i] for i in picked], len(chunk))
            batch = self.model.base.tokenize(chunk, "cpu")
            logits = self._rows(batch, dict(chunk_routes.rows.items()))
            for n, rows in chunk_routes.rows.items():
                for row, pred in zip(rows, modules[n].decode(torch.from_numpy(logits[n])), strict=True):
                    out[picked[row]][n] = pred
        return out

    def predict_rows(
        self, texts: Sequence[str], branches_per_row: Sequence[str], *, batch_size: int = 32
    ) -> list[Prediction]:
        """One Prediction per text, from the branch its row names."""
        if isinstance(branches_per_row, str) or not all(isinstance(b, str) for b in branches_per_row):
            raise TypeError("predict_rows() takes one branch name (a string) per text")
        routed = self.predict_routed(texts, branches_per_row, batch_size)
        return [preds[b] for preds, b in zip(routed, branches_per_row, strict=True)]


def _feed(batch: dict[str, Tensor], inputs: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: batch[k].cpu().numpy().astype(np.int64) for k in inputs if k in batch}


def with_backend(
    store: ContentStore,
    model: ScalerModel,
    backend: str,
    *,
    branches: Sequence[str] | None = None,
    threads: int | None = None,
) -> ScalerModel | OnnxModel:
    """``model`` itself for ``torch``; an :class:`OnnxModel` on it, ``branches``' graphs ready
    (default every branch), for ``onnx`` / ``onnx-int8``."""
    if parse_backend(backend) == "torch":
        return model
    onnx_model = OnnxModel(store, model, precision=PRECISIONS[backend], threads=threads)
    onnx_model.prepare(model.branch_names if branches is None else branches)
    return onnx_model


__all__ = ["BACKENDS", "BACKEND_VERSION", "OnnxModel", "parse_backend", "with_backend"]
