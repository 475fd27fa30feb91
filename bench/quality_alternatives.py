"""The ``--alternatives`` path of bench_quality.py (issue 12): other methods, same split, one run.

Full fine-tuning, PEFT LoRA, AdapterHub ``adapters`` and SetFit need an older transformers than
the project's, so they run in their own venv (``.venv-alt``, made by
scripts/setup_alternatives.sh) as subprocesses of bench_quality: it writes the exact split it
uses to a JSON file, each runner in bench/alternatives/ reads it, trains, evaluates and prints
one JSON line, merged here into the table, the JSON and the plot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
ALT_PYTHON = REPO / ".venv-alt" / "bin" / "python"
ALT_DIR = REPO / "bench" / "alternatives"
#: name -> (runner, extra args); ``{pairs}`` is --setfit-pairs
RUNNERS: dict[str, tuple[str, list[str]]] = {
    "full-ft": ("run_finetune.py", ["--method", "full-ft"]),
    "peft-lora": ("run_finetune.py", ["--method", "peft-lora"]),
    "adapters": ("run_finetune.py", ["--method", "adapters"]),
    "setfit": ("run_setfit.py", ["--pairs", "{pairs}"]),
    "setfit-8shot": ("run_setfit.py", ["--few-shot", "8"]),
}
FEW_SHOT = 8


def few_shot_rows(fit: pd.DataFrame, per_class: int = FEW_SHOT, seed: int = 0) -> pd.DataFrame:
    """``per_class`` rows of each label from the fit part (fewer where a class has fewer)."""
    picked = [
        g.sample(n=min(per_class, len(g)), random_state=seed) for _, g in fit.groupby("label", sort=True)
    ]
    return pd.concat(picked)


def write_split(
    path: Path, task: str, labels: list[Any], fit: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame
) -> Path:
    """The split bench_quality uses, as row indices of data/TASK.csv, texts and label ids."""
    index = {lab: i for i, lab in enumerate(labels)}

    def part(df: pd.DataFrame) -> dict[str, list[Any]]:
        return {
            "index": [int(i) for i in df.index],
            "text": [str(t) for t in df["text"]],
            "label": [index[lab] for lab in df["label"]],
        }

    split = {
        "task": task,
        "labels": [str(lab) for lab in labels],
        "fit": part(fit),
        "val": part(val),
        "test": part(test),
        "few_shot": {str(FEW_SHOT): part(few_shot_rows(fit))},
    }
    path.write_text(json.dumps(split))
    return path


def run_alternatives(
    split: Path, names: list[str], *, limit: int = 0, jobs: int = 1, threads: int = 1, pairs: int = 2000
) -> list[dict[str, Any]]:
    """Run each named runner in .venv-alt (``jobs`` at a time); one row each, failures included."""
    task = json.loads(split.read_text())["task"]
    if not ALT_PYTHON.exists():
        return [
            {"task": task, "method": n, "status": "not run: no .venv-alt (scripts/setup_alternatives.sh)"}
            for n in names
        ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen[str], float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            name = pending.pop(0)
            script, extra = RUNNERS[name]
            cmd = [str(ALT_PYTHON), str(ALT_DIR / script), "--split", str(split), "--threads", str(threads)]
            cmd += [a.format(pairs=pairs) for a in extra] + (["--limit", str(limit)] if limit else [])
            print(f"{task}: {name} started", flush=True)
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
            )
            running[name] = (proc, time.perf_counter())
        time.sleep(0.5)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[name]
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
                row["runner"] = name
                row["process_wall_s"] = time.perf_counter() - t0
                row["concurrent_jobs"] = jobs
            else:
                tail = (err.strip().splitlines() or ["no output"])[-1]
                row = {"task": task, "method": name, "status": f"failed (exit {proc.returncode}): {tail}"}
            rows[name] = row
            print(json.dumps(row), flush=True)
    return [rows[n] for n in names]


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Test accuracy against training CPU seconds (log), one marker per task; None without matplotlib.

    CPU seconds, not wall: on a shared machine, and with the alternatives running while ours
    train, wall time mostly measures the neighbours. Ours add the feature pass where recorded.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(10, 6.5))
    markers = {"trec": "o", "sms_spam": "s"}
    for r in rows:
        if "accuracy" not in r:
            continue
        train = r.get("train_cpu_s", r.get("train_wall_s", 0.0))  # older rows: wall only
        seconds = max(float(train) + float(r.get("feature_cpu_s", 0.0)), 0.01)
        ours = str(r["method"]).startswith("ours")
        ax.scatter(
            seconds,
            100 * r["accuracy"],
            marker=markers.get(r["task"], "^"),
            color="tab:blue" if ours else "tab:orange",
        )
        ax.annotate(
            f"{r['task']}: {r['method']}",
            (seconds, 100 * r["accuracy"]),
            fontsize=7,
            xytext=(4, -3 if ours else 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training CPU seconds (log; ours: + feature pass where recorded)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Branch quality vs training cost (blue: ours, orange: others; o TREC, s SMS)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Re-plot: ``python bench/quality_alternatives.py OUT.png RESULT.json...`` (rows merged)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(main.__doc__)
        return 2
    rows = [row for name in args[1:] for row in json.loads(Path(name).read_text())["rows"]]
    print(plot(rows, Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
