"""Running an exported ONNX graph with onnxruntime, and checking it against the torch model.

onnxruntime is imported inside the functions only: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaler_wizard.modeling.fingerprint import PROBE_TEXTS
from scaler_wizard.modeling.model import ScalerModel

_LONG_WORDS = (
    "the central bank said on tuesday that inflation had slowed for a third month while wages "
    "kept rising faster than expected , and analysts who follow the markets closely warned that "
    "further rate increases could not be ruled out before the end of the year ; meanwhile the "
    "team announced a new coach , the city council approved a budget for roads and schools , and "
    "a long report on climate , trade and energy prices was published with many tables and notes"
).split()


def long_texts(count: int = 4, words: int = 230) -> list[str]:
    """``count`` deterministic news-like texts of ``words`` words (200+ tokens each)."""
    out = []
    for i in range(count):
        n = words + 17 * i
        out.append(" ".join(_LONG_WORDS[(i * 7 + j) % len(_LONG_WORDS)] for j in range(n)))
    return out


def probe_batches() -> list[list[str]]:
    """The batches the export is checked on: the fingerprint probe texts (padded, mixed
    lengths), long texts (200+ tokens, up to the base's max length), and one text alone."""
    return [list(PROBE_TEXTS), long_texts(), [PROBE_TEXTS[2]]]


def open_session(path: Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on ``path`` (``threads``: intra-op threads, default torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def session_logits(
    session: Any, batch: dict[str, torch.Tensor], branches: Sequence[str]
) -> dict[str, np.ndarray]:
    """One run of ``session`` on a tokenized batch: ``{branch: (B, L) logits}``."""
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.cpu().numpy().astype(np.int64) for k, v in batch.items() if k in names}
    outs = session.run([f"logits_{b}" for b in branches], feed)
    return dict(zip(branches, outs, strict=True))


@torch.inference_mode()
def torch_logits(
    model: ScalerModel, batch: dict[str, torch.Tensor], branches: Sequence[str]
) -> dict[str, np.ndarray]:
    """The torch model's logits (``ScalerModel.forward``) on the same batch."""
    out = model(**batch, branches=list(branches)).logits
    return {b: out[b].float().cpu().numpy() for b in branches}


def max_abs_diff(session: Any, model: ScalerModel, branches: Sequence[str]) -> dict[str, float]:
    """Per branch, max |ONNX - torch| over the probe batches."""
    diffs = dict.fromkeys(branches, 0.0)
    for texts in probe_batches():
        batch = model.base.tokenize(texts, model.device)
        try:
            got = session_logits(session, batch, branches)
        except Exception:  # onnxruntime refuses this batch (a shape the trace froze): a failure
            return dict.fromkeys(branches, float("inf"))
        ref = torch_logits(model, batch, branches)
        for b in branches:
            if got[b].shape != ref[b].shape:
                diffs[b] = float("inf")
            else:
                d = float(np.max(np.abs(got[b].astype(np.float64) - ref[b].astype(np.float64))))
                diffs[b] = max(diffs[b], d if d == d else float("inf"))  # NaN is a failure
    return diffs


def pooled_max_abs_diff(session: Any, model: ScalerModel) -> float:
    """max |ONNX - torch| of the shared pass's pooled output (an ``ExportPooled`` graph)."""
    worst = 0.0
    for texts in probe_batches():
        batch = model.base.tokenize(texts, model.device)
        names = {i.name for i in session.get_inputs()}
        try:
            got = session.run(None, {k: v.numpy().astype(np.int64) for k, v in batch.items() if k in names})[
                0
            ]
        except Exception:  # onnxruntime refuses this batch: a failure
            return float("inf")
        with torch.inference_mode():
            ref = model.encode_batch(batch).pooled.float().numpy()
        if got.shape != ref.shape:
            return float("inf")
        d = float(np.max(np.abs(got.astype(np.float64) - ref)))
        worst = max(worst, d if d == d else float("inf"))
    return worst


def describe(diff: float) -> str:
    """A max |Δ| for a message (inf: onnxruntime failed on a probe batch, or gave NaN)."""
    return f"{diff:.3g}" if diff != float("inf") else "inf (onnxruntime fails or gives NaN on a probe batch)"


@dataclass(frozen=True)
class EvalSet:
    """Labelled texts to measure accuracy on (``name``: the file it came from)."""

    name: str
    texts: list[str]
    labels: list[str]


def onnx_predictions(
    session: Any, model: ScalerModel, texts: Sequence[str], branches: Sequence[str], *, batch_size: int = 64
) -> dict[str, list[int]]:
    """Argmax label index per text and branch (batches of similar lengths, original order)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds: dict[str, list[int]] = {b: [0] * len(texts) for b in branches}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = model.base.tokenize([texts[i] for i in rows], "cpu")
        logits = session_logits(session, batch, branches)
        for b in branches:
            for i, p in zip(rows, logits[b].argmax(-1).tolist(), strict=True):
                preds[b][i] = int(p)
    return preds


def accuracy(preds: Sequence[int], labels: Sequence[str], names: Sequence[str]) -> float:
    index = {n: i for i, n in enumerate(names)}
    hits = sum(1 for p, lab in zip(preds, labels, strict=True) if index[lab] == p)
    return hits / max(len(labels), 1)


def quantize_int8(src: Path, dst: Path) -> None:
    """``src`` graph -> ``dst`` with int8 weights (per output channel) and dynamic uint8
    activations (``quantize_dynamic``): what ``--int8`` and ``--backend onnx-int8`` run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


__all__ = [
    "EvalSet",
    "accuracy",
    "describe",
    "long_texts",
    "max_abs_diff",
    "onnx_predictions",
    "open_session",
    "pooled_max_abs_diff",
    "probe_batches",
    "quantize_int8",
    "session_logits",
    "torch_logits",
]
