"""Branch quality on the bundled data (issue 12), opt-in: several minutes on 2 CPUs.

The fixed split of the issue: ``train_test_split(test_size=0.2, random_state=0,
stratify=label)`` of data/trec.csv and data/sms_spam.csv; model selection (early stopping,
the kept epoch) on a validation split of 10% carved from the training part only; accuracy
and macro-F1 read once on the test part.

Compared in one run, on the same base and split: our built-in strategies trained the way
``branch add`` trains them (cached trunk outputs), and logistic regression on the same frozen
mean-pooled features. SetFit, AdapterHub ``adapters``, PEFT LoRA and full fine-tuning are
listed when their packages are importable; this script does not install them (and is not
run by them): they are reported as "not installed" or "not run".

    python bench/bench_quality.py [--tasks trec,sms_spam] [--out bench/results/quality.json]

``--alternatives all`` (or a comma list of full-ft, peft-lora, adapters, setfit, setfit-8shot)
also runs those methods on the same split in their own venv (bench/quality_alternatives.py,
scripts/setup_alternatives.sh) and merges their rows; ``--limit N`` cuts their parts to N rows
(smoke runs). A plot of accuracy against training time goes next to the JSON (``--plot``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from scaler_wizard.banks import ContentStore
from scaler_wizard.caches.features import cached_features
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.compose import compose, init_model, new_branch, trunk_id
from scaler_wizard.training.branch_add import small_data_config
from scaler_wizard.training.branch_fit import BranchTrainingConfig, predict_logits, train_branch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_alternatives

REPO = Path(__file__).resolve().parent.parent
#: (label, strategy, config, recipe changes): ours, each trained the way ``branch add`` trains it
STRATEGIES: tuple[tuple[str, str, dict[str, Any], dict[str, Any]], ...] = (
    ("attn-mix", "attn-mix", {}, {}),
    ("attn-mix keep=best (session-23 recipe)", "attn-mix", {}, {"keep": "best"}),
    ("attn-mix label-smoothing=0", "attn-mix", {}, {"label_smoothing": 0.0}),
    (
        "attn-mix session-22 recipe: 40 epochs no smoothing",
        "attn-mix",
        {},
        {"label_smoothing": 0.0, "epochs": 40, "keep": "best"},
    ),
    ("attn-mix layers=7 (all)", "attn-mix", {"layers": 7}, {}),
    ("attn-mlp", "attn-mlp", {}, {}),
    ("lora", "lora", {}, {}),
)
OTHERS = {"SetFit": "setfit", "AdapterHub adapters": "adapters", "PEFT LoRA (full pass)": "peft"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def branch_bytes(branch: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in branch.state_dict().values())


def run_task(
    store: ContentStore,
    task: str,
    selected: set[str] | None = None,
    alternatives: dict[str, Any] | None = None,
    seeds: int = 1,
    shot_samples: int = 1,
) -> list[dict[str, Any]]:
    model = compose(store, "demo")
    assert model.origin is not None
    tid = trunk_id(model.origin.manifest)
    df = pd.read_csv(REPO / "data" / f"{task}.csv")
    train, test = train_test_split(df, test_size=0.2, random_state=0, stratify=df["label"])
    fit, val = train_test_split(train, test_size=0.1, random_state=0, stratify=train["label"])
    labels = sorted(df["label"].unique())
    index = {lab: i for i, lab in enumerate(labels)}
    if alternatives is not None:
        split_file = quality_alternatives.write_split(
            Path(alternatives["dir"]) / f"split-{task}.json", task, labels, fit, val, test
        )
        # the alternatives train in their own processes while ours train here (a busy machine
        # either way: compare CPU seconds, and wall seconds only within one run)
        others: list[dict[str, Any]] = []
        worker = threading.Thread(
            target=lambda: others.extend(
                quality_alternatives.run_alternatives(
                    split_file,
                    alternatives["names"],
                    limit=alternatives["limit"],
                    jobs=alternatives["jobs"],
                    threads=alternatives["threads"],
                    pairs=alternatives["pairs"],
                )
            )
        )
        worker.start()

    def y(part: pd.DataFrame) -> torch.Tensor:
        return torch.tensor([index[lab] for lab in part["label"]])

    texts = list(fit["text"]) + list(val["text"]) + list(test["text"])
    n1, n2 = len(fit), len(fit) + len(val)
    rows: list[dict[str, Any]] = []
    feats: dict[tuple[str, int], Any] = {}
    seconds: dict[tuple[str, int], tuple[float, float]] = {}

    def features(kind: str, layers: int) -> Any:
        if (kind, layers) not in feats:
            t0, c0 = time.perf_counter(), cpu_seconds()
            feats[kind, layers], cached = cached_features(
                store, model, tid, texts, kind=kind, base_layers=layers
            )
            print(
                f"{task}: {kind} features (+{layers} layers) {time.perf_counter() - t0:.1f}s (cached={cached})"
            )
            seconds[kind, layers] = (time.perf_counter() - t0, cpu_seconds() - c0)
        return feats[kind, layers]

    for label, strategy, config, recipe in STRATEGIES:
        if selected and label not in selected:
            continue
        per_seed: list[dict[str, Any]] = []
        for seed in range(seeds):  # seed 0 is the row's own numbers; the others give the spread
            torch.manual_seed(seed)
            branch = new_branch(
                hidden_size=model.trunk_hidden_size(),
                labels=labels,
                strategy=strategy,
                strategy_config=config,
            )
            kind = getattr(branch.adapter, "features", "pooled")
            layers = int(branch.adapter.base_layers)
            x = features(kind, layers)
            t0, c0 = time.perf_counter(), cpu_seconds()
            training = BranchTrainingConfig(seed=seed, **recipe)
            result = train_branch(branch, x[:n1], y(fit), x[n1:n2], y(val), training)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            pred = predict_logits(branch, x[n2:]).argmax(-1)
            per_seed.append(
                {
                    "seed": seed,
                    "accuracy": accuracy_score(y(test), pred),
                    "macro_f1": f1_score(y(test), pred, average="macro"),
                    "train_wall_s": wall,
                    "train_cpu_s": cpu,
                    "epochs": result.epochs_run,
                    "best_epoch": result.best_epoch,
                }
            )
        first = per_seed[0]
        rows.append(
            {
                "task": task,
                "method": f"ours: {label}",
                **{k: v for k, v in first.items() if k != "seed"},
                "feature_wall_s": seconds[kind, layers][0],
                "feature_cpu_s": seconds[kind, layers][1],
                "bytes_per_branch": branch_bytes(branch),
                "accuracy_mean": sum(r["accuracy"] for r in per_seed) / seeds,
                "macro_f1_mean": sum(r["macro_f1"] for r in per_seed) / seeds,
                "seeds": per_seed,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if not selected or "few-shot" in selected:
        rows.append(few_shot_row(store, model, tid, task, labels, fit, test, shot_samples))
        print(json.dumps(rows[-1]), flush=True)
    pooled = features("pooled", 0)
    x_fit = pooled[:n1].numpy() if isinstance(pooled, torch.Tensor) else pooled.tensor(0, n1).numpy()
    x_test = pooled[n2:].numpy() if isinstance(pooled, torch.Tensor) else pooled.tensor(n2).numpy()
    t0, c0 = time.perf_counter(), cpu_seconds()
    clf = LogisticRegression(max_iter=2000).fit(x_fit, y(fit).numpy())
    pred_lr = clf.predict(x_test)
    rows.append(
        {
            "task": task,
            "method": "logistic regression on frozen mean-pooled features",
            "accuracy": accuracy_score(y(test), pred_lr),
            "macro_f1": f1_score(y(test), pred_lr, average="macro"),
            "train_wall_s": time.perf_counter() - t0,
            "train_cpu_s": cpu_seconds() - c0,
            "feature_wall_s": seconds["pooled", 0][0],
            "feature_cpu_s": seconds["pooled", 0][1],
            "bytes_per_branch": int(clf.coef_.size + clf.intercept_.size) * 8,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    if alternatives is not None:
        worker.join()
        return rows + others
    for name, module in OTHERS.items():
        status = (
            "not run (needs its own training script)" if importlib.util.find_spec(module) else "not installed"
        )
        rows.append({"task": task, "method": name, "status": status})
    return rows


def few_shot_row(
    store: ContentStore,
    model: Any,
    tid: str,
    task: str,
    labels: list[Any],
    fit: pd.DataFrame,
    test: pd.DataFrame,
    samples: int = 1,
) -> dict[str, Any]:
    """The default strategy on 8 rows a class (sample 0: the rows SetFit's 8-shot run gets;
    ``samples`` > 1 draws more), trained as ``branch add`` trains on so few rows: the strategy's
    small-data config, no validation split to choose an epoch on (an eval split under 50 rows
    keeps the last epoch), the automatic small batch. Time includes the few texts' features."""
    index = {lab: i for i, lab in enumerate(labels)}
    y_test = torch.tensor([index[lab] for lab in test["label"]])
    small = small_data_config("attn-mix", None, 0)  # what branch add picks on so few rows
    runs: list[dict[str, Any]] = []
    for sample in range(samples):
        shots = quality_alternatives.few_shot_rows(fit, seed=sample)
        y_shots = torch.tensor([index[lab] for lab in shots["label"]])
        t0, c0 = time.perf_counter(), cpu_seconds()
        torch.manual_seed(0)
        branch = new_branch(
            hidden_size=model.trunk_hidden_size(), labels=labels, strategy="attn-mix", strategy_config=small
        )
        layers = int(branch.adapter.base_layers)
        x, _ = cached_features(store, model, tid, list(shots["text"]), kind="tokens", base_layers=layers)
        result = train_branch(branch, x, y_shots, x, y_shots, BranchTrainingConfig())
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        x_test, _ = cached_features(store, model, tid, list(test["text"]), kind="tokens", base_layers=layers)
        pred = predict_logits(branch, x_test).argmax(-1)
        runs.append(
            {
                "sample": sample,
                "accuracy": accuracy_score(y_test, pred),
                "macro_f1": f1_score(y_test, pred, average="macro"),
                "train_wall_s": wall,  # features of the few rows included
                "train_cpu_s": cpu,
                "epochs": result.epochs_run,
                "kept": result.kept,
            }
        )
    return {
        "task": task,
        "method": f"ours: attn-mix few-shot {quality_alternatives.FEW_SHOT}/class",
        **{k: v for k, v in runs[0].items() if k != "sample"},
        "bytes_per_branch": branch_bytes(branch),
        "strategy_config": small,
        "accuracy_mean": sum(r["accuracy"] for r in runs) / samples,
        "macro_f1_mean": sum(r["macro_f1"] for r in runs) / samples,
        "seeds": runs,  # one per sample of rows (the table's "mean over seeds" column)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="trec,sms_spam")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    parser.add_argument("--store", type=Path, default=None, help="reuse a store (and its caches)")
    parser.add_argument(
        "--strategies",
        default="",
        help="comma-separated labels of ours to run, few-shot included (default: all)",
    )
    parser.add_argument(
        "--alternatives",
        default="",
        help="'all' or a comma list of " + ",".join(quality_alternatives.RUNNERS) + " (run in .venv-alt)",
    )
    parser.add_argument("--limit", type=int, default=0, help="alternatives: first N rows of each part")
    parser.add_argument("--jobs", type=int, default=1, help="alternatives run at once")
    parser.add_argument("--alt-threads", type=int, default=1, help="torch threads per alternative")
    parser.add_argument("--setfit-pairs", type=int, default=2000, help="SetFit full data: pairs bound")
    parser.add_argument("--seeds", type=int, default=1, help="ours: train each strategy with seeds 0..N-1")
    parser.add_argument(
        "--shot-samples", type=int, default=1, help="few-shot: draws of 8 rows a class (0: SetFit's)"
    )
    parser.add_argument("--plot", type=Path, default=None, help="default: the JSON path with .png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = args.store or Path(tempfile.mkdtemp(prefix="bench-quality-")) / "store"
    store = ContentStore.open(root, create=True)
    try:
        store.resolve("demo")
    except ScalerError:
        init_model(store, "demo", seed=0)
    selected = {s for s in args.strategies.split(",") if s} or None
    alternatives = None
    if args.alternatives:
        names = (
            list(quality_alternatives.RUNNERS) if args.alternatives == "all" else args.alternatives.split(",")
        )
        unknown = [n for n in names if n not in quality_alternatives.RUNNERS]
        if unknown:
            parser.error(f"unknown alternatives: {','.join(unknown)}")
        alternatives = {
            "names": names,
            "dir": tempfile.mkdtemp(prefix="bench-quality-split-"),
            "limit": args.limit,
            "jobs": args.jobs,
            "threads": args.alt_threads,
            "pairs": args.setfit_pairs,
        }
    rows = [
        row
        for task in args.tasks.split(",")
        for row in run_task(store, task, selected, alternatives, args.seeds, args.shot_samples)
    ]
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
        "split": "train_test_split(test_size=0.2, random_state=0, stratify=label); val = 10% of train",
        "alternatives": {k: v for k, v in (alternatives or {}).items() if k != "dir"} or None,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    figure = quality_alternatives.plot(rows, args.plot or args.out.with_suffix(".png"))
    print(f"plot: {figure}" if figure else "plot: matplotlib not installed")
    print(
        "\n| task | method | accuracy | macro-F1 | mean acc over seeds | train wall s | train CPU s | bytes/branch |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        if "accuracy" in r:
            mean = f"{r['accuracy_mean']:.4f} ({len(r['seeds'])})" if "seeds" in r else ""
            print(
                f"| {r['task']} | {r['method']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {mean} | "
                f"{r['train_wall_s']:.1f} | {r['train_cpu_s']:.1f} | {r['bytes_per_branch']} |"
            )
        else:
            print(f"| {r['task']} | {r['method']} | {r['status']} | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
