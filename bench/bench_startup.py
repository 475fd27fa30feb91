"""Start-up time: ``scaler --help``, ``scaler --version`` and ``import scaler_wizard``, each
against ``python -c pass`` (goal: ``scaler --help`` under 0.5 s).

Every case is a fresh process (what a user waits for at the prompt), run interleaved with the
others in an order that rotates from repeat to repeat; the table shows medians of wall time
and the ratio to an empty interpreter, and the JSON keeps every sample, the CPU time and which
slow libraries (torch, transformers, ...) each command imported.

    python bench/bench_startup.py                 # 15 runs of each case
    python bench/bench_startup.py --runs 30 --out bench/results/startup.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import ForeignLoad, Measurement, cpu_model, loadavg, measure_interleaved

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SCALER = str(Path(sys.executable).parent / "scaler")
GOAL_HELP_S = 0.5
SLOW_LIBRARIES = ("torch", "transformers", "peft", "pandas", "pyarrow", "huggingface_hub", "sklearn")

CASES: dict[str, list[str]] = {
    "python -c pass": [PYTHON, "-c", "pass"],
    "python -c 'import scaler_wizard'": [PYTHON, "-c", "import scaler_wizard"],
    "scaler --version": [SCALER, "--version"],
    "scaler --help": [SCALER, "--help"],
}
BASELINE = "python -c pass"

#: the console script's entry point, then the slow libraries it left in sys.modules
_IMPORTED = """
import json, sys
from importlib.metadata import entry_points
(script,) = entry_points(group="console_scripts", name="scaler")
sys.argv = ["scaler", *json.loads(sys.argv[1])]
try:
    script.load()()
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & SLOW)), file=sys.__stderr__)
"""


def run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-500:]}")


def slow_imports(args: list[str], env: dict[str, str]) -> list[str]:
    code = f"SLOW = {set(SLOW_LIBRARIES)!r}\n" + _IMPORTED
    proc = subprocess.run(
        [PYTHON, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True, check=False
    )
    imported: list[str] = json.loads(proc.stderr.strip().splitlines()[-1])
    return imported


def stats(m: Measurement) -> dict[str, Any]:
    return {
        "median_s": m.median,
        "min_s": m.minimum,
        "max_s": m.maximum,
        "cpu_median_s": m.cpu_median,
        "samples_s": m.samples,
        "cpu_samples_s": m.cpu_samples,
    }


def git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each case (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (page cache, .pyc)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    args = parser.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", SCALER_PLUGINS=os.environ.get("SCALER_PLUGINS", ""))
    env.pop("SCALER_DEBUG", None)
    load_start = loadavg()
    with ForeignLoad() as foreign:
        measured = measure_interleaved(
            {name: (lambda cmd=cmd: run(cmd, env)) for name, cmd in CASES.items()},
            warmup=args.warmup,
            repeats=args.runs,
        )
    base = measured[BASELINE]
    imported = {
        "scaler --help": slow_imports(["--help"], env),
        "scaler --version": slow_imports(["--version"], env),
    }

    print(f"{'case':34} {'median':>9} {'min':>9} {'cpu':>9} {'x pass':>8}  slow imports")
    rows: dict[str, Any] = {}
    for name, m in measured.items():
        ratio = m.median / base.median
        cpu = m.cpu_median or 0.0
        slow = imported.get(name)
        shown = "-" if slow is None else (", ".join(slow) or "none")
        print(f"{name:34} {m.median:8.3f}s {m.minimum:8.3f}s {cpu:8.3f}s {ratio:7.1f}x  {shown}")
        rows[name] = {**stats(m), "ratio_to_python_pass": ratio, "slow_imports": slow}
    help_median = measured["scaler --help"].median
    verdict = "PASS" if help_median < GOAL_HELP_S else "FAIL"
    print(f"goal: scaler --help under {GOAL_HELP_S} s: {help_median:.3f} s  {verdict}")
    foreign_load = foreign.value or 0.0
    if foreign_load > 0.15:
        print(f"warning: other processes used {foreign_load:.0%} of the CPUs meanwhile: timings are noisy")

    result = {
        "benchmark": "startup",
        "machine": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "git_commit": git_commit(),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            "foreign_cpu_load": foreign_load,
        },
        "runs": args.runs,
        "warmup": args.warmup,
        "goal": {"case": "scaler --help", "median_under_s": GOAL_HELP_S, "result": verdict},
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
