"""File prediction (issue 15 item 3): peak RSS and throughput of ``predict_file`` vs ``model.predict``.

Target: memory flat from 10k to 100k rows, throughput >= 0.9x in-process ``predict`` on the
same texts. Each case runs in a fresh child process and reports its peak RSS (``ru_maxrss``,
after composing the model and loading the branch, and at the end, plus the current RSS at the end) and its rows/s:

* ``file``: ``predict_file(model, in.csv, out.jsonl)`` (streamed, chunks of ``--chunk-rows``);
* ``predict``: the same texts as one Python list through ``model.predict`` (what a user would
  do in process; the list and the answers are all in memory).

The model is ``demo`` from ``--store`` (default: a fresh store under /tmp with one branch
``spam`` on an initialised trunk; composing needs the base model in the HF cache). Results: a
table on stdout and ``bench/results/predict_files.json``. On 2 busy CPUs 100k rows take minutes.

    python bench/bench_predict_files.py [--rows 10000 100000] [--store DIR] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "predict_files.json"
WORDS = "the a to win free call now lunch see you later prize entry txt reply stop meeting tomorrow".split()


def make_store(root: Path) -> None:
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    store = ContentStore.open(root, create=True)
    init_model(store, "demo", seed=0)
    model = compose(store, "demo")
    model.add_branch("spam", new_branch(hidden_size=model.trunk_hidden_size(), labels=["ham", "spam"]))
    save_version(store, model, message="bench: one branch")


def make_csv(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,text\n")
        f.writelines(f"{i},{' '.join(rng.choices(WORDS, k=rng.randint(3, 12)))}\n" for i in range(rows))


def _rss_mb() -> float:
    """Peak RSS so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> float:
    """Current RSS (MB; Linux): the peak is often set by loading the model, not by the run."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def child(mode: str, store_root: str, csv_path: str, batch_size: int, chunk_rows: int) -> None:
    """Runs in a fresh process: one case, one JSON line on stdout."""
    import csv

    from scaler_wizard.banks import ContentStore
    from scaler_wizard.inference.files import predict_file
    from scaler_wizard.modeling.compose import compose

    model = compose(ContentStore.open(store_root), "demo")
    model.branch("spam")
    model.predict(["warm up"], ["spam"])
    base = _rss_mb()
    start = time.perf_counter()
    if mode == "file":
        summary = predict_file(
            model,
            csv_path,
            csv_path + ".out.jsonl",
            branches=["spam"],
            batch_size=batch_size,
            chunk_rows=chunk_rows,
        )
        rows = summary.rows
    else:
        with open(csv_path, encoding="utf-8", newline="") as f:
            texts = [r["text"] for r in csv.DictReader(f)]
        rows = len(model.predict(texts, ["spam"], batch_size=batch_size)["spam"])
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": seconds,
                "rss_base_mb": base,
                "rss_peak_mb": _rss_mb(),
                "rss_end_mb": _rss_now_mb(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_predict_files"))
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, store_root, csv_path, batch, chunk = args.child
        child(mode, store_root, csv_path, int(batch), int(chunk))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    store_root = args.store or args.workdir / "store"
    if args.store is None and not store_root.exists():
        make_store(store_root)
    results: list[dict[str, Any]] = []
    print(
        f"{'rows':>8} {'mode':>8} {'rows/s':>9} {'seconds':>8} {'RSS base MB':>12} {'RSS peak MB':>12} {'RSS end MB':>11}"
    )
    for n in args.rows:
        path = args.workdir / f"in-{n}.csv"
        make_csv(path, n)
        for mode in ("file", "predict"):
            cmd = [sys.executable, __file__, "--child", mode, str(store_root), str(path)]
            cmd += [str(args.batch_size), str(args.chunk_rows)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"{mode} case failed:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1]) | {"mode": mode}
            r["rows_per_s"] = r["rows"] / r["seconds"]
            results.append(r)
            print(
                f"{n:>8} {mode:>8} {r['rows_per_s']:>9.0f} {r['seconds']:>8.1f} "
                f"{r['rss_base_mb']:>12.0f} {r['rss_peak_mb']:>12.0f} {r['rss_end_mb']:>11.0f}"
            )
        file_r, pred_r = results[-2], results[-1]
        print(f"{n:>8} throughput file/predict = {file_r['rows_per_s'] / pred_r['rows_per_s']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"batch_size": args.batch_size, "chunk_rows": args.chunk_rows, "results": results}, indent=2
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
