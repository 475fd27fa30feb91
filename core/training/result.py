"""What a ``scaler train`` run reports: ``RUN_DIR/result.json`` and the summary it holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaler_wizard.training.monitor import METRICS_FILE, read_records

RESULT_FILE = "result.json"


@dataclass
class TrainResult:
    run_dir: Path
    model: str
    manifest: str | None
    version: int | None
    steps: int
    seconds: float
    branches: dict[str, dict[str, Any]]
    trunk: dict[str, Any]
    warnings: list[dict[str, Any]]
    stale: list[str]
    resumed_from: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "model": self.model,
            "manifest": self.manifest,
            "version": self.version,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "branches": self.branches,
            "trunk": self.trunk,
            "warnings": self.warnings,
            "stale": self.stale,
            "resumed_from": self.resumed_from,
        }


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def first_eval(run_dir: Path) -> dict[str, Any] | None:
    for r in read_records(run_dir / METRICS_FILE):
        if r.get("event") == "eval":
            branches: dict[str, Any] = r["branches"]
            return branches
    return None


def last_window(run_dir: Path, window: int) -> dict[str, Any]:
    """Means over the last ``window`` train records (what the summary table shows)."""
    recs = [r for r in read_records(run_dir / METRICS_FILE) if r.get("event") == "train"][-window:]
    if not recs:
        return {"branches": {}, "aux_loss": None, "expert_load": []}
    out: dict[str, Any] = {"aux_loss": sum(r["aux_loss"] for r in recs) / len(recs), "branches": {}}
    for name in recs[-1]["branches"]:
        vals = [r["branches"][name] for r in recs if r["branches"][name]["examples"]]
        n = sum(v["examples"] for v in vals) or 1
        out["branches"][name] = {
            "loss": sum(v["loss"] * v["examples"] for v in vals) / n,
            "accuracy": sum(v["accuracy"] * v["examples"] for v in vals) / n,
        }
    layers = recs[-1]["expert_load"]
    out["expert_load"] = [
        [sum(r["expert_load"][li][e] for r in recs) / len(recs) for e in range(len(row))]
        for li, row in enumerate(layers)
    ]
    return out


def branch_summary(
    final: dict[str, Any], windows: dict[str, Any], first: dict[str, Any] | None, *, name: str, new: bool
) -> dict[str, Any]:
    """One branch in the result: new or continued, its training loss and accuracy over the
    last window, and its eval scores before the first step and at the end."""
    trained = windows["branches"].get(name, {})
    return {
        "new": new,
        "train_loss": trained.get("loss"),
        "train_accuracy": trained.get("accuracy"),
        "eval_accuracy_start": (first or {}).get(name, {}).get("accuracy"),
        "eval_accuracy": final["accuracy"],
        "eval_macro_f1": final["macro_f1"],
        "eval_loss": final["loss"],
    }
