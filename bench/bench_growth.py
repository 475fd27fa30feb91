"""Benchmark: consolidation and expert pruning (issue 13) on a model ``scaler train`` trained on
SMS spam + TREC (the real data in data/).

1. **Consolidation**: the run's checkpoint bytes (weights + optimizer + RNG state) vs the bytes of
   the banks ``scaler consolidate`` writes; per-branch eval accuracy (the run's eval split) of
   the EMA-consolidated weights vs the last checkpoint. Targets: bytes down by the optimizer
   state at least; EMA no worse than the last checkpoint on every branch.
2. **Pruning 8 -> 4 experts** per MoE layer (the threshold is the smallest of the layers'
   4th-largest utilisations, so every layer keeps at least its 4 most used experts): per-branch
   macro-F1 on held-out rows (the run's eval split) before and after, the trunk pass's speed
   before and after (interleaved, on cached base states), and the time of the whole command.
   Targets: <= 1 point macro-F1 lost on every branch, a faster trunk pass, <= 60 s.

    python bench/bench_growth.py [--quick] [--threads N] [--out bench/results/growth.json]

``--quick`` (a smoke run): 200 rows per dataset, 2 MoE layers of narrow experts, 16 steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from bench_train import subset, train_once  # noqa: E402
from common import REPO, BenchResult, Measurement, Row, loadavg, measure_interleaved, set_threads  # noqa: E402

NAME = "growth"


def write_split(path: Path, texts: list[str], labels: list[str]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    return path


def run(*, quick: bool, threads: int) -> BenchResult:
    import torch

    from scaler_wizard.banks import ContentStore
    from scaler_wizard.growth.consolidate import consolidate
    from scaler_wizard.growth.prune import Texts, prune, pruned_trunk
    from scaler_wizard.modeling.compose import compose, init_model
    from scaler_wizard.training.batches import load_branch_data
    from scaler_wizard.training.config import BranchSpec, TrainConfig

    rows = 200 if quick else 2000
    steps = 16 if quick else 400
    batch = 16 if quick else 64
    shape: dict[str, Any] = {"num_experts": 8, "top_k": 2, "seed": 0}
    if quick:
        shape.update(moe_layers=2, expert_hidden=32)
    details: dict[str, Any] = {"threads": threads, "rows": rows, "steps": steps, "trunk": shape}
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp_name:
        tmp = Path(tmp_name)
        files = {
            "spam": subset(REPO / "data" / "sms_spam.csv", tmp / "spam.csv", rows),
            "trec": subset(REPO / "data" / "trec.csv", tmp / "trec.csv", rows),
        }
        store = ContentStore.open(tmp / "store", create=True)
        init_model(store, "demo", **shape)
        run_dir = tmp / "run"
        trained = train_once(
            store,
            "demo",
            files,
            run_dir,
            steps=steps,
            batch_size=batch,
            # the kept 4 are the run's last quarter (every 1/16th): an EMA of weights near the
            # end, where the decayed rate keeps them close. (Session 21 kept one every quarter,
            # so its "EMA" averaged the first 100 steps' weights with the last: -4 points.)
            checkpoint_every=max(1, steps // 16),
            keep_checkpoints=4,
        )
        details["train_wall_seconds"] = trained["wall_seconds"]

        # 1. consolidation: EMA of the kept checkpoints
        t0 = time.perf_counter()
        cons = consolidate(store, "demo", run_dir, ema=0.9)
        details["consolidate"] = cons.to_json() | {"seconds": time.perf_counter() - t0}

        # held-out rows: the run's eval split, written out for --eval
        cfg = TrainConfig()
        evals = []
        for name, path in files.items():
            part = load_branch_data(BranchSpec(name, path), None, cfg)
            held = write_split(tmp / f"{name}-eval.csv", part.eval.texts, part.eval.labels)
            evals.append(BranchSpec(name, held))

        # 2. pruning 8 -> 4: threshold from the routing on the spam + trec training texts
        routing = tmp / "routing.txt"
        texts = []
        for path in files.values():
            with open(path, encoding="utf-8", newline="") as fh:
                texts += [r["text"] for r in csv.DictReader(fh)]
        routing.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
        model = compose(store, "demo")
        model.load_all_branches()
        stats = Texts(model, [t.replace("\n", " ") for t in texts if t.strip()], model.branch_names)
        counts = stats.run(model.trunk)
        shares = [sorted((c / counts.tokens).tolist(), reverse=True) for c in counts.counts]
        threshold = min(s[3] for s in shares)
        del stats
        t0 = time.perf_counter()
        pr = prune(store, "demo", threshold=threshold, data=routing, evals=evals, dry_run=True)
        prune_seconds = time.perf_counter() - t0
        details["prune"] = pr.to_json() | {"seconds": prune_seconds}

        # trunk pass speed, before vs after, on the same cached base states
        from scaler_wizard.growth.prune import LayerPrune

        plans = [LayerPrune(d["layer"], d["utilization"], d["kept"], d["removed"]) for d in pr.layers]
        new_trunk = pruned_trunk(model.trunk, plans).eval()
        old_trunk = model.trunk.eval()
        sample = [t for t in texts if t.strip()][:64]
        tokens = model.base.tokenize(sample, model.device)
        with torch.inference_mode():
            hidden = model.base(tokens["input_ids"], tokens["attention_mask"])
        mask = tokens["attention_mask"].bool()

        def trunk_pass(trunk: Any) -> Any:
            def call() -> None:
                with torch.inference_mode():
                    trunk(hidden, mask)

            return call

        speed = measure_interleaved(
            {"before": trunk_pass(old_trunk), "after": trunk_pass(new_trunk)},
            warmup=2,
            repeats=5 if quick else 20,
        )
    pct = 100.0
    rows_out = [
        Row(
            "consolidate: checkpoint MB vs bank MB",
            cons.bank_bytes / 1e6,
            cons.checkpoint_bytes / 1e6,
            "MB",
            cons.checkpoint_bytes / max(cons.bank_bytes, 1),
            "checkpoint bytes / bank bytes",
            None,
            "banks",
            "checkpoints",
        )
    ]
    for name, e in sorted(cons.eval.items()):
        rows_out.append(
            Row(
                f"consolidate: {name} eval acc %, EMA vs last checkpoint",
                e["accuracy"] * pct,
                e["accuracy_last"] * pct,
                "%",
                e["accuracy"] - e["accuracy_last"],
                "acc(EMA) - acc(last); goal >= 0",
                ">= 0",
                "ema",
                "last",
            )
        )
    for name, a in sorted(pr.accuracy.items()):
        rows_out.append(
            Row(
                f"prune 8->4: {name} macro-F1 %, after vs before",
                a["macro_f1_after"] * pct,
                a["macro_f1_before"] * pct,
                "%",
                (a["macro_f1_after"] - a["macro_f1_before"]) * pct,
                "points of macro-F1 gained (negative: lost)",
                ">= -1",
                "pruned",
                "8 experts",
            )
        )
    before, after = speed["before"], speed["after"]
    rows_out.append(
        Row(
            "prune 8->4: trunk pass, 64 texts",
            after.median * 1e3,
            before.median * 1e3,
            "ms",
            before.median / after.median,
            "t(before) / t(after); > 1: pruned faster",
            ">= 1",
            "pruned",
            "8 experts",
        )
    )
    rows_out.append(
        Row(
            "prune: whole command",
            prune_seconds,
            60.0,
            "s",
            prune_seconds,
            "seconds",
            "<= 60",
            "prune",
            "goal",
        )
    )
    kept = [len(d["kept"]) for d in pr.layers]
    notes = [
        f"prune threshold {threshold:.4f}: experts kept per layer {kept}",
        f"loadavg at end {loadavg()}",
    ]
    measurements: dict[str, Measurement] = {"trunk_before": before, "trunk_after": after}
    return BenchResult(NAME, "consolidate and prune", rows_out, measurements, details, notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 200 rows, 2 narrow layers, 16 steps"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "growth.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    result = run(quick=args.quick, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    width = max(len(r.name) for r in result.rows)
    print(f"{'benchmark':<{width}}  {'ours':>9}  {'reference':>9}  {'ratio':>7}  goal   definition")
    for r in result.rows:
        print(
            f"{r.name:<{width}}  {r.ours or 0:>9.3f}  {r.reference or 0:>9.3f}  {r.ratio:>7.3f}  "
            f"{r.goal or '':<6} {r.ratio_definition}"
        )
    for note in result.notes:
        print(f"note: {note}")
    print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
