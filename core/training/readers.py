"""Streamed readers of labelled files (issue 10 item 19): bounded memory, progress from the start.

A file is read in chunks (pandas ``chunksize`` for CSV/TSV, line by line for JSONL, pyarrow
record batches for Parquet); of each chunk only the text and label columns are kept, as plain
Python lists (repeated label strings share one object). ``advance(n)`` is called with the
bytes read so far after each chunk. Errors are the ones the whole-file readers gave: a file
that is not UTF-8 anywhere is reported as such (with the byte offset and line of the first bad
byte) even when another problem shows up earlier in the file.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaler_wizard.errors import DataError

#: rows per chunk (CSV/TSV/Parquet) or lines between progress reports (JSONL)
READ_CHUNK_ROWS = 50_000
#: environment variable overriding ``READ_CHUNK_ROWS`` (tests use a small one)
CHUNK_ENV = "SCALER_READ_CHUNK_ROWS"

_CHUNK = 1 << 20

Advance = Callable[[int], None]


def chunk_rows(value: int | None = None) -> int:
    """Rows per chunk: ``value``, else ``$SCALER_READ_CHUNK_ROWS``, else ``READ_CHUNK_ROWS``."""
    if value is None:
        env = os.environ.get(CHUNK_ENV, "").strip()
        value = int(env) if env.isdigit() else READ_CHUNK_ROWS
    return max(1, value)


@dataclass
class Columns:
    """The two columns a labelled file is read for, and the names it has."""

    columns: list[str]  # as the reader lists them (pandas renames a repeated CSV name)
    header: list[str]  # as written in the file (repeats kept)
    texts: list[Any] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)


def check_utf8(path: Path) -> None:
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
                    f"{path}: not UTF-8 text ({exc.reason} at byte {where}, line {lines})", path=path
                ) from exc
            if not chunk:
                return
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _header(path: Path, fmt: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), [])


class Number(str):
    """A JSON number kept as it is written (``1.0`` stays ``1.0``)."""


def check_columns(path: Path, cols: Columns, text_column: str, label_column: str) -> None:
    columns, header = cols.columns, cols.header or cols.columns
    for role, col in (("text", text_column), ("label", label_column)):
        if col not in columns:
            raise DataError(
                f"{path}: no {role} column {col!r} (columns: {', '.join(columns) or 'none'})", path=path
            )
        if header.count(col) > 1:
            raise DataError(
                f"{path}: {header.count(col)} columns are named {col!r}; rename or drop the extra", path=path
            )


class _Keep:
    """Appends chunks of the two columns; one shared object per distinct label string."""

    def __init__(self, cols: Columns) -> None:
        self.cols = cols
        self._labels: dict[str, str] = {}

    def add(self, texts: list[Any], labels: list[Any]) -> None:
        self.cols.texts.extend(texts)
        seen = self._labels
        self.cols.labels.extend(seen.setdefault(v, v) if type(v) is str else v for v in labels)


def read_columns(
    path: Path,
    fmt: str,
    text_column: str,
    label_column: str,
    *,
    rows: int | None = None,
    advance: Advance | None = None,
) -> Columns:
    """The text and label columns of ``path``, read in chunks of ``rows`` rows."""
    size = path.stat().st_size
    sent = [0]

    def progress(done: int) -> None:
        done = min(done, size)
        if advance is not None and done > sent[0]:
            advance(done - sent[0])
            sent[0] = done

    try:
        if fmt in ("csv", "tsv"):
            cols = _read_csv(path, fmt, text_column, label_column, chunk_rows(rows), progress)
        elif fmt == "jsonl":
            cols = _read_jsonl(path, text_column, label_column, chunk_rows(rows), progress)
        else:
            cols = _read_parquet(path, text_column, label_column, chunk_rows(rows), progress)
    except DataError:
        if fmt != "parquet":
            check_utf8(path)  # a bad byte anywhere in the file is named first, as before
        raise
    progress(size)
    return cols


def _read_csv(
    path: Path, fmt: str, text_column: str, label_column: str, rows: int, progress: Advance
) -> Columns:
    import pandas as pd

    try:
        with open(path, "rb") as f:
            reader = pd.read_csv(
                f,
                sep="," if fmt == "csv" else "\t",
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                encoding_errors="strict",
                chunksize=rows,
            )
            with reader:
                cols: Columns | None = None
                keep: _Keep | None = None
                for frame in reader:
                    if cols is None:
                        cols = Columns([str(c) for c in frame.columns], [str(c) for c in _header(path, fmt)])
                        check_columns(path, cols, text_column, label_column)
                        keep = _Keep(cols)
                    assert keep is not None
                    keep.add(frame[text_column].tolist(), frame[label_column].tolist())
                    progress(f.tell())
    except UnicodeDecodeError as exc:
        check_utf8(path)
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file is empty", path=path) from exc
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataError(
            f"{path}: cannot read as {fmt.upper()}: {str(exc).splitlines()[0]}", path=path
        ) from exc
    if cols is None:  # pandas yields one empty chunk for a header-only file; never none
        raise DataError(f"{path}: no rows", path=path)
    return cols


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, line, bytes read so far), numbered as ``str.splitlines`` of the whole
    file numbers them (the whole-file reader did that); a bad byte is a DataError."""
    number, done = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            done += len(raw)
            if number == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                check_utf8(path)  # names the byte and line
                raise
            for line in text.splitlines():
                number += 1
                yield number, line, done


def _read_jsonl(path: Path, text_column: str, label_column: str, rows: int, progress: Advance) -> Columns:
    """JSON Lines by hand: numbers keep their written form, a repeated key is an error."""
    columns: dict[str, None] = {}
    texts: list[Any] = []
    labels: list[Any] = []
    cols = Columns([], [])
    keep = _Keep(cols)
    count = [0]

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                raise DataError(f"{path}: data row {count[0] + 1} has the key {key!r} twice", path=path)
            obj[key] = value
        return obj

    for number, line, done in _jsonl_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=pairs, parse_int=Number, parse_float=Number)
        except DataError:
            raise
        except ValueError as exc:
            raise DataError(f"{path}: cannot read as JSONL: line {number}: {exc}", path=path) from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}: cannot read as JSONL: line {number} is not a JSON object", path=path)
        for key in row:
            columns.setdefault(key)
        texts.append(row.get(text_column))
        labels.append(row.get(label_column))
        count[0] += 1
        if len(texts) >= rows:
            keep.add(texts, labels)
            texts, labels = [], []
            progress(done)
    keep.add(texts, labels)
    cols.columns = cols.header = list(columns)
    check_columns(path, cols, text_column, label_column)
    return cols


def _read_parquet(path: Path, text_column: str, label_column: str, rows: int, progress: Advance) -> Columns:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    size = path.stat().st_size
    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.pandas_metadata or {}
        index = {c for c in meta.get("index_columns", []) if isinstance(c, str)}
        names = [str(c) for c in pf.schema_arrow.names if c not in index]
        cols = Columns(names, names)
        check_columns(path, cols, text_column, label_column)
        total = max(1, pf.metadata.num_rows)
        keep, done = _Keep(cols), 0
        for batch in pf.iter_batches(batch_size=rows, columns=[text_column, label_column]):
            frame = pa.Table.from_batches([batch]).to_pandas()
            keep.add(frame[text_column].tolist(), frame[label_column].tolist())
            done += batch.num_rows
            progress(size * done // total)
    except DataError:
        raise
    except (ValueError, OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read as PARQUET: {str(exc).splitlines()[0]}", path=path) from exc
    return cols
