"""Backends (issue 16): torch eager, torch length-sorted, ONNX fp32 and ONNX int8 on the same texts.

For short texts (SMS, ``data/sms_spam.csv``) and long texts (200+ tokens: consecutive SMS
joined into one text, truncated at the base's max length as in every backend), each backend
tokenizes and computes every chosen branch's logits, batch by batch:

* ``torch``: ``ScalerModel.forward`` on batches in the given order (the reference);
* ``torch-sorted``: the same, texts sorted by length first (less padding), answers unsorted
  (what ``predict`` does since session 22);
* ``onnx-fp32`` / ``onnx-int8``: ``scaler export --format onnx [--int8]``'s graphs in
  onnxruntime (CPU, ``--threads`` intra-op threads), batches in the given order, as ``torch``;
* ``backend-onnx`` / ``backend-onnx-int8``: what ``--backend onnx[-int8]`` runs
  (``exporting.onnx_backend.OnnxModel.logits``: the cached shared base + trunk graph, then each
  branch's tail graph; the graphs are exported into the store's cache on the first run).

``--only a,b`` measures some of them (``torch`` is always measured: it is the reference).

Reported per text set: sentences/s (median of ``--repeats`` interleaved runs, CPU-time ratio
too), speed-up over ``torch``, max |Δ logits| against ``torch``; and per branch and eval file
(``--eval BRANCH=FILE``) the accuracy of each backend. The model is ``--model`` from
``--store`` (default: a fresh store under /tmp with branches ``spam`` and ``topic`` on a
perturbed trunk: untrained, so give ``--eval`` only with a trained model, e.g. the demo's).
Results: a table on stdout and ``bench/results/backends.json``.

    python bench/bench_backends.py [--store DIR --model demo] [--eval spam=data/sms_spam.csv
        --eval topic=data/trec.csv] [--short 512] [--long 64] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, load_sentences, machine_info, measure_interleaved, set_threads

RESULTS = REPO / "bench" / "results" / "backends.json"
Logits = dict[str, np.ndarray]


def make_store(root: Path) -> None:
    import torch

    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    store = ContentStore.open(root, create=True)
    init_model(store, "demo", seed=0)
    model = compose(store, "demo")
    torch.manual_seed(0)
    with torch.no_grad():  # a trunk that computes something (fresh ones are the identity)
        for p in model.trunk.parameters():
            if p.dim() > 0 and not bool(p.count_nonzero()):
                p.normal_(std=0.02)
    d = model.trunk_hidden_size()
    model.add_branch("spam", new_branch(hidden_size=d, labels=["ham", "spam"], strategy="attn-mlp"))
    topic = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    model.add_branch("topic", new_branch(hidden_size=d, labels=topic, strategy="lora"))
    save_version(store, model, message="bench: two branches")


def long_texts(n: int, *, per_text: int = 12) -> list[str]:
    sms = load_sentences(n * per_text, offset=2000)
    return [" ".join(sms[i * per_text : (i + 1) * per_text]) for i in range(n)]


def read_eval(spec: str, rows: int) -> tuple[str, str, list[str], list[str]]:
    branch, _, file = spec.partition("=")
    with open(file, newline="", encoding="utf-8") as fh:
        data = list(csv.DictReader(fh))[:rows]
    return branch, Path(file).name, [r["text"] for r in data], [r["label"] for r in data]


def torch_runner(
    model: Any, names: list[str], batch_size: int, *, sort: bool
) -> Callable[[list[str]], Logits]:
    import torch

    def run(texts: list[str]) -> Logits:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort else list(range(len(texts)))
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                batch = model.base.tokenize([texts[i] for i in order[s : s + batch_size]])
                out = model(**batch, branches=names).logits
                for n in names:
                    parts[n].append(out[n].numpy())
        inverse = np.argsort(np.array(order))
        return {n: np.concatenate(parts[n])[inverse] for n in names}

    return run


def onnx_runner(session: Any, model: Any, names: list[str], batch_size: int) -> Callable[[list[str]], Logits]:
    from scaler_wizard.exporting.onnx_check import session_logits

    def run(texts: list[str]) -> Logits:
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for s in range(0, len(texts), batch_size):
            out = session_logits(session, model.base.tokenize(texts[s : s + batch_size]), names)
            for n in names:
                parts[n].append(out[n])
        return {n: np.concatenate(parts[n]) for n in names}

    return run


def backend_runner(onnx_model: Any, names: list[str], batch_size: int) -> Callable[[list[str]], Logits]:
    """``--backend onnx``'s path: ``OnnxModel.logits`` batch by batch, in the given order."""

    def run(texts: list[str]) -> Logits:
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for s in range(0, len(texts), batch_size):
            out = onnx_model.logits(onnx_model.model.base.tokenize(texts[s : s + batch_size], "cpu"), names)
            for n in names:
                parts[n].append(out[n])
        return {n: np.concatenate(parts[n]) for n in names}

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="store folder (default: a fresh demo store under /tmp)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--branches", default="", help="comma-separated (default: every branch)")
    ap.add_argument("--eval", action="append", default=[], metavar="BRANCH=FILE", help="csv with text,label")
    ap.add_argument("--eval-rows", type=int, default=1000)
    ap.add_argument("--short", type=int, default=512, help="short (SMS) texts")
    ap.add_argument("--long", type=int, default=64, help="long (200+ token) texts")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", default="", help="comma-separated backends to measure (torch always)")
    args = ap.parse_args()

    set_threads(args.threads)
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.exporting.onnx_backend import OnnxModel
    from scaler_wizard.exporting.onnx_check import open_session
    from scaler_wizard.exporting.onnx_export import GRAPH_FILE, INT8_FILE, export_onnx
    from scaler_wizard.modeling.compose import compose

    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        root = args.store
        if root is None:
            root = Path(tmp) / "store"
            make_store(root)
        store = ContentStore.open(root)
        model = compose(store, args.model)
        names = [b for b in args.branches.split(",") if b] or model.branch_names
        only = {b for b in args.only.split(",") if b}
        makers: dict[str, Callable[[], Callable[[list[str]], Logits]]] = {
            "torch": lambda: torch_runner(model, names, args.batch_size, sort=False),
            "torch-sorted": lambda: torch_runner(model, names, args.batch_size, sort=True),
        }
        if not only or only & {"onnx-fp32", "onnx-int8"}:
            export = export_onnx(store, args.model, Path(tmp) / "onnx", branches=names, int8=True)
            makers["onnx-fp32"] = lambda: onnx_runner(
                open_session(export.dest / GRAPH_FILE, threads=args.threads), model, names, args.batch_size
            )
            makers["onnx-int8"] = lambda: onnx_runner(
                open_session(export.dest / INT8_FILE, threads=args.threads), model, names, args.batch_size
            )
        for backend, precision in (("backend-onnx", "fp32"), ("backend-onnx-int8", "int8")):
            makers[backend] = lambda precision=precision: backend_runner(
                OnnxModel.load(store, args.model, branches=names, precision=precision, threads=args.threads),
                names,
                args.batch_size,
            )
        backends = {b: make() for b, make in makers.items() if b == "torch" or not only or b in only}
        sets = {"short": load_sentences(args.short), "long": long_texts(args.long)}
        results: dict[str, Any] = {"sets": {}, "accuracy": {}}
        for set_name, texts in sets.items():
            tokens = [int(model.base.tokenize([t])["attention_mask"].sum()) for t in texts]
            ref = backends["torch"](texts)
            delta = {
                b: max(float(np.abs(fn(texts)[n] - ref[n]).max()) for n in names)
                for b, fn in backends.items()
            }
            times = measure_interleaved(
                {b: (lambda fn=fn, texts=texts: fn(texts)) for b, fn in backends.items()},
                warmup=args.warmup,
                repeats=args.repeats,
            )
            base = times["torch"]
            results["sets"][set_name] = {
                "texts": len(texts),
                "mean_tokens": sum(tokens) / len(tokens),
                "backends": {
                    b: {
                        "sentences_per_s": len(texts) / m.median,
                        "speedup": base.median / m.median,
                        "cpu_speedup": (base.cpu_median or 0) / (m.cpu_median or 1),
                        "max_abs_diff": delta[b],
                        "seconds": m.to_json(),
                    }
                    for b, m in times.items()
                },
            }
        for spec in args.eval:
            branch, file, texts, labels = read_eval(spec, args.eval_rows)
            index = {lab: i for i, lab in enumerate(model.branch(branch).labels)}
            gold = np.array([index[lab] for lab in labels])
            results["accuracy"][f"{branch}:{file}"] = {
                b: float((fn(texts)[branch].argmax(-1) == gold).mean()) for b, fn in backends.items()
            }

    results["machine"] = machine_info(args.threads)
    results["config"] = {k: str(v) for k, v in vars(args).items()} | {"branches": names}
    print(f"{'set':6} {'backend':17} {'sent/s':>9} {'x torch':>8} {'x cpu':>7} {'max|Δ|':>9}")
    for set_name, r in results["sets"].items():
        for b, v in r["backends"].items():
            print(
                f"{set_name:6} {b:17} {v['sentences_per_s']:9.1f} {v['speedup']:8.2f} "
                f"{v['cpu_speedup']:7.2f} {v['max_abs_diff']:9.2g}"
            )
    for key, acc in results["accuracy"].items():
        print(f"accuracy {key}: " + ", ".join(f"{b} {a:.4f}" for b, a in acc.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
