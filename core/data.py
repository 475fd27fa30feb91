"""Labelled text data in: CSV, TSV, JSONL and Parquet via pandas, checked before any training.

Labels are read as the text written in the file, in every format: ``1`` and ``1.0`` are two
classes whether they come from a CSV or a JSONL file, and JSON ``true`` is the class ``true``.
A label must be a string, number or boolean (a JSON object or array is refused); a label that
reads like a missing value (``NaN``, ``null``, ``NA``…) is kept as a class, with a warning.
"""

from __future__ import annotations

import codecs
import csv
import json
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
    #: things a person should know about the data that do not stop training (one line each)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def label_names(self) -> list[str]:
        return sorted(set(self.labels))

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))


#: label values that mean "missing" to pandas and spreadsheets, kept as classes with a warning
MISSING_LIKE = frozenset(
    {"nan", "null", "none", "na", "n/a", "#n/a", "<na>", "nil", "-nan", "-1.#ind", "1.#qnan"}
)
#: the ``data:`` summary names this many classes at most
SUMMARY_CLASSES = 10
#: an eval split holding out more than this multiple of the asked fraction gets a warning
SPLIT_WARN_FACTOR = 1.5

_CHUNK = 1 << 20


def _check_utf8(path: Path) -> None:
    """Refuse a file that is not UTF-8, naming the byte offset (in the file) and line of the
    first bad byte; pandas reports an offset inside one of its read buffers."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                where = offset - len(pending) + exc.start
                lines += (pending + chunk)[: exc.start].count(b"\n")
                raise DataError(
                    f"{path}: not UTF-8 text ({exc.reason} at byte {where}, line {lines})"
                ) from exc
            if not chunk:
                return
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _header(path: Path, fmt: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), [])


class _Number(str):
    """A JSON number kept as it is written (``1.0`` stays ``1.0``)."""


def _read_jsonl(path: Path) -> Any:
    """JSON Lines by hand: numbers keep their written form, a repeated key is an error."""
    import pandas as pd

    text = path.read_bytes().decode("utf-8-sig")  # valid UTF-8: checked before
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                raise DataError(f"{path}: data row {len(rows) + 1} has the key {key!r} twice")
            obj[key] = value
        return obj

    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=pairs, parse_int=_Number, parse_float=_Number)
        except ValueError as exc:
            raise DataError(f"{path}: cannot read as JSONL: line {number}: {exc}") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}: cannot read as JSONL: line {number} is not a JSON object")
        columns.update(dict.fromkeys(row))
        rows.append(row)
    # object dtype: pandas' string inference would turn the numbers back into plain strings
    return pd.DataFrame(rows, columns=list(columns), dtype=object) if rows else pd.DataFrame()


def _read_frame(path: Path, fmt: str) -> Any:
    import pandas as pd

    try:
        if fmt in ("csv", "tsv"):
            _check_utf8(path)
            header = _header(path, fmt)
            frame = pd.read_csv(
                path,
                sep="," if fmt == "csv" else "\t",
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                encoding_errors="strict",
            )
            frame.attrs["header"] = [str(c) for c in header]  # before pandas renames repeats
            return frame
        if fmt == "jsonl":
            _check_utf8(path)
            return _read_jsonl(path)
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
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a data file (.csv, .tsv, .jsonl or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown format {path.suffix!r} (use .csv, .tsv, .jsonl or .parquet)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    frame = _read_frame(path, fmt)
    columns = [str(c) for c in frame.columns]
    header = frame.attrs.get("header") or columns
    for role, col in (("text", text_column), ("label", label_column)):
        if col not in columns:
            raise DataError(f"{path}: no {role} column {col!r} (columns: {', '.join(columns) or 'none'})")
        if header.count(col) > 1:
            raise DataError(
                f"{path}: {header.count(col)} columns are named {col!r}; rename or drop the extra"
            )
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
    not_text = [i + 1 for i, v in enumerate(texts_raw) if not isinstance(v, str) or isinstance(v, _Number)]
    if not_text:
        raise DataError(
            f"{path}: text column {text_column!r} holds non-text values (first: data row {not_text[0]})"
        )
    not_scalar = [(i + 1, v) for i, v in enumerate(labels_raw) if not isinstance(v, str | int | float | bool)]
    if not_scalar:
        row, value = not_scalar[0]
        if isinstance(value, dict):
            kind = "an object"
        elif isinstance(value, list | tuple) or hasattr(value, "shape"):
            kind = "an array"
        else:
            kind = f"a {type(value).__name__} value"
        raise DataError(
            f"{path}: label column {label_column!r} holds {kind} in {len(not_scalar)} rows "
            f"(first: data row {row}); a label is a string, number or boolean"
        )
    labels = [_label_str(v) for v in labels_raw]
    warnings = _missing_like_warnings(labels, label_column)
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
        warnings=warnings,
    )


def _label_str(value: Any) -> str:
    """A label as written: JSON/Parquet booleans as ``true``/``false``, numbers as their text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def _missing_like_warnings(labels: list[str], label_column: str) -> list[str]:
    found: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        if lab.lower() in MISSING_LIKE:
            found.setdefault(lab, []).append(i + 1)
    return [
        f"label column {label_column!r} holds {lab!r} in {len(rows)} rows (first: data row {rows[0]}); "
        f"it is kept as a class named {lab!r}: drop or relabel those rows if they mean a missing label"
        for lab, rows in found.items()
    ]


def summarize_counts(counts: dict[str, int], limit: int = SUMMARY_CLASSES) -> str:
    """``ham 175, spam 25``; with more than ``limit`` classes, the largest few and how many more."""
    if len(counts) <= limit:
        return ", ".join(f"{k} {v}" for k, v in counts.items())
    largest = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    rest = len(counts) - limit
    return (
        f"{len(counts)} classes; largest: {', '.join(f'{k} {v}' for k, v in largest)}, "
        f"… and {rest} more (smallest {min(counts.values())} rows)"
    )


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

    warnings = []
    if len(eval_idx) > SPLIT_WARN_FACTOR * fraction * len(data) and len(eval_idx) > 1:
        warnings.append(
            f"the eval split holds out {len(eval_idx)} of {len(data)} rows "
            f"({len(eval_idx) / len(data):.0%}, not {fraction:.0%}): each of the {len(by_class)} classes "
            "keeps at least one eval row; pass --eval-data or add rows per class"
        )

    def take(ix: list[int], part: str, notes: list[str]) -> LabelledData:
        return LabelledData(
            [data.texts[i] for i in ix],
            [data.labels[i] for i in ix],
            {**data.source, "split": part, "rows": len(ix)},
            notes,
        )

    return take(train_idx, f"train ({1 - fraction:.0%})", []), take(
        eval_idx, f"eval ({fraction:.0%}, seed {seed})", warnings
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
