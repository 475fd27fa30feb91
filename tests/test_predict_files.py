"""``scaler predict --data``: tables in, tables out, streamed in chunks (issue 15 item 3).

Real files in tmp_path, the real ``scaler`` console script (``run_scaler``), and the library
entry point ``predict_file`` for the format matrix, the error cases and the 100k-row run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import run_scaler

from scaler_wizard.banks import ContentStore
from scaler_wizard.branch import Prediction
from scaler_wizard.errors import DataError
from scaler_wizard.inference.files import FileProgress, predict_file
from scaler_wizard.modeling.compose import compose, save_version

TEXTS = [
    "WIN a FREE prize now!!!",
    "Where is the Eiffel tower?",
    "ok",
    "Call 0800 to claim your reward, limited offer, act today",
    "Who wrote Hamlet?",
    "see you at lunch",
    "How many feet are in a mile?",
]
IDS = [f"r{i}" for i in range(len(TEXTS))]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"id": IDS, "text": TEXTS, "note": [f"n{i}" for i in range(len(TEXTS))]})


def write_table(path: Path, frame: pd.DataFrame | None = None) -> Path:
    frame = _frame() if frame is None else frame
    fmt = path.suffix.lstrip(".")
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def read_table(path: Path) -> pd.DataFrame:
    fmt = path.suffix.lstrip(".")
    if fmt == "csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if fmt == "tsv":
        return pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t")
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_parquet(path)


def expected(store: ContentStore, texts: list[str], branches: list[str]) -> dict[str, Any]:
    return compose(store, "demo").predict(texts, branches)


def check_output(frame: pd.DataFrame, want: dict[str, Any], branches: list[str]) -> None:
    assert list(frame.columns) == ["id", "text", "note", *[c for b in branches for c in (b, f"{b}_score")]]
    assert list(frame["id"]) == IDS and list(frame["text"]) == TEXTS  # order and carried columns
    assert list(frame["note"]) == [f"n{i}" for i in range(len(TEXTS))]
    for b in branches:
        assert list(frame[b]) == [p.label for p in want[b]]
        assert [float(s) for s in frame[f"{b}_score"]] == pytest.approx([p.score for p in want[b]], abs=1e-5)


# -- the library: every input format into every output format -------------------------------


def test_every_format_round_trips_with_the_library(store: ContentStore, tmp_path: Path) -> None:
    model = compose(store, "demo")
    want = model.predict(TEXTS, ["spam", "topic"])
    seen: list[FileProgress] = []
    for src_fmt in ("csv", "tsv", "jsonl", "parquet"):
        src = write_table(tmp_path / f"in.{src_fmt}")
        for dst_fmt in ("csv", "tsv", "jsonl", "parquet"):
            dst = tmp_path / f"out-{src_fmt}.{dst_fmt}"
            summary = predict_file(
                model,
                src,
                dst,
                branches=["spam", "topic"],
                chunk_rows=3,
                batch_size=2,
                on_progress=seen.append,
            )
            assert (summary.rows, summary.chunks, summary.input_format) == (len(TEXTS), 3, src_fmt)
            check_output(read_table(dst), want, ["spam", "topic"])
    assert seen[-1].rows == len(TEXTS) and seen[-1].done_bytes <= seen[-1].total_bytes


def test_all_branches_by_default_and_jsonl_to_a_stream(store: ContentStore, tmp_path: Path) -> None:
    import io

    model = compose(store, "demo")
    buf = io.StringIO()
    predict_file(model, write_table(tmp_path / "in.csv"), buf, chunk_rows=2)
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    want = model.predict(TEXTS, ["spam", "topic"])
    assert [r["text"] for r in rows] == TEXTS
    assert [r["topic"] for r in rows] == [p.label for p in want["topic"]]
    assert set(rows[0]) == {"id", "text", "note", "spam", "spam_score", "topic", "topic_score"}


# -- the real CLI ------------------------------------------------------------------------------


@pytest.mark.slow  # a real scaler process (torch + model load) per run
@pytest.mark.parametrize(
    ("src_fmt", "dst_fmt"), [("csv", "parquet"), ("tsv", "csv"), ("jsonl", "jsonl"), ("parquet", "csv")]
)
def test_cli_round_trip(
    scaler_env: dict[str, str], store: ContentStore, tmp_path: Path, src_fmt: str, dst_fmt: str
) -> None:
    src = write_table(tmp_path / f"in.{src_fmt}")
    dst = tmp_path / f"out.{dst_fmt}"
    proc = run_scaler(
        "predict", "demo", "--data", str(src), "--text-column", "text", "-b", "spam", "-b", "topic",
        "--output", str(dst), "--chunk-rows", "3", env=scaler_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {len(TEXTS)} rows to {dst}" in proc.stderr
    assert "predict:" not in proc.stderr  # stderr is not a terminal, and the run is short
    check_output(read_table(dst), expected(store, TEXTS, ["spam", "topic"]), ["spam", "topic"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name, "store"])  # no temp left


@pytest.mark.slow  # a real scaler process (torch + model load) per run
def test_cli_jsonl_on_stdout_and_a_text_column_by_name(
    scaler_env: dict[str, str], store: ContentStore, tmp_path: Path
) -> None:
    frame = _frame().rename(columns={"text": "body"})
    src = write_table(tmp_path / "in.csv", frame)
    proc = run_scaler(
        "predict",
        "demo",
        "--data",
        str(src),
        "--text-column",
        "body",
        "--all-branches",
        "--jsonl",
        env=scaler_env,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    want = expected(store, TEXTS, ["spam", "topic"])
    assert [r["body"] for r in rows] == TEXTS and [r["id"] for r in rows] == IDS
    assert [r["spam"] for r in rows] == [p.label for p in want["spam"]]
    assert [r["topic_score"] for r in rows] == pytest.approx([p.score for p in want["topic"]], abs=1e-5)

    # texts as arguments: --jsonl is one object per text, --json stays one array
    proc = run_scaler("predict", "demo", "-b", "spam", "--jsonl", "a text", "another", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in lines] == ["a text", "another"]
    assert lines[0]["predictions"]["spam"]["label"] in ("ham", "spam")


@pytest.mark.slow  # a real scaler process (torch + model load) per run
def test_a_one_branch_model_needs_no_branch_option(
    scaler_env: dict[str, str], store: ContentStore, tmp_path: Path
) -> None:
    model = compose(store, "demo")
    model.remove_branch("topic")
    save_version(store, model, message="only spam")
    src = write_table(tmp_path / "in.jsonl")
    dst = tmp_path / "out.csv"
    proc = run_scaler("predict", "demo", "--data", str(src), "-o", str(dst), env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    check_output(read_table(dst), compose(store, "demo").predict(TEXTS, ["spam"]), ["spam"])
    proc = run_scaler("predict", "demo", "--json", "hello there", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)[0]["predictions"]) == ["spam"]


@pytest.mark.slow  # a real scaler process (torch + model load) per run
def test_a_failed_run_leaves_the_existing_output_untouched(
    scaler_env: dict[str, str], tmp_path: Path
) -> None:
    frame = _frame()
    frame.loc[4, "text"] = "   "  # row 5: in the third chunk of two rows
    src = write_table(tmp_path / "in.csv", frame)
    dst = tmp_path / "out.csv"
    dst.write_text("old,content\n")
    proc = run_scaler(
        "predict",
        "demo",
        "--data",
        str(src),
        "-b",
        "spam",
        "-o",
        str(dst),
        "--chunk-rows",
        "2",
        env=scaler_env,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {src}: row 5: the text is empty"
    assert dst.read_text() == "old,content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv", "store"]  # no temp file left


@pytest.mark.slow  # a real scaler process (torch + model load) per run
def test_cli_bad_input_is_one_line(scaler_env: dict[str, str], tmp_path: Path) -> None:
    src = write_table(tmp_path / "in.csv")
    cases = {
        ("--data", str(src), "--text-column", "body", "-o", str(tmp_path / "o.csv")): "no text column 'body'",
        ("--data", str(src), "-o", str(src)): "the output would overwrite the input",
        ("--file", str(src)): f"use --data {src} --text-column COL",
    }
    for args, message in cases.items():
        proc = run_scaler("predict", "demo", "-b", "spam", *args, env=scaler_env)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
        assert "internal error" not in proc.stderr
    proc = run_scaler("predict", "demo", "-b", "spam", "--data", str(src), env=scaler_env)
    assert proc.returncode == 2 and "--output" in proc.stderr


def test_library_bad_input_errors(store: ContentStore, tmp_path: Path) -> None:
    model = compose(store, "demo")
    src = write_table(tmp_path / "in.csv")

    def error(source: Path, dst: Path | None = None, **kw: Any) -> str:
        with pytest.raises(DataError) as info:
            predict_file(model, source, dst or tmp_path / "out.csv", branches=["spam"], **kw)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert error(src, text_column="body") == (
        f"{src}: no text column 'body' (columns: id, text, note); name it with --text-column"
    )
    assert "unknown input format '.xlsx'" in error(tmp_path / "in.xlsx")
    assert "unknown output format '.xml'" in error(src, tmp_path / "out.xml")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text\ncaf\xe9 ok\n".encode("latin-1"))
    assert "not UTF-8 text" in error(latin)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert error(bad_jsonl).startswith(f"{bad_jsonl}: not UTF-8 text") and "line 2" in error(bad_jsonl)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "fine"}\n{"text": ""}\n{"text": 3}\n')
    assert error(blank) == f"{blank}: row 2: the text is empty"
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "fine"}\n{"id": 2}\n')
    assert error(missing) == f"{missing}: row 2: the text is missing"
    assert error(src, src).endswith("the output would overwrite the input; name another file")
    (tmp_path / "empty.csv").write_text("")
    assert error(tmp_path / "empty.csv") == f"{tmp_path / 'empty.csv'}: the file is empty"
    assert "cannot read" in error(tmp_path / "nope.csv")
    clash = write_table(tmp_path / "clash.csv", _frame().rename(columns={"note": "spam"}))
    assert "already has column(s) 'spam'" in error(clash)
    assert not (tmp_path / "out.csv").exists()


# -- bounded memory: 100,000 rows --------------------------------------------------------------


class _LengthModel:
    """The model protocol ``predict_file`` uses (``branch_names``, ``branch``, ``predict``),
    answering from the text's length: the real trunk labels ~600 short texts/s on this
    machine, too slow for 110k rows in a test; this one measures the file side alone."""

    branch_names = ["parity"]

    def branch(self, name: str) -> None:
        assert name == "parity"

    def predict(
        self, texts: list[str], branches: list[str], *, batch_size: int
    ) -> dict[str, list[Prediction]]:
        return {"parity": [Prediction("even" if len(t) % 2 == 0 else "odd", len(t) / 100, {}) for t in texts]}


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from scaler_wizard.cli.predict_command import FileProgressView

    src = write_table(tmp_path / "in.csv")
    plain, tty = io.StringIO(), io.StringIO()
    with FileProgressView("in.csv", console=Console(file=plain, force_terminal=False), every_s=0) as view:
        predict_file(_LengthModel(), src, tmp_path / "out.csv", chunk_rows=3, on_progress=view.update)
    lines = plain.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "predict: 3 rows",
        "predict: 6 rows",
        "predict: 7 rows",
    ]
    assert lines[-1].startswith("predict: 7 rows (100% of the file), ") and lines[-1].endswith(" rows/s")
    with FileProgressView("in.csv", console=Console(file=tty, force_terminal=True, width=150)) as view:
        assert not view.plain
        predict_file(_LengthModel(), src, tmp_path / "out.csv", chunk_rows=3, on_progress=view.update)
    assert "predict in.csv" in tty.getvalue() and "rows/s" in tty.getvalue() and "ETA" in tty.getvalue()


@pytest.mark.slow
def test_100k_rows_stream_in_bounded_memory(tmp_path: Path) -> None:
    """Peak traced Python memory of a 100k-row run stays near that of a 10k-row run (one chunk's
    worth), where reading the whole file would hold 100k row dicts (tens of MB)."""
    import tracemalloc

    peaks = {}
    for n in (10_000, 100_000):
        src = tmp_path / f"in-{n}.csv"
        with open(src, "w", encoding="utf-8") as f:
            f.write("id,text\n")
            f.writelines(f"{i},hi {i % 997}\n" for i in range(n))
        dst = tmp_path / f"out-{n}.jsonl"
        tracemalloc.start()
        try:
            summary = predict_file(_LengthModel(), src, dst, chunk_rows=2048)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (summary.rows, summary.branches) == (n, ["parity"])
        with open(dst, encoding="utf-8") as f:
            count, last = 0, ""
            for line in f:
                count, last = count + 1, line
        text = f"hi {(n - 1) % 997}"
        want = {
            "id": str(n - 1),
            "text": text,
            "parity": ["even", "odd"][len(text) % 2],
            "parity_score": len(text) / 100,
        }
        assert count == n and json.loads(last) == want  # every row, in input order
        os.unlink(src)
    assert peaks[100_000] < 2 * peaks[10_000] + 4_000_000, peaks
    assert peaks[100_000] < 40_000_000, peaks
