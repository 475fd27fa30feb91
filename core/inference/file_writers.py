"""Chunked writers of prediction output: CSV, TSV, JSON Lines, Parquet.

The columns are fixed by the first chunk (the input's columns, then ``<branch>`` and
``<branch>_score`` per branch). A multi-label branch's label is a list of strings in JSONL
and Parquet, and the labels joined with ``;`` in CSV/TSV (a single-label label is a string).
Values that are not finite numbers are written as null (empty in CSV).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from scaler_wizard.errors import DataError

#: output formats by file extension
OUTPUT_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def output_format(path: Path | None, fmt: str | None = None) -> str:
    """The output format: ``fmt`` when given, else from the extension of ``path``."""
    known = sorted(set(OUTPUT_FORMATS.values()))
    if fmt is not None:
        if fmt.lower() not in known:
            raise DataError(f"unknown output format {fmt!r} (known: {', '.join(known)})")
        return fmt.lower()
    if path is None:
        return "jsonl"
    found = OUTPUT_FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"{path}: unknown output format {path.suffix or '(no extension)'!r} "
            f"(known: {', '.join(sorted(OUTPUT_FORMATS))}; or give --format)",
            path=path,
        )
    return found


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _cell(value: Any) -> Any:
    """A CSV cell: lists joined with ``;``, objects as JSON, None and NaN empty."""
    value = _finite(value)
    if value is None:
        return ""
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return ";".join(value)
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return value


class RowWriter:
    """Writes row dicts to a binary (file) or text (stdout) stream in one format."""

    def __init__(self, stream: BinaryIO | IO[str], fmt: str) -> None:
        self.fmt = fmt
        self.columns: list[str] | None = None
        self.rows = 0
        self._binary = stream
        self._text: IO[str] | None = None
        self._owns_text = False
        if isinstance(stream, io.TextIOBase):
            self._text = stream
        elif fmt != "parquet":
            self._text = io.TextIOWrapper(cast(BinaryIO, stream), encoding="utf-8", newline="")
            self._owns_text = True
        self._csv: Any = None
        self._parquet: Any = None
        self._schema: Any = None

    def write(self, columns: list[str], records: list[dict[str, Any]], first_row: int) -> None:
        if self.columns is None:
            self.columns = columns
            self._start()
        elif columns != self.columns:
            new = [c for c in columns if c not in self.columns]
            if new:
                raise DataError(
                    f"row {first_row} or later has column(s) {', '.join(map(repr, new))} "
                    "that the first rows lack; give every row the same columns"
                )
        if self.fmt == "jsonl":
            assert self._text is not None
            write = self._text.write
            for r in records:
                write(json.dumps(_finite(r), ensure_ascii=False, allow_nan=False, default=str) + "\n")
        elif self.fmt in ("csv", "tsv"):
            self._csv.writerows([[_cell(r.get(c)) for c in self.columns] for r in records])
        else:
            self._write_parquet(records, first_row)
        self.rows += len(records)

    def _start(self) -> None:
        assert self.columns is not None
        if self.fmt in ("csv", "tsv"):
            assert self._text is not None
            self._csv = csv.writer(self._text, delimiter="," if self.fmt == "csv" else "\t")
            self._csv.writerow(self.columns)

    def _write_parquet(self, records: list[dict[str, Any]], first_row: int) -> None:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        assert self.columns is not None
        cols = self.columns
        try:
            if self._parquet is None:
                table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in records])
                if not records:
                    table = pa.table({c: pa.array([], pa.string()) for c in cols})
                self._schema = table.schema
                self._parquet = pq.ParquetWriter(self._binary, self._schema)
            else:
                table = pa.Table.from_pylist(
                    [{c: r.get(c) for c in cols} for r in records], schema=self._schema
                )
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise DataError(
                f"rows {first_row}..{first_row + len(records) - 1} do not fit the Parquet column types "
                f"of the first rows: {str(exc).strip().splitlines()[0]}"
            ) from exc
        self._parquet.write_table(table)

    def close(self) -> None:
        """Finish the file (Parquet footer, flush); the stream itself stays open."""
        if self.columns is None:
            self.columns = []
            self._start()
        if self._parquet is not None:
            self._parquet.close()
        elif self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), self._binary)
        if self._text is not None:
            self._text.flush()
            if self._owns_text:
                self._text.detach()  # type: ignore[attr-defined]
