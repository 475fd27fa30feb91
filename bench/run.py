"""Run the scaler-wizard benchmarks: ours vs a reference, each in a fresh process.

    python bench/run.py [--quick] [--only NAME[,NAME]] [--threads N] [--out bench/results/latest.json]

Prints a table (name, ours, reference, ratio, goal, pass/fail) and writes JSON with the
machine info and every measurement (median and spread over the repeats).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import (  # noqa: E402
    ForeignLoad,
    bench_env,
    loadavg,
    machine_info,
    sample_foreign_load,
    set_threads,
)

#: benchmark name -> module (each has ``NAME`` and ``run(*, quick, threads) -> BenchResult``)
BENCHMARKS: dict[str, str] = {
    "moe": "bench_moe",
    "branches": "bench_branches",
    "cold": "bench_cold",
    "hash": "bench_hash",
    "train": "bench_train",
}
#: what a bare ``run.py`` runs (the issue's four, ~10 min in full); the others (``train``
#: takes ~20 min) run only when named with --only, or with --only all
DEFAULT_BENCHMARKS: tuple[str, ...] = ("moe", "branches", "cold", "hash")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_child(name: str, quick: bool, threads: int, out: Path) -> None:
    """Inside the child process: run one benchmark and dump its result."""
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    set_threads(threads)
    module = importlib.import_module(BENCHMARKS[name])
    result = module.run(quick=quick, threads=threads)
    out.write_text(json.dumps(result.to_json(), indent=2))


def run_isolated(name: str, quick: bool, threads: int) -> dict[str, Any]:
    """Run one benchmark in a new interpreter so allocator/thread-pool state never leaks."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", str(out)]
        cmd += ["--threads", str(threads)] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        with ForeignLoad() as foreign:
            proc = subprocess.run(cmd, env=bench_env(threads), cwd=BENCH_DIR.parent, check=False)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            return {
                "name": name,
                "error": f"benchmark process exited with {proc.returncode}",
                "seconds": elapsed,
                "foreign_cpu_load": foreign.value,
            }
        result: dict[str, Any] = json.loads(out.read_text())
    result["seconds"] = elapsed
    result["foreign_cpu_load"] = foreign.value
    return result


def wait_until_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``limit`` of the CPUs."""
    deadline = time.monotonic() + max_wait
    load = sample_foreign_load()
    while load > limit and time.monotonic() < deadline:
        print(f"#   machine busy (foreign load {load:.0%}), waiting ...", file=sys.stderr, flush=True)
        time.sleep(5)
        load = sample_foreign_load()
    return load


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms" and value >= 1000:
        return f"{value / 1000:.2f} s"
    if unit in ("ms", "s"):
        return f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"
    return f"{value:.0f} {unit}" if value >= 100 else f"{value:.2f} {unit}"


def table(results: list[dict[str, Any]]) -> str:
    header = ("benchmark", "ours", "reference", "ratio", "goal", "result", "cpu-time ratio")
    lines: list[tuple[str, ...]] = []
    for res in results:
        if "error" in res:
            lines.append((res["name"], "-", "-", "-", "-", "ERROR", "-"))
            continue
        for row in res["rows"]:
            verdict = {True: "pass", False: "FAIL", None: "info"}[row["passed"]]
            lines.append(
                (
                    row["name"],
                    _fmt(row["ours"], row["unit"]),
                    _fmt(row["reference"], row["unit"]),
                    f"{row['ratio']:.3f}",
                    row["goal"] or "-",
                    verdict,
                    f"{row['cpu_ratio']:.3f}" if row.get("cpu_ratio") is not None else "-",
                )
            )
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), sep, *(fmt.format(*r) for r in lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller cases (~2 min)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these ({', '.join(BENCHMARKS)}, or all); default: {', '.join(DEFAULT_BENCHMARKS)}",
    )
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="torch threads (default: all CPUs)"
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "latest.json", help="JSON output")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each benchmark, wait up to SECONDS for other processes to leave the CPUs (<10%% busy)",
    )
    parser.add_argument("--child", choices=list(BENCHMARKS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        run_child(args.child, args.quick, args.threads, args.child_out)
        return 0

    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()] or list(
        DEFAULT_BENCHMARKS
    )
    if "all" in names:
        names = list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    set_threads(args.threads)
    info = machine_info(args.threads)
    print(
        f"# {info['date']}  {info['cpu_model']} ({info['cpu_affinity']} CPUs)  torch {info['torch']}  "
        f"threads={args.threads}  mode={'quick' if args.quick else 'full'}  loadavg={info['loadavg_start']}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    results = []
    for name in names:
        before = wait_until_quiet(0.10, args.wait_quiet) if args.wait_quiet > 0 else sample_foreign_load()
        print(f"# running {name} (foreign CPU load {before:.0%}) ...", file=sys.stderr, flush=True)
        res = run_isolated(name, args.quick, args.threads)
        res["foreign_cpu_load_before"] = before
        print(
            f"#   {name}: {res['seconds']:.0f} s, foreign CPU load while running {res.get('foreign_cpu_load') or 0:.0%}",
            file=sys.stderr,
            flush=True,
        )
        results.append(res)
    info["loadavg_end"] = loadavg()
    report = {
        "machine": info,
        "mode": "quick" if args.quick else "full",
        "threads": args.threads,
        "total_seconds": time.perf_counter() - t0,
        "benchmarks": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\n{report['total_seconds']:.0f} s total; JSON written to {args.out}")
    noisy = [r["name"] for r in results if (r.get("foreign_cpu_load") or 0) > 0.15]
    if noisy:
        print(
            f"WARNING: other processes used >15% of the CPUs during: {', '.join(noisy)}; "
            "those figures are noisy (rerun on a quiet machine, or with --wait-quiet)",
            file=sys.stderr,
        )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
