"""Ray Data batch prediction (issue 15 item 4): 2 actors vs one local process on the same file.

Target: 2 actors (1 torch thread each) >= 1.6x one process on a 2-CPU job split. All cases
label the same CSV (``--rows`` real SMS texts from data/sms_spam.csv) with branch ``spam`` of
model ``demo`` into a CSV:

* ``local``: a fresh process runs ``predict_file`` (torch threads = every CPU); its time
  counts composing the model and labelling the file;
* ``local-1t``: the same with 1 torch thread (what one actor has: the scale-out reference);
* ``ray``: ``predict_file_on_ray`` on a local Ray instance started once by this script (not
  timed): the job's time counts starting the actors, each composing the model from the
  store (in parallel), and labelling.

The ratio is end to end (texts/s, best of ``--repeats``, cases interleaved). The local
process's rate without composing is reported too; Ray's output blocks arrive in input order
near the end of a short job, so no "actors up" rate is taken from the driver.

Results: a table on stdout and ``bench/results/ray.json`` (with the machine's load: on a
shared 2-CPU machine the ratio says more about the neighbours than about Ray).

    python bench/bench_ray.py [--rows 2000] [--repeats 2] [--actors 2] [--call-rows 256]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, bench_env, load_sentences, loadavg, machine_info, sample_foreign_load

RESULTS = REPO / "bench" / "results" / "ray.json"
GOAL = 1.6


def child_local(store_root: str, csv_path: str, out: str, batch_size: int) -> None:
    """Runs in a fresh process: compose + ``predict_file``, one JSON line on stdout."""
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.inference.files import predict_file
    from scaler_wizard.modeling.compose import compose

    start = time.perf_counter()
    model = compose(ContentStore.open(store_root), "demo")
    model.branch("spam")
    composed = time.perf_counter()
    summary = predict_file(model, csv_path, out, branches=["spam"], batch_size=batch_size)
    end = time.perf_counter()
    print(json.dumps({"rows": summary.rows, "seconds": end - start, "predict_seconds": end - composed}))


def run_local(store: Path, csv_path: Path, workdir: Path, batch_size: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(store), str(csv_path), str(workdir / "local.csv")]
    cmd += [str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(threads), check=False)
    if proc.returncode != 0:
        sys.exit(f"local case failed:\n{proc.stderr}")
    r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    r |= {"threads": threads, "texts_per_s": r["rows"] / r["seconds"]}
    r["predict_texts_per_s"] = r["rows"] / r["predict_seconds"]
    return r


def run_ray(store: Path, csv_path: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.inference.files import FileProgress
    from scaler_wizard.inference.ray_engine import predict_file_on_ray

    first: list[tuple[int, float]] = []

    def progress(p: FileProgress) -> None:
        if not first:
            first.append((p.rows, time.perf_counter()))

    start = time.perf_counter()
    summary = predict_file_on_ray(
        ContentStore.open(store),
        "demo",
        csv_path,
        workdir / "ray.csv",
        branches=["spam"],
        actors=args.actors,
        batch_size=args.batch_size,
        call_rows=args.call_rows,
        on_progress=progress,
    )
    end = time.perf_counter()
    r: dict[str, Any] = {"rows": summary.rows, "seconds": end - start, "actors": args.actors}
    r["texts_per_s"] = r["rows"] / r["seconds"]
    r["first_block_s"] = first[0][1] - start
    r["first_block_rows"] = first[0][0]
    # the steady rate once the actors are up: the rows after the first block over the time after it
    r["after_first_block_texts_per_s"] = (r["rows"] - first[0][0]) / max(end - first[0][1], 1e-9)
    return r


def same_labels(workdir: Path) -> bool:
    def labels(name: str) -> list[str]:
        with open(workdir / name, newline="", encoding="utf-8") as f:
            return [row["spam"] for row in csv.DictReader(f)]

    return labels("local.csv") == labels("ray.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--call-rows", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ray"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        store_root, csv_path, out, batch = args.child
        child_local(store_root, csv_path, out, int(batch))
        return
    os.environ.update(bench_env(1))  # the actors: 1 torch thread each; offline
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from bench_predict_files import make_store

    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.workdir / "store"
    if not store.exists():
        make_store(store)
    csv_path = args.workdir / f"in-{args.rows}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(load_sentences(args.rows)))
    foreign = sample_foreign_load(2.0)
    import ray
    import ray.data  # configures its loggers on import: quiet them after

    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    results: list[dict[str, Any]] = []
    try:
        print(
            f"{'repeat':>6} {'case':>8} {'texts/s':>8} {'seconds':>8} {'w/o compose':>12} "
            f"{'after 1st block':>16}"
        )
        cases = ["local", "local-1t", "ray"]
        for rep in range(args.repeats):
            for case in cases[rep % 3 :] + cases[: rep % 3]:  # rotating order
                if case == "local":
                    r = run_local(store, csv_path, args.workdir, args.batch_size, os.cpu_count() or 1)
                elif case == "local-1t":
                    r = run_local(store, csv_path, args.workdir, args.batch_size, 1)
                else:
                    r = run_ray(store, csv_path, args.workdir, args)
                r |= {"case": case, "repeat": rep}
                results.append(r)
                bare = r.get("predict_texts_per_s")
                steady = r.get("after_first_block_texts_per_s")
                print(
                    f"{rep:>6} {case:>8} {r['texts_per_s']:>8.1f} {r['seconds']:>8.1f} "
                    f"{(f'{bare:.1f}' if bare else '-'):>12} {(f'{steady:.1f}' if steady else '-'):>16}"
                )
    finally:
        ray.shutdown()

    def best(case: str) -> float:
        return max(r["texts_per_s"] for r in results if r["case"] == case)

    ratio = best("ray") / best("local")
    ratio_1t = best("ray") / best("local-1t")
    agree = same_labels(args.workdir)
    print(
        f"ray ({args.actors} actors x 1 thread) / one process, 1 thread, end to end: {ratio_1t:.2f}x   goal {GOAL}x"
    )
    print(f"ray / one process with every CPU's threads, end to end (best of {args.repeats}): {ratio:.2f}x")
    print(f"same labels: {agree}   other processes' CPU load at start: {foreign:.2f} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine_info(os.cpu_count() or 1) | {"loadavg_end": loadavg()},
                "foreign_load_cpus_at_start": foreign,
                "rows": args.rows,
                "actors": args.actors,
                "batch_size": args.batch_size,
                "call_rows": args.call_rows,
                "ratio_end_to_end": ratio,
                "ratio_end_to_end_vs_one_thread": ratio_1t,
                "goal": GOAL,
                "same_labels": agree,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
