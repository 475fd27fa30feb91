"""Labelled text data in: CSV, TSV, JSONL and Parquet, checked before any training.

Files are read in chunks with bounded memory and progress (``data_readers``, issue 10 item 19).

Labels are read as the text written in the file, in every format: ``1`` and ``1.0`` are two
classes whether they come from a CSV or a JSONL file, and JSON ``true`` is the class ``true``.
A label must be a string, number or boolean (a JSON object or array is refused); a label that
reads like a missing value (``NaN``, ``null``, ``NA``…) is kept as a class, with a warning.
"""

from __future__ import annotations

import random
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any

from scaler_wizard.banks.hashing import sha256_file
from scaler_wizard.errors import DataError
from scaler_wizard.training.readers import _CHUNK as _CHUNK  # the UTF-8 check's read size (tests)
from scaler_wizard.training.readers import Number, read_columns

#: ``factory(description, total bytes)`` -> ``advance(bytes)``: progress of reading a file
ReadProgress = Callable[[str, int], Callable[[int], None]]

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
    progress: ReadProgress | None = None,
    progress_desc: str = "reading data",
    chunk_rows: int | None = None,
) -> LabelledData:
    """Read a labelled file; every problem is a one-line DataError naming the file and rows.

    The file is read in chunks of ``chunk_rows`` rows (see ``data_readers.chunk_rows``);
    ``progress(progress_desc, file size)`` gives the callback told the bytes read so far."""
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory; give a data file (.csv, .tsv, .jsonl or .parquet)", path=path
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file", path=path)
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown format {path.suffix!r} (use .csv, .tsv, .jsonl or .parquet)", path=path
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty", path=path)
    advance = progress(progress_desc, path.stat().st_size) if progress else None
    cols = read_columns(path, fmt, text_column, label_column, rows=chunk_rows, advance=advance)
    if len(cols.texts) == 0:
        raise DataError(f"{path}: no rows", path=path)
    texts_raw, labels_raw = cols.texts, cols.labels
    # Fast path (millions of rows): every label a non-blank plain string, every text a
    # non-blank plain string; anything else goes through the row-by-row checks below.
    try:
        distinct: set[Any] | None = set(labels_raw)
    except TypeError:  # an object or array label: named by the checks below
        distinct = None
    fast = distinct is not None and all(type(v) is str and v and not v.isspace() for v in distinct)
    # Row numbers as a person sees them: data row 1 is line 2 of a CSV with a header.
    if not fast:
        bad_labels = [i + 1 for i, v in enumerate(labels_raw) if _blank(v)]
        if bad_labels:
            raise DataError(
                f"{path}: label column {label_column!r} is blank or NaN in {len(bad_labels)} rows "
                f"(first: data row {bad_labels[0]})",
                path=path,
            )
    if not all(type(v) is str and v and not v.isspace() for v in texts_raw):
        _check_texts(path, texts_raw, text_column)
    if not fast:
        _check_scalar_labels(path, labels_raw, label_column)
    if fast and distinct is not None:
        names = {v: _label_str(v) for v in distinct}
        labels = labels_raw if all(k is n for k, n in names.items()) else [names[v] for v in labels_raw]
        missing = any(n.lower() in MISSING_LIKE for n in names.values())
        warnings = _missing_like_warnings(labels, label_column) if missing else []
    else:
        labels = [_label_str(v) for v in labels_raw]
        warnings = _missing_like_warnings(labels, label_column)
    classes = sorted(set(labels))
    if len(classes) < min_classes:
        raise DataError(
            f"{path}: label column {label_column!r} has only one class ({classes[0]!r}); a classifier needs at least two",
            path=path,
        )
    return LabelledData(
        texts=texts_raw,  # all str (checked above): no copy
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


def _check_texts(path: Path, texts_raw: list[Any], text_column: str) -> None:
    bad_texts = [i + 1 for i, v in enumerate(texts_raw) if _blank(v)]
    if bad_texts:
        raise DataError(
            f"{path}: text column {text_column!r} is blank in {len(bad_texts)} rows (first: data row {bad_texts[0]})",
            path=path,
        )
    not_text = [i + 1 for i, v in enumerate(texts_raw) if not isinstance(v, str) or isinstance(v, Number)]
    if not_text:
        raise DataError(
            f"{path}: text column {text_column!r} holds non-text values (first: data row {not_text[0]})",
            path=path,
        )


def _check_scalar_labels(path: Path, labels_raw: list[Any], label_column: str) -> None:
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
            f"(first: data row {row}); a label is a string, number or boolean",
            path=path,
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
    # Compact bookkeeping (issue 10 item 19: millions of rows): index arrays, a held-out mask.
    by_class: dict[str, array[int]] = {}
    for i, lab in enumerate(data.labels):
        idx = by_class.get(lab)
        if idx is None:
            idx = by_class[lab] = array("q")
        idx.append(i)
    held = bytearray(len(data))
    n_held = 0
    for idx in by_class.values():
        rng.shuffle(idx)  # the same permutation as on a list, for a given seed
        n = round(len(idx) * fraction)
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        else:
            n = 0
        for i in idx[:n]:
            held[i] = 1
        n_held += n
    n_classes = len(by_class)
    del by_class

    warnings = []
    if n_held > SPLIT_WARN_FACTOR * fraction * len(data) and n_held > 1:
        warnings.append(
            f"the eval split holds out {n_held} of {len(data)} rows "
            f"({n_held / len(data):.0%}, not {fraction:.0%}): each of the {n_classes} classes "
            "keeps at least one eval row; pass --eval-data or add rows per class"
        )

    def take(mask: bytearray, part: str, notes: list[str]) -> LabelledData:
        texts = list(compress(data.texts, mask))
        labels = list(compress(data.labels, mask))
        return LabelledData(texts, labels, {**data.source, "split": part, "rows": len(texts)}, notes)

    kept = held.translate(bytes([1, 0]) + bytes(254))  # 1 for a training row
    return take(kept, f"train ({1 - fraction:.0%})", []), take(
        held, f"eval ({fraction:.0%}, seed {seed})", warnings
    )


def load_train_eval(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    eval_path: str | Path | None = None,
    eval_split: float = 0.1,
    seed: int = 0,
    progress: ReadProgress | None = None,
) -> tuple[LabelledData, LabelledData, LabelledData]:
    """(full, train, eval): the eval rows from their own file, or a stratified split of ``path``.
    ``progress``: see ``load_labelled`` ("reading data", then "reading eval data")."""
    full = load_labelled(path, text_column=text_column, label_column=label_column, progress=progress)
    if eval_path is not None:
        train = full
        held = load_labelled(
            eval_path,
            text_column=text_column,
            label_column=label_column,
            min_classes=1,
            progress=progress,
            progress_desc="reading eval data",
        )
    else:
        train, held = stratified_split(full, eval_split, seed=seed)
    if len(held) == 0:
        raise DataError(
            f"{path}: too few rows to hold out an evaluation set (every class has one row); "
            "add rows or pass --eval-data",
            path=path,
        )
    return full, train, held
