"""Chunked readers of input files for prediction: CSV, TSV, JSON Lines, Parquet.

Each reader yields :class:`Chunk` objects of at most ``rows`` rows: the rows as plain Python
dicts (every column carried through, values as the file holds them: CSV/TSV cells stay
strings, JSONL and Parquet values keep their types) and the bytes of the file consumed so
far (for a progress bar). Memory is bounded by the chunk size, never by the file.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaler_wizard.errors import DataError

#: input formats by file extension
INPUT_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class Chunk:
    """Rows ``first_row`` .. ``first_row + len(records) - 1`` (1-based data rows) of a file."""

    columns: list[str]
    records: list[dict[str, Any]]
    first_row: int
    done_bytes: int


def input_format(path: Path, fmt: str | None = None) -> str:
    """The input format: ``fmt`` when given, else from the extension; a clear error otherwise."""
    known = sorted(set(INPUT_FORMATS.values()))
    if fmt is not None:
        if fmt.lower() not in known:
            raise DataError(f"unknown input format {fmt!r} (known: {', '.join(known)})", path=path)
        return fmt.lower()
    found = INPUT_FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"{path}: unknown input format {path.suffix or '(no extension)'!r} "
            f"(known: {', '.join(sorted(INPUT_FORMATS))})",
            path=path,
        )
    return found


def read_chunks(path: Path, fmt: str, rows: int) -> Iterator[Chunk]:
    """Yield the rows of ``path`` in chunks of at most ``rows`` rows."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", path=path) from exc
    if not path.is_file():
        raise DataError(f"cannot read {path}: not a file", path=path)
    if size == 0:
        raise DataError(f"{path}: the file is empty", path=path)
    if fmt in ("csv", "tsv"):
        yield from _csv_chunks(path, fmt, rows)
    elif fmt == "jsonl":
        yield from _jsonl_chunks(path, rows)
    else:
        yield from _parquet_chunks(path, rows, size)


def _csv_chunks(path: Path, fmt: str, rows: int) -> Iterator[Chunk]:
    import pandas as pd

    first = 1
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
                for frame in reader:
                    columns = [str(c) for c in frame.columns]
                    frame.columns = columns
                    records = frame.to_dict("records")
                    yield Chunk(columns, records, first, f.tell())
                    first += len(records)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8", path=path) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file is empty", path=path) from exc
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataError(
            f"{path}: cannot read as {fmt.upper()}: {str(exc).strip().splitlines()[0]}", path=path
        ) from exc


def _jsonl_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    columns: dict[str, None] = {}
    records: list[dict[str, Any]] = []
    first, count, done, line_no = 1, 0, 0, 0
    try:
        f = open(path, "rb")  # closed below, also when the caller stops early
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", path=path) from exc
    with f:
        for raw in f:
            done += len(raw)
            line_no += 1
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}: not UTF-8 text ({exc.reason} on line {line_no}); save it as UTF-8", path=path
                ) from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}: cannot read as JSONL: line {line_no}: {exc}", path=path) from exc
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: cannot read as JSONL: line {line_no} is not a JSON object", path=path
                )
            for key in row:
                columns.setdefault(key)
            records.append(row)
            count += 1
            if len(records) >= rows:
                yield Chunk(list(columns), records, first, done)
                first, records = count + 1, []
    if records or count == 0:
        yield Chunk(list(columns), records, first, done)


def _parquet_chunks(path: Path, rows: int, size: int) -> Iterator[Chunk]:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.pandas_metadata or {}
        index = {c for c in meta.get("index_columns", []) if isinstance(c, str)}
        names = [str(c) for c in pf.schema_arrow.names if c not in index]
        total = max(1, pf.metadata.num_rows)
        first, done = 1, 0
        if pf.metadata.num_rows == 0:
            yield Chunk(names, [], 1, size)
            return
        for batch in pf.iter_batches(batch_size=rows, columns=names):
            records = batch.to_pylist()
            done += batch.num_rows
            yield Chunk(names, records, first, size * done // total)
            first += batch.num_rows
    except (ValueError, OSError, pa.ArrowException) as exc:
        raise DataError(
            f"{path}: cannot read as PARQUET: {str(exc).strip().splitlines()[0]}", path=path
        ) from exc
