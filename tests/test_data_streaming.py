"""Issue 10 item 19, second half: data files are read in chunks, with progress from the first one.

Chunked reading must give exactly what the whole-file reader gave (texts, labels, warnings,
errors with their row, line and byte numbers), whatever the chunk size, and the ``progress``
callback must be told about each chunk as it is read. Peak memory and time to the first
progress line are measured by ``bench/bench_read.py`` (no timing or memory assertions here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATA, run_scaler
from test_data import _utf8_case

from scaler_wizard.errors import DataError
from scaler_wizard.training.data import LabelledData, load_labelled, load_train_eval
from scaler_wizard.training.readers import CHUNK_ENV

SAMPLES = sorted((DATA / "samples").glob("*.csv"))
ONE_CHUNK = 10**9


def _rows(n: int, labels: Callable[[int], str] = lambda i: ["ham", "spam"][i % 2]) -> list[tuple[str, str]]:
    return [(f"text number {i} café", labels(i)) for i in range(n)]


def _csv(rows: list[tuple[str, str]], sep: str = ",") -> bytes:
    return (f"text{sep}label\n" + "".join(f"{t}{sep}{lab}\n" for t, lab in rows)).encode()


def _jsonl(rows: list[tuple[str, str]]) -> bytes:
    return "".join(
        json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows
    ).encode()


GOOD = _rows(40)
MISSING_LIKE = _rows(40, lambda i: ["ham", "NaN", "spam", "null", "NA"][i % 5])


def _late_byte(raw: bytes) -> bytes:
    """A Latin-1 byte in the last row but one (in a late chunk)."""
    return raw[:-30] + b"\xe9" + raw[-29:]


#: name -> (file bytes, the error the whole-file reader gave, or None when it read the file)
HOSTILE: dict[str, tuple[bytes, str | None]] = {
    "good.csv": (_csv(GOOD), None),
    "good.tsv": (_csv(GOOD, "\t"), None),
    "good.jsonl": (_jsonl(GOOD), None),
    "bom.csv": (b"\xef\xbb\xbf" + _csv(GOOD), None),
    "bom.jsonl": (b"\xef\xbb\xbf" + _jsonl(GOOD), None),
    "missing-like.csv": (_csv(MISSING_LIKE), None),
    "missing-like.jsonl": (_jsonl(MISSING_LIKE), None),
    "new-key-late.jsonl": (_jsonl(GOOD) + b'{"text": "z", "label": "ham", "extra": 1}\n', None),
    "blank-lines.jsonl": (_jsonl(GOOD[:10]) + b"\n\n   \n" + _jsonl(GOOD[10:]), None),
    "cr-line-ends.jsonl": (_jsonl(GOOD).replace(b"\n", b"\r"), None),
    "mixed-labels.jsonl": (
        b'{"text": "a", "label": " 2 "}\n{"text": "b", "label": 2}\n{"text": "c", "label": "1"}\n'
        b'{"text": "d", "label": 1}\n{"text": "e", "label": true}\n{"text": "f", "label": "true"}\n',
        None,
    ),
    "spaced-labels.csv": (b"text,label\na, 2 \nb,2\nc,NaN\nd,ham\n", None),
    "late-utf8.csv": (
        _late_byte(_csv(GOOD)),
        "not UTF-8 text (invalid continuation byte at byte 991, line 40)",
    ),
    "late-utf8.tsv": (
        _late_byte(_csv(GOOD, "\t")),
        "not UTF-8 text (invalid continuation byte at byte 991, line 40)",
    ),
    "late-utf8.jsonl": (
        _late_byte(_jsonl(GOOD)),
        "not UTF-8 text (invalid continuation byte at byte 1940, line 40)",
    ),
    "parse-error-then-bad-utf8.csv": (
        _csv(GOOD[:5])[:-1] + b",extra\n" + _csv(GOOD)[11:] + b"caf\xe9,ham\n",
        "not UTF-8 text (invalid continuation byte at byte 1152, line 47)",
    ),
    "late-parse-error.csv": (
        _csv(GOOD)[:-1] + b",extra\n" + _csv(GOOD)[11:],
        "cannot read as CSV: Error tokenizing data. C error: Expected 2 fields in line 41, saw 3",
    ),
    "late-blank-labels.csv": (
        _csv(GOOD[:30] + [("x", "")] + GOOD[30:] + [("y", " ")]),
        "label column 'label' is blank or NaN in 2 rows (first: data row 31)",
    ),
    "late-blank-text.tsv": (
        _csv(GOOD[:30] + [("  ", "ham")] + GOOD[30:], "\t"),
        "text column 'text' is blank in 1 rows (first: data row 31)",
    ),
    "one-class.csv": (
        _csv(_rows(40, lambda i: "ham")),
        "label column 'label' has only one class ('ham'); a classifier needs at least two",
    ),
    "header-only.csv": (b"text,label\n", "no rows"),
    "text-column-twice.csv": (
        b"text,label,text\n" + b"a,b,c\n" * 30,
        "2 columns are named 'text'; rename or drop the extra",
    ),
    "no-text-column.csv": (
        b"message,label\n" + b"hi,ham\n" * 30,
        "no text column 'text' (columns: message, label)",
    ),
    "late-key-twice.jsonl": (
        _jsonl(GOOD) + b'{"text": "a", "text": "b", "label": "x"}\n',
        "data row 41 has the key 'text' twice",
    ),
    "late-bad-json.jsonl": (
        _jsonl(GOOD) + b'{"text": \n' + _jsonl(GOOD),
        "cannot read as JSONL: line 41: Expecting value: line 1 column 10 (char 9)",
    ),
    "late-not-an-object.jsonl": (
        _jsonl(GOOD) + b"[1, 2]\n",
        "cannot read as JSONL: line 41 is not a JSON object",
    ),
    "late-missing-label.jsonl": (
        _jsonl(GOOD) + b'{"text": "z"}\n',
        "label column 'label' is blank or NaN in 1 rows (first: data row 41)",
    ),
    "late-object-labels.jsonl": (
        _jsonl(GOOD) + b'{"text": "z", "label": {"a": 1}}\n{"text": "z", "label": [1]}\n',
        "label column 'label' holds an object in 2 rows (first: data row 41); "
        "a label is a string, number or boolean",
    ),
    "late-number-text.jsonl": (
        _jsonl(GOOD) + b'{"text": 12, "label": "ham"}\n',
        "text column 'text' holds non-text values (first: data row 41)",
    ),
    "no-text-key-anywhere.jsonl": (
        b'{"message": "a", "label": "x"}\n' * 20,
        "no text column 'text' (columns: message, label)",
    ),
    "only-blank-lines.jsonl": (b"\n\n\n", "no text column 'text' (columns: none)"),
}


def _parquets(folder: Path) -> dict[str, str | None]:
    """Parquet files of 7-row groups (several batches); name -> expected error."""
    texts = [t for t, _ in GOOD]
    labels = [lab for _, lab in GOOD]
    frames = {
        "good.parquet": (pd.DataFrame({"text": texts, "label": labels}), None),
        "late-null-label.parquet": (
            pd.DataFrame({"text": texts, "label": [None if i == 33 else x for i, x in enumerate(labels)]}),
            "label column 'label' is blank or NaN in 1 rows (first: data row 34)",
        ),
        "bool-labels.parquet": (
            pd.DataFrame({"text": texts, "label": [i % 2 == 0 for i in range(40)]}),
            None,
        ),
        "int-labels-named-index.parquet": (
            pd.DataFrame(
                {"text": texts, "label": [i % 3 for i in range(40)]}, index=[f"r{i}" for i in range(40)]
            ),
            None,
        ),
    }
    for name, (frame, _) in frames.items():
        frame.to_parquet(folder / name, row_group_size=7)
    return {name: err for name, (_, err) in frames.items()}


def _load(path: Path, rows: int) -> tuple[str, object]:
    try:
        data = load_labelled(path, chunk_rows=rows)
    except DataError as exc:
        return "error", str(exc)
    return "data", (data.texts, data.labels, data.warnings, data.source)


def _expect(path: Path, rows: int, error: str | None) -> tuple[str, object]:
    got = _load(path, rows)
    if error is None:
        assert got[0] == "data", got
    else:
        assert got == ("error", f"{path}: {error}")
    return got


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_chunked_reading_gives_what_the_whole_file_reader_gave(name: str, tmp_path: Path) -> None:
    raw, error = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(raw)
    whole = _expect(path, ONE_CHUNK, error)
    for rows in (1, 3, 7):
        assert _expect(path, rows, error) == whole, rows
    if name == "mixed-labels.jsonl":  # as written, the same in every chunk size
        assert load_labelled(path, chunk_rows=2).labels == ["2", "2", "1", "1", "true", "true"]
    if name == "spaced-labels.csv":
        data = load_labelled(path, chunk_rows=1)
        assert data.labels == ["2", "2", "NaN", "ham"] and len(data.warnings) == 1


def test_chunked_parquet_reads_the_same(tmp_path: Path) -> None:
    for name, error in _parquets(tmp_path).items():
        whole = _expect(tmp_path / name, ONE_CHUNK, error)
        for rows in (1, 3, 7):
            assert _expect(tmp_path / name, rows, error) == whole, (name, rows)
    data = load_labelled(tmp_path / "bool-labels.parquet", chunk_rows=3)
    assert data.label_names() == ["false", "true"]
    data = load_labelled(tmp_path / "int-labels-named-index.parquet", chunk_rows=3)
    assert data.label_names() == ["0", "1", "2"] and data.texts[0] == GOOD[0][0]


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_files_read_the_same_in_any_chunk_size(sample: Path) -> None:
    whole = _expect(sample, ONE_CHUNK, None)
    for rows in (1, 13, 64):
        assert _expect(sample, rows, None) == whole


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("at", [537, 70_000, (1 << 20) + 5000])
def test_a_late_bad_byte_is_named_in_small_chunks(
    fmt: str, at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many chunks (set through the environment) before the bad byte: still its file offset."""
    monkeypatch.setenv(CHUNK_ENV, "50")
    raw, offset = _utf8_case(fmt, at)
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(raw)
    line = raw[:offset].count(b"\n") + 1
    with pytest.raises(DataError, match=rf"not UTF-8 text \(.* at byte {offset}, line {line}\)$"):
        load_labelled(path)


