"""Batch prediction over files: streamed in chunks, bounded memory, atomic output (issue 15).

``predict_file(model, "in.csv", "out.parquet", text_column="text", branches=["spam"])``
reads the input in chunks of ``chunk_rows`` rows (CSV, TSV, JSON Lines or Parquet), labels
each chunk with one trunk pass per ``batch_size`` texts (the chunk's texts sorted by length
so that a batch pads little, the answers put back in input order), and writes every input
column plus, per branch, ``<branch>`` (the label) and ``<branch>_score`` (its confidence).
A multi-label branch's label is a list of strings (JSONL, Parquet) or the labels joined with
``;`` (CSV, TSV). The output file appears whole at the end (temp file in the same folder,
fsync, rename): a failed run leaves an existing file untouched and no partial one.
``dst`` may also be a text stream (stdout), which gets JSON Lines as the rows are done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from scaler_wizard.banks.atomic import atomic_writer
from scaler_wizard.errors import DataError
from scaler_wizard.inference.file_readers import Chunk, input_format, read_chunks
from scaler_wizard.inference.file_writers import RowWriter, output_format

#: rows per chunk: the unit of reading, predicting and writing
CHUNK_ROWS = 4096


@dataclass(frozen=True)
class FileProgress:
    """Where a run is: rows done, and bytes of the input consumed out of its size."""

    rows: int
    done_bytes: int
    total_bytes: int
    seconds: float


@dataclass(frozen=True)
class FileSummary:
    """What a finished run did."""

    rows: int
    chunks: int
    branches: list[str]
    output: str
    input_format: str
    output_format: str
    seconds: float


def _texts(chunk: Chunk, path: Path, text_column: str) -> list[str]:
    if chunk.records and text_column not in chunk.columns:
        where = "" if chunk.first_row == 1 else f" (in the rows from row {chunk.first_row})"
        raise DataError(
            f"{path}: no text column {text_column!r}{where} (columns: {', '.join(chunk.columns) or 'none'}); "
            "name it with --text-column",
            path=path,
        )
    texts: list[str] = []
    for i, r in enumerate(chunk.records):
        t = r.get(text_column)
        if not isinstance(t, str):
            what = "missing" if t is None else f"not text ({type(t).__name__})"
            raise DataError(f"{path}: row {chunk.first_row + i}: the text is {what}", path=path)
        if not t.strip():
            raise DataError(f"{path}: row {chunk.first_row + i}: the text is empty", path=path)
        texts.append(t)
    return texts


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def predict_file(
    model: Any,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | IO[str],
    *,
    text_column: str = "text",
    branches: Sequence[str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    batch_size: int = 32,
    input_fmt: str | None = None,
    output_fmt: str | None = None,
    on_progress: Callable[[FileProgress], None] | None = None,
) -> FileSummary:
    """Label every row of ``src`` with ``branches`` of ``model`` (a ``ScalerModel``) into ``dst``.

    ``branches`` None means every branch. Bad input is a one-line :class:`DataError`
    (missing text column, listing those that exist; an empty text, naming its row; an
    unknown format; a file that is not UTF-8; ``dst`` the same file as ``src``).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    src_path = Path(src)
    in_fmt = input_format(src_path, input_fmt)
    names = list(model.branch_names if branches is None else dict.fromkeys(branches))
    for n in names:
        model.branch(n)  # a misspelt name fails here, before any output
    stream = not isinstance(dst, str | os.PathLike)
    dst_path = None if stream else Path(dst)  # type: ignore[arg-type]
    out_fmt = output_format(dst_path, output_fmt)
    if stream and out_fmt != "jsonl":
        raise DataError(f"a stream gets JSON Lines, not {out_fmt}")
    if dst_path is not None:
        if _same_file(src_path, dst_path):
            raise DataError(
                f"{dst_path}: the output would overwrite the input; name another file", path=dst_path
            )
        if dst_path.is_dir():
            raise DataError(f"{dst_path}: is a folder; name an output file", path=dst_path)
    total = src_path.stat().st_size if src_path.exists() else 0
    start = time.monotonic()
    rows = chunks = 0

    def run(writer: RowWriter) -> None:
        nonlocal rows, chunks
        for chunk in read_chunks(src_path, in_fmt, chunk_rows):
            texts = _texts(chunk, src_path, text_column)
            clash = [c for n in names for c in (n, f"{n}_score") if c in chunk.columns]
            if clash:
                raise DataError(
                    f"{src_path}: the input already has column(s) {', '.join(map(repr, clash))}, "
                    "which the predictions would overwrite; rename them",
                    path=src_path,
                )
            _label_chunk(model, chunk, texts, names, batch_size)
            columns = chunk.columns + [c for n in names for c in (n, f"{n}_score")]
            writer.write(columns, chunk.records, chunk.first_row)
            rows += len(chunk.records)
            chunks += 1
            if on_progress is not None:
                on_progress(FileProgress(rows, chunk.done_bytes, total, time.monotonic() - start))
        writer.close()

    if dst_path is None:
        run(RowWriter(dst, out_fmt))  # type: ignore[arg-type]
    else:
        try:
            with atomic_writer(dst_path) as fh:
                run(RowWriter(fh, out_fmt))
        except PermissionError as exc:
            raise DataError(f"cannot write {dst_path}: {exc.strerror}", path=dst_path) from exc
    return FileSummary(
        rows=rows,
        chunks=chunks,
        branches=names,
        output="-" if dst_path is None else str(dst_path),
        input_format=in_fmt,
        output_format=out_fmt,
        seconds=time.monotonic() - start,
    )


def _label_chunk(model: Any, chunk: Chunk, texts: list[str], names: list[str], batch_size: int) -> None:
    """Add ``<branch>`` and ``<branch>_score`` to each record: length-sorted, input order kept."""
    if not texts:
        return
    results = model.predict(texts, names, batch_size=batch_size)  # batched by length inside
    for n in names:
        for i, p in enumerate(results[n]):
            rec = chunk.records[i]
            rec[n] = list(p.label) if isinstance(p.label, list) else p.label
            rec[f"{n}_score"] = p.score
