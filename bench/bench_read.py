"""Reading a big labelled CSV (issue 10 item 19): peak memory and time to the first progress.

Each case runs ``load_train_eval`` (reading + checking only, no training) in a fresh child
process and reports the child's peak RSS (``ru_maxrss``), the time from the call to its first
progress callback (the old reader had none: its first progress was the feature pass, after
the whole read) and the total read time.

Cases: ``ours`` is the installed ``scaler_wizard.training.data``; ``--old FILE`` adds a ``reference``
case loaded from another copy of ``data.py`` (e.g. ``git show HEAD~1:core/training/data.py > /tmp/old.py``).
The CSV is generated under /tmp (``--mb`` MB, default 200, ~13 k rows per MB) unless ``--csv``
names one. Results: a table on stdout and ``bench/results/read.json``.

    python bench/bench_read.py [--mb 200] [--csv FILE] [--old /tmp/old_data.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "read.json"
WORDS = (
    "the a to win free call now lunch see you later prize entry txt reply stop meeting "
    "tomorrow please thanks office report"
).split()
LABELS = ["ham", "spam", "promo", "work", "family"]


def make_csv(path: Path, mb: int) -> None:
    rng = random.Random(0)
    target, size = mb * 1_000_000, 0
    with open(path, "w") as f:
        f.write("text,label\n")
        while size < target:
            line = f"{' '.join(rng.choices(WORDS, k=rng.randint(8, 18)))},{rng.choice(LABELS)}\n"
            f.write(line)
            size += len(line)


def child(module: str, csv_path: str) -> None:
    """Runs in a fresh process: one read, a JSON line on stdout."""
    if module == "ours":
        from scaler_wizard.training import data as mod
    else:
        spec = importlib.util.spec_from_file_location("old_data", module)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules["old_data"] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first: list[float] = []
    calls = [0]
    t0 = time.perf_counter()

    def factory(desc: str, total: int) -> Any:
        def advance(n: int) -> None:
            calls[0] += 1
            if not first:
                first.append(time.perf_counter() - t0)

        return advance

    kwargs: dict[str, Any] = {"progress": factory} if module == "ours" else {}
    full, train, held = mod.load_train_eval(csv_path, **kwargs)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rows": len(full),
                "read_s": round(total, 2),
                # no callback: the first progress a user saw came after the whole read
                "first_progress_s": round(first[0] if first else total, 3),
                "progress_calls": calls[0],
                "peak_rss_mb": round(peak / 1024, 1),
                "rss_before_read_mb": round(base_rss / 1024, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--old", type=Path, help="another data.py to measure as the reference")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    csv_path = args.csv or Path(f"/tmp/scaler_bench_read_{args.mb}mb.csv")
    if not csv_path.exists():
        make_csv(csv_path, args.mb)
    cases = {"ours": "ours"}
    if args.old:
        cases["reference"] = str(args.old)
    results: dict[str, Any] = {"file": str(csv_path), "bytes": csv_path.stat().st_size, "cases": {}}
    for name, module in cases.items():
        proc = subprocess.run(
            [sys.executable, __file__, "--child", module, str(csv_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        results["cases"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'case':<10} {'rows':>9} {'read s':>8} {'first progress s':>17} {'peak RSS MB':>12}")
    for name, r in results["cases"].items():
        print(
            f"{name:<10} {r['rows']:>9} {r['read_s']:>8} {r['first_progress_s']:>17} {r['peak_rss_mb']:>12}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