class Recorder:
    """A ``progress`` factory that records each pass and the bytes it was told about."""

    def __init__(self) -> None:
        self.passes: list[tuple[str, int, list[int]]] = []

    def __call__(self, desc: str, total: int) -> Callable[[int], None]:
        steps: list[int] = []
        self.passes.append((desc, total, steps))
        return steps.append


def _write(fmt: str, rows: list[tuple[str, str]], path: Path) -> None:
    if fmt == "parquet":
        frame = pd.DataFrame({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]})
        frame.to_parquet(path, row_group_size=5000)
    else:
        path.write_bytes(_jsonl(rows) if fmt == "jsonl" else _csv(rows, "\t" if fmt == "tsv" else ","))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_progress_is_reported_chunk_by_chunk(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callback hears about the first chunk long before the read ends (the old reader had
    no progress at all until the whole file was read and checked)."""
    path = tmp_path / f"d.{fmt}"
    _write(fmt, _rows(60_000), path)  # a few MB: pandas reads CSV ahead in blocks of ~256 kB
    size = path.stat().st_size
    for how in ("argument", "environment"):
        rec = Recorder()
        if how == "argument":
            data = load_labelled(path, chunk_rows=5000, progress=rec)
        else:
            monkeypatch.setenv(CHUNK_ENV, "5000")
            data = load_labelled(path, progress=rec)
        assert len(data) == 60_000
        [(desc, total, steps)] = rec.passes
        assert (desc, total) == ("reading data", size)
        assert len(steps) >= 4, steps  # several chunks, each reported as it is read
        assert all(n > 0 for n in steps) and sum(steps) == size
        assert steps[0] < size / 2


def test_train_and_eval_files_get_a_pass_each(tmp_path: Path) -> None:
    train, held = tmp_path / "t.csv", tmp_path / "e.jsonl"
    _write("csv", _rows(500), train)
    _write("jsonl", _rows(300), held)
    rec = Recorder()
    full, _, evald = load_train_eval(train, eval_path=held, progress=rec)
    assert isinstance(full, LabelledData) and len(full) == 500 and len(evald) == 300
    assert [(d, t, sum(s)) for d, t, s in rec.passes] == [
        ("reading data", train.stat().st_size, train.stat().st_size),
        ("reading eval data", held.stat().st_size, held.stat().st_size),
    ]


def test_branch_add_shows_reading_progress_off_a_terminal(
    scaler_env: dict[str, str], store_path: Path, tmp_path: Path
) -> None:
    """A 6 MB file (one class: refused once read, so no training) gets `reading data` lines
    from its first chunk, then the one-line error."""
    path = tmp_path / "big.csv"
    _write("csv", _rows(250_000, lambda i: "ham"), path)
    megabytes = -(-path.stat().st_size // 1_000_000)
    assert megabytes >= 5
    proc = run_scaler("branch", "add", "demo", "new", "--data", str(path), env=scaler_env)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    reading = lines[:-1]
    assert len(reading) >= 2, proc.stderr
    assert all(re.fullmatch(rf"reading data: \d+/{megabytes} MB", line) for line in reading), proc.stderr
    assert reading[-1] == f"reading data: {megabytes}/{megabytes} MB"
    assert lines[-1].startswith("error: ") and "only one class ('ham')" in lines[-1]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


@pytest.mark.parametrize("terminal", [False, True])
def test_reading_progress_is_in_megabytes_and_skipped_for_small_files(terminal: bool) -> None:
    import io

    from rich.console import Console

    from scaler_wizard.cli.branch_progress import BranchProgress

    buffer = io.StringIO()
    progress = BranchProgress(Console(file=buffer, force_terminal=terminal, width=120))
    progress.factory("reading data", 3_999_999)(3_999_999)  # under the threshold: nothing
    progress.stop()
    assert buffer.getvalue() == ""
    advance = progress.factory("reading data", 10_500_000)
    for _ in range(21):
        advance(500_000)
    progress.stop()
    text = buffer.getvalue()
    if terminal:
        assert "reading data (MB)" in text and "11/11" in text
    else:
        lines = text.splitlines()
        assert lines[0] == "reading data: 2/11 MB" and lines[-1] == "reading data: 11/11 MB"
        assert all(re.fullmatch(r"reading data: \d+/11 MB", line) for line in lines)
