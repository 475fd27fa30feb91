"""bench/quality_alternatives.py: the split file both sides read, and the no-venv path (issue 12)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quality_alternatives


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"text": [f"text {i}" for i in range(60)], "label": ["b", "a", "c"] * 20})


def test_few_shot_rows_takes_n_per_class_deterministically() -> None:
    fit = _frame()
    rows = quality_alternatives.few_shot_rows(fit, per_class=8, seed=0)
    assert rows["label"].value_counts().to_dict() == {"a": 8, "b": 8, "c": 8}
    assert list(rows.index) == list(quality_alternatives.few_shot_rows(fit, per_class=8, seed=0).index)


def test_write_split_keeps_indices_texts_and_label_ids(tmp_path: Path) -> None:
    df = _frame()
    fit, val, test = df.iloc[:40], df.iloc[40:50], df.iloc[50:]
    path = quality_alternatives.write_split(tmp_path / "s.json", "toy", ["a", "b", "c"], fit, val, test)
    split = json.loads(path.read_text())
    assert split["labels"] == ["a", "b", "c"]
    assert split["test"]["index"] == list(range(50, 60))
    assert split["test"]["text"][0] == "text 50"
    assert split["fit"]["label"][:3] == [1, 0, 2]
    assert len(split["few_shot"]["8"]["text"]) == 24


def test_missing_venv_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    df = _frame()
    path = quality_alternatives.write_split(tmp_path / "s.json", "toy", ["a", "b", "c"], df, df, df)
    monkeypatch.setattr(quality_alternatives, "ALT_PYTHON", tmp_path / "no-venv" / "python")
    rows = quality_alternatives.run_alternatives(path, ["full-ft", "setfit"])
    assert [r["method"] for r in rows] == ["full-ft", "setfit"]
    assert all(r["status"].startswith("not run") for r in rows)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [
        {"task": "trec", "method": "ours: attn-mix", "accuracy": 0.93, "train_cpu_s": 40.0},
        {"task": "trec", "method": "full fine-tuning", "accuracy": 0.94, "train_wall_s": 300.0},
        {"task": "trec", "method": "SetFit", "status": "not run"},
    ]
    out = quality_alternatives.plot(rows, tmp_path / "q.png")
    assert out is not None and out.read_bytes()[:4] == b"\x89PNG"
