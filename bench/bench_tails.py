"""Serving stays nearly free (issue 12): one batch through the trunk and N branch tails, vs the
trunk pass alone, for each built-in after-encoder strategy and N in (1, 10, 100).

The model is composed from a temporary store with N branches of one strategy whose residual
weights are randomised (a fresh branch's zero residuals would skip no work, but randomised ones
make sure nothing is short-cut), on 64 real SMS texts, one thread, interleaved repeats. The
figure is t(trunk + N tails) / t(trunk pass); the issue's goals: <= 1.1 at 10 branches and
<= 1.3 at 100 for the default strategy.

    python bench/bench_tails.py [--strategies attn-mix,attn-mlp,lora] [--branches 1,10,100]
        [--texts 64] [--repeats 5] [--out bench/results/tails.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import load_sentences, loadavg, measure_interleaved

from scaler_wizard.banks import ContentStore
from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

REPO = Path(__file__).resolve().parent.parent


def build(root: Path, strategy: str, n: int) -> Any:
    store = ContentStore.open(root, create=True)
    init_model(store, "bench", seed=0)
    model = compose(store, "bench")
    torch.manual_seed(0)
    for i in range(n):
        branch = new_branch(hidden_size=model.trunk_hidden_size(), labels=["a", "b", "c"], strategy=strategy)
        with torch.no_grad():
            for p in branch.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.add_branch(f"b{i:03d}", branch)
    save_version(store, model, message=f"{n} {strategy} branches")
    model = compose(store, "bench")
    model.load_all_branches()
    return model.eval()


def measure(
    model: Any, strategy: str, texts: list[str], counts: list[int], repeats: int
) -> list[dict[str, Any]]:
    names = model.branch_names
    batch = model.base.tokenize(texts)

    def trunk() -> object:
        with torch.inference_mode():
            return model.encode_batch(batch)

    def tails(n: int) -> Any:
        def run() -> object:
            with torch.inference_mode():
                return model(**batch, branches=names[:n]).logits

        return run

    cases: dict[str, Any] = {"trunk": trunk, **{f"n{n}": tails(n) for n in counts}}
    res = measure_interleaved(cases, warmup=1, repeats=repeats)
    t_trunk = res["trunk"].median
    rows = []
    for n in counts:
        t = res[f"n{n}"].median
        rows.append(
            {
                "strategy": strategy,
                "branches": n,
                "trunk_ms": t_trunk * 1e3,
                "with_tails_ms": t * 1e3,
                "ratio": t / t_trunk,
                "per_branch_ms": (t - t_trunk) * 1e3 / n,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="attn-mix,attn-mlp,lora")
    parser.add_argument("--branches", default="1,10,100")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tails.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counts = [int(c) for c in args.branches.split(",")]
    texts = load_sentences(args.texts)
    rows: list[dict[str, Any]] = []
    load_before = loadavg()
    for strategy in args.strategies.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-tails-") as tmp:
            rows += measure(
                build(Path(tmp) / "store", strategy, max(counts)), strategy, texts, counts, args.repeats
            )
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before": load_before,
        "load_average_after": loadavg(),
        "texts": args.texts,
        "threads": 1,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "\n| strategy | branches | trunk ms | trunk + tails ms | ratio | ms per branch |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['strategy']} | {r['branches']} | {r['trunk_ms']:.1f} | {r['with_tails_ms']:.1f} | "
            f"{r['ratio']:.3f} | {r['per_branch_ms']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
