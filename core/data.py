"""Labelled text data in: CSV, TSV, JSONL and Parquet via pandas, checked before any training."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaler_wizard.banks.hashing import sha256_file
from scaler_wizard.errors import DataError

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class LabelledData:
    """Texts with string labels, and where they came from."""

    texts: list[str]
    labels: list[str]
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def label_names(self) -> list[str]:
        return sorted(set(self.labels))

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))


def _read_frame(path: Path, fmt: str) -> Any:
    import pandas as pd

    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(
                path,
                sep="," if fmt == "csv" else "\t",
                dtype=str,
                keep_default_na=False,
                encoding="utf-8",
                encoding_errors="strict",
            )
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig")  # tolerate a BOM
        return pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file is empty") from exc
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read as {fmt.upper()}: {str(exc).splitlines()[0]}") from exc


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN
        return True
    return isinstance(value, str) and not value.strip()


def load_labelled(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    fmt: str | None = None,
    min_classes: int = 2,
) -> LabelledData:
    """Read a labelled file; every problem is a one-line DataError naming the file and rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown format {path.suffix!r} (use .csv, .tsv, .jsonl or .parquet)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    frame = _read_frame(path, fmt)
    columns = [str(c) for c in frame.columns]
    for role, col in (("text", text_column), ("label", label_column)):
        if col not in columns:
            raise DataError(f"{path}: no {role} column {col!r} (columns: {', '.join(columns) or 'none'})")
    if len(frame) == 0:
        raise DataError(f"{path}: no rows")
    texts_raw = frame[text_column].tolist()
    labels_raw = frame[label_column].tolist()
    # Row numbers as a person sees them: data row 1 is line 2 of a CSV with a header.
    bad_labels = [i + 1 for i, v in enumerate(labels_raw) if _blank(v)]
    if bad_labels:
        raise DataError(
            f"{path}: label column {label_column!r} is blank or NaN in {len(bad_labels)} rows "
            f"(first: data row {bad_labels[0]})"
        )
    bad_texts = [i + 1 for i, v in enumerate(texts_raw) if _blank(v)]
    if bad_texts:
        raise DataError(
            f"{path}: text column {text_column!r} is blank in {len(bad_texts)} rows (first: data row {bad_texts[0]})"
        )
    not_text = [i + 1 for i, v in enumerate(texts_raw) if not isinstance(v, str)]
    if not_text:
        raise DataError(
            f"{path}: text column {text_column!r} holds non-text values (first: data row {not_text[0]})"
        )
    labels = [_label_str(v) for v in labels_raw]
    classes = sorted(set(labels))
    if len(classes) < min_classes:
        raise DataError(
            f"{path}: label column {label_column!r} has only one class ({classes[0]!r}); a classifier needs at least two"
        )
    return LabelledData(
        texts=[str(t) for t in texts_raw],
        labels=labels,
        source={
            "file": path.name,
            "format": fmt,
            "sha256": str(sha256_file(path)),
            "rows": len(labels),
            "text_column": text_column,
            "label_column": label_column,
        },
    )


def _label_str(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def stratified_split(data: LabelledData, fraction: float, *, seed: int) -> tuple[LabelledData, LabelledData]:
    """(train, eval): ``fraction`` of each class held out (at least one per class with >= 2 rows)."""
    if not 0 < fraction < 1:
        raise DataError(f"eval split must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(data.labels):
        by_class.setdefault(lab, []).append(i)
    held: set[int] = set()
    for idx in by_class.values():
        rng.shuffle(idx)
        n = round(len(idx) * fraction)
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        else:
            n = 0
        held.update(idx[:n])
    train_idx = [i for i in range(len(data)) if i not in held]
    eval_idx = sorted(held)

    def take(ix: list[int], part: str) -> LabelledData:
        return LabelledData(
            [data.texts[i] for i in ix],
            [data.labels[i] for i in ix],
            {**data.source, "split": part, "rows": len(ix)},
        )

    return take(train_idx, f"train ({1 - fraction:.0%})"), take(
        eval_idx, f"eval ({fraction:.0%}, seed {seed})"
    )


def load_train_eval(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    eval_path: str | Path | None = None,
    eval_split: float = 0.1,
    seed: int = 0,
) -> tuple[LabelledData, LabelledData, LabelledData]:
    """(full, train, eval): the eval rows from their own file, or a stratified split of ``path``."""
    full = load_labelled(path, text_column=text_column, label_column=label_column)
    if eval_path is not None:
        train = full
        held = load_labelled(eval_path, text_column=text_column, label_column=label_column, min_classes=1)
    else:
        train, held = stratified_split(full, eval_split, seed=seed)
    if len(held) == 0:
        raise DataError(
            f"{path}: too few rows to hold out an evaluation set (every class has one row); "
            "add rows or pass --eval-data"
        )
    return full, train, held
