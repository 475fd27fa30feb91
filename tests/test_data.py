"""``branch add`` input data: every format reads the same, and bad data is refused up front.

Bad data must be a one-line ``error: ...`` (exit 1, no traceback) *before* any work starts:
the model's ref does not move, no trunk features are computed (no feature cache file) and no
training run is started (no ``runs/`` folder). The CLI runs in-process for the many cases and
as the real ``scaler`` console script for one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import DATA, run_scaler

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import DataError
from scaler_wizard.training.data import load_labelled

SMS = DATA / "samples" / "sms_spam_small.csv"
TREC = DATA / "samples" / "trec_small.csv"


def sample() -> pd.DataFrame:
    return pd.read_csv(SMS, dtype=str, keep_default_na=False)


def write_formats(frame: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """The same rows as CSV, TSV, JSONL and Parquet, written by pandas."""
    paths = {fmt: folder / f"data.{fmt}" for fmt in ("csv", "tsv", "jsonl", "parquet")}
    frame.to_csv(paths["csv"], index=False)
    frame.to_csv(paths["tsv"], sep="\t", index=False)
    frame.to_json(paths["jsonl"], orient="records", lines=True, force_ascii=False)
    frame.to_parquet(paths["parquet"], index=False)
    return paths


def run_cli(argv: list[str], monkeypatch: Any, capsys: Any) -> tuple[int, str, str]:
    """``scaler ARGV`` in this process (the same ``main`` the console script calls)."""
    from scaler_wizard.cli.app import main

    monkeypatch.delenv("SCALER_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def feature_files(store_path: Path) -> list[Path]:
    """Trunk-output cache files: pooled features, or token states (issue 12: the CLI default)."""
    folders = [store_path / "cache" / "features", store_path / "cache" / "tokens"]
    return sorted(f for folder in folders if folder.is_dir() for f in folder.iterdir())


# -- every format reads the same --------------------------------------------------------------


def test_csv_tsv_jsonl_parquet_read_the_same(tmp_path: Path) -> None:
    paths = write_formats(sample(), tmp_path)
    loaded = {fmt: load_labelled(p) for fmt, p in paths.items()}
    reference = load_labelled(SMS)
    assert reference.label_names() == ["ham", "spam"] and len(reference) == 200
    for fmt, data in loaded.items():
        assert data.texts == reference.texts, fmt
        assert data.labels == reference.labels, fmt
        assert data.counts() == reference.counts(), fmt
        assert data.source["format"] == fmt and data.source["rows"] == 200


def test_column_options_pick_renamed_columns(tmp_path: Path) -> None:
    frame = pd.read_csv(TREC, dtype=str, keep_default_na=False)
    renamed = frame.rename(columns={"text": "question", "label": "coarse"})
    path = tmp_path / "renamed.jsonl"
    renamed.to_json(path, orient="records", lines=True)
    data = load_labelled(path, text_column="question", label_column="coarse")
    reference = load_labelled(TREC)
    assert data.texts == reference.texts and data.labels == reference.labels
    assert data.label_names() == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    with pytest.raises(DataError, match=r"no text column 'text' \(columns: question, coarse, fine\)"):
        load_labelled(path)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    """Windows tools write UTF-8 with a BOM; it must not rename the first column."""
    paths = write_formats(sample().head(20), tmp_path)
    reference = load_labelled(paths["csv"])
    for fmt in ("csv", "tsv", "jsonl"):
        with_bom = tmp_path / f"bom.{fmt}"
        with_bom.write_bytes(b"\xef\xbb\xbf" + paths[fmt].read_bytes())
        data = load_labelled(with_bom)
        assert (data.texts, data.labels) == (reference.texts, reference.labels), fmt


def test_jsonl_numeric_labels_match_csv_labels(tmp_path: Path) -> None:
    """1 in JSON and "1" in CSV are the same class (no "1.0" from a float column)."""
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    (tmp_path / "a.csv").write_text("text,label\nx,1\ny,0\n")
    assert (
        load_labelled(tmp_path / "a.jsonl").labels == load_labelled(tmp_path / "a.csv").labels == ["1", "0"]
    )


def test_every_format_trains_through_the_cli(
    store_path: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """CSV first (computes the trunk features), then TSV, JSONL, Parquet and a renamed-column
    copy: the same rows in any format are the same texts, so they all hit the feature cache."""
    paths = write_formats(sample(), tmp_path)
    renamed = tmp_path / "renamed.csv"
    sample().rename(columns={"text": "message", "label": "verdict"}).to_csv(renamed, index=False)
    runs = {fmt: ["--data", str(p)] for fmt, p in paths.items()}
    runs["renamed"] = ["--data", str(renamed), "--text-column", "message", "--label-column", "verdict"]
    reports = {}
    for fmt, args in runs.items():
        code, out, err = run_cli(
            [
                "--store",
                str(store_path),
                "branch",
                "add",
                "demo",
                f"sms-{fmt}",
                *args,
                "--epochs",
                "2",
                "--json",
            ],
            monkeypatch,
            capsys,
        )
        assert code == 0, err
        reports[fmt] = json.loads(out)
    assert not reports["csv"]["features_cached"]
    assert all(reports[fmt]["features_cached"] for fmt in ("tsv", "jsonl", "parquet", "renamed"))
    assert len(feature_files(store_path)) == 1

    store = ContentStore.open(store_path)
    manifest = store.get_manifest(store.resolve("demo"))
    assert manifest["version"] == 2 + len(runs)
    for fmt in runs:
        entry = manifest["branches"][f"sms-{fmt}"]
        assert entry["labels"] == ["ham", "spam"]
        data = entry["provenance"]["data"]
        assert data["format"] == ("csv" if fmt == "renamed" else fmt) and data["rows"] == 200
        assert entry["provenance"]["label_counts"] == {"ham": 175, "spam": 25}
    assert manifest["branches"]["sms-renamed"]["provenance"]["data"]["label_column"] == "verdict"
    # Same features, same seed, same labels: the very same head weights (the banks differ only
    # in the branch name each one records in its metadata).
    from safetensors.torch import load_file

    heads = [load_file(store.object_path(manifest["branches"][f"sms-{fmt}"]["head_bank"])) for fmt in runs]
    for head in heads[1:]:
        assert head.keys() == heads[0].keys()
        assert all(torch.equal(head[k], heads[0][k]) for k in head)


# -- bad data: one line, before any work ------------------------------------------------------


@dataclass
class Bad:
    id: str
    files: dict[str, bytes]  # written into the test's tmp folder
    argv: Callable[[Path], list[str]]  # folder -> arguments after `scaler --store S branch add`
    needles: tuple[str, ...]
    extra: list[str] = field(default_factory=list)


def data_arg(name: str, branch: str = "new") -> Callable[[Path], list[str]]:
    return lambda d: ["demo", branch, "--data", str(d / name)]


GOOD = b"text,label\nwin a prize now,spam\nsee you at lunch,ham\ncall me later,ham\nfree entry txt,spam\n"

BAD_CASES = [
    Bad(
        "missing-text-column",
        {"d.csv": b"message,label\nhi,ham\nwin,spam\n"},
        data_arg("d.csv"),
        ("no text column 'text'", "columns: message, label"),
    ),
    Bad(
        "missing-label-column",
        {"d.csv": b"text,category\nhi,ham\nwin,spam\n"},
        data_arg("d.csv"),
        ("no label column 'label'", "columns: text, category"),
    ),
    Bad(
        "label-column-option-names-a-missing-column",
        {"d.csv": GOOD},
        lambda d: ["demo", "new", "--data", str(d / "d.csv"), "--label-column", "fine"],
        ("no label column 'fine'", "columns: text, label"),
    ),
    Bad(
        "csv-content-in-a-tsv-file",
        {"d.tsv": GOOD},
        data_arg("d.tsv"),
        ("no text column 'text'", "columns: text,label"),
    ),
    Bad("empty-file", {"d.csv": b""}, data_arg("d.csv"), ("d.csv", "empty")),
    Bad("header-only", {"d.csv": b"text,label\n"}, data_arg("d.csv"), ("d.csv", "no rows")),
    Bad(
        "one-class",
        {"d.csv": b"text,label\nhi,ham\nyo,ham\nhey,ham\n"},
        data_arg("d.csv"),
        ("only one class ('ham')",),
    ),
    Bad(
        "blank-labels",
        {"d.csv": b"text,label\nhi,ham\nwin,\nbye,  \nfree,spam\n"},
        data_arg("d.csv"),
        ("label column 'label' is blank or NaN in 2 rows", "data row 2"),
    ),
    Bad(
        "null-labels-jsonl",
        {
            "d.jsonl": b'{"text": "hi", "label": "ham"}\n{"text": "win", "label": null}\n{"text": "x", "label": "spam"}\n'
        },
        data_arg("d.jsonl"),
        ("blank or NaN in 1 rows", "data row 2"),
    ),
    Bad(
        "nan-labels-parquet",
        {},
        data_arg("d.parquet"),
        ("blank or NaN in 1 rows", "data row 3"),
    ),
    Bad(
        "blank-text",
        {"d.csv": b'text,label\nhi,ham\n"   ",spam\nwin,spam\n'},
        data_arg("d.csv"),
        ("text column 'text' is blank in 1 rows", "data row 2"),
    ),
    Bad(
        "latin-1-bytes",
        {"d.csv": b"text,label\nhi,ham\ncaf\xe9 cr\xe8me,spam\n"},
        data_arg("d.csv"),
        ("not UTF-8",),
    ),
    Bad(
        "latin-1-bytes-jsonl",
        {"d.jsonl": b'{"text": "hi", "label": "ham"}\n{"text": "caf\xe9", "label": "spam"}\n'},
        data_arg("d.jsonl"),
        ("not UTF-8",),
    ),
    Bad(
        "malformed-jsonl",
        {"d.jsonl": b'{"text": "hi", "label": "ham"}\n{"text": \n'},
        data_arg("d.jsonl"),
        ("cannot read as JSONL",),
    ),
    Bad(
        "unknown-extension",
        {"d.txt": GOOD},
        data_arg("d.txt"),
        ("unknown format '.txt'", ".csv, .tsv, .jsonl or .parquet"),
    ),
    Bad("missing-file", {}, data_arg("nope.csv"), ("nope.csv", "no such file")),
    Bad(
        "one-row-per-class-leaves-no-eval-set",
        {"d.csv": b"text,label\nwin a prize,spam\nsee you,ham\n"},
        data_arg("d.csv"),
        ("too few rows to hold out an evaluation set", "--eval-data"),
    ),
    Bad(
        "eval-label-unseen-in-training",
        {"d.csv": GOOD, "e.csv": b"text,label\nhello,ham\nmaybe later,unsure\n"},
        lambda d: ["demo", "new", "--data", str(d / "d.csv"), "--eval-data", str(d / "e.csv")],
        ("e.csv", "labels ['unsure'] are not in the training labels ['ham', 'spam']"),
    ),
    Bad(
        "branch-exists",
        {"d.csv": GOOD},
        data_arg("d.csv", branch="spam"),
        ("already has a branch 'spam'", "scaler branch remove demo spam"),
    ),
    Bad(
        "branch-name-with-slash",
        {"d.csv": GOOD},
        data_arg("d.csv", branch="bad/name"),
        ("invalid branch name 'bad/name'",),
    ),
    Bad(
        "branch-name-starting-with-dash",
        {"d.csv": GOOD},
        lambda d: ["demo", "--data", str(d / "d.csv"), "--", "-x"],
        ("invalid branch name '-x'",),
    ),
    Bad(
        "missing-model",
        {"d.csv": GOOD},
        lambda d: ["demmo", "new", "--data", str(d / "d.csv")],
        ("no model named 'demmo'", "(have: demo)"),
    ),
]


def write_case(case: Bad, folder: Path) -> None:
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    if case.id == "nan-labels-parquet":
        pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", None]}).to_parquet(folder / "d.parquet")


def assert_refused_before_any_work(code: int, out: str, err: str, needles: tuple[str, ...]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (code, out, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert len(err.splitlines()) == 1, f"stray blank lines on stderr: {err!r}"
    assert out == ""
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_data_is_one_line_before_training(
    case: Bad, store_path: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    write_case(case, tmp_path)
    store = ContentStore.open(store_path)
    ref = store.get_ref("demo")
    reflog = store.reflog("demo")
    code, out, err = run_cli(
        ["--store", str(store_path), "branch", "add", *case.argv(tmp_path)], monkeypatch, capsys
    )
    assert_refused_before_any_work(code, out, err, case.needles)
    assert store.get_ref("demo") == ref and store.reflog("demo") == reflog
    assert feature_files(store_path) == [], "trunk features were computed for bad data"
    assert not (store_path / "runs").exists(), "a training run started on bad data"


def test_bad_data_from_the_real_console_script(
    scaler_env: dict[str, str], store_path: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "d.csv"
    bad.write_bytes(b"text,category\nhi,ham\nwin,spam\n")
    proc = run_scaler("branch", "add", "demo", "new", "--data", str(bad), env=scaler_env)
    line = assert_refused_before_any_work(
        proc.returncode, proc.stdout, proc.stderr, ("no label column 'label'", "columns: text, category")
    )
    assert str(bad) in line
    assert feature_files(store_path) == [] and not (store_path / "runs").exists()


# -- issue 10 item 19: labels are read as written, non-scalars and repeats refused ------------


def _jsonl(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode()


LABEL_CASES = [
    Bad(
        "jsonl-label-object",
        {"d.jsonl": _jsonl('{"text": "hi", "label": "ham"}', '{"text": "win", "label": {"a": 1}}')},
        data_arg("d.jsonl"),
        ("label column 'label' holds an object in 1 rows", "data row 2", "string, number or boolean"),
    ),
    Bad(
        "jsonl-label-array",
        {"d.jsonl": _jsonl('{"text": "hi", "label": [1, 2]}', '{"text": "win", "label": "spam"}')},
        data_arg("d.jsonl"),
        ("label column 'label' holds an array in 1 rows", "data row 1"),
    ),
    Bad(
        "csv-text-column-twice",
        {"d.csv": b"text,label,text\nhi,ham,other\nwin,spam,more\nyo,ham,x\n"},
        data_arg("d.csv"),
        ("2 columns are named 'text'",),
    ),
    Bad(
        "tsv-label-column-twice",
        {"d.tsv": b"text\tlabel\tlabel\nhi\tham\tspam\nwin\tspam\tham\n"},
        data_arg("d.tsv"),
        ("2 columns are named 'label'",),
    ),
    Bad(
        "jsonl-text-key-twice",
        {"d.jsonl": _jsonl('{"text": "hi", "label": "ham"}', '{"text": "a", "text": "b", "label": "spam"}')},
        data_arg("d.jsonl"),
        ("data row 2 has the key 'text' twice",),
    ),
    Bad(
        "jsonl-number-as-text",
        {"d.jsonl": _jsonl('{"text": "hi", "label": "ham"}', '{"text": 12, "label": "spam"}')},
        data_arg("d.jsonl"),
        ("text column 'text' holds non-text values", "data row 2"),
    ),
    Bad(
        "jsonl-line-not-an-object",
        {"d.jsonl": _jsonl('{"text": "hi", "label": "ham"}', "[1, 2]")},
        data_arg("d.jsonl"),
        ("cannot read as JSONL", "line 2 is not a JSON object"),
    ),
    Bad("data-is-a-directory", {}, lambda d: ["demo", "new", "--data", str(d)], ("is a directory",)),
]


@pytest.mark.parametrize("case", LABEL_CASES, ids=[c.id for c in LABEL_CASES])
def test_bad_labels_and_columns_are_one_line_before_training(
    case: Bad, store_path: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    write_case(case, tmp_path)
    store = ContentStore.open(store_path)
    ref = store.get_ref("demo")
    code, out, err = run_cli(
        ["--store", str(store_path), "branch", "add", *case.argv(tmp_path)], monkeypatch, capsys
    )
    line = assert_refused_before_any_work(code, out, err, case.needles)
    assert "no such file" not in line
    assert store.get_ref("demo") == ref
    assert feature_files(store_path) == [] and not (store_path / "runs").exists()


def test_labels_are_read_as_written_in_every_format(tmp_path: Path) -> None:
    """`1` and `1.0` are two classes in CSV *and* in JSONL; JSON true is the class `true`."""
    (tmp_path / "a.csv").write_text("text,label\na,1\nb,1.0\nc,true\nd, 2 \n")
    (tmp_path / "a.jsonl").write_bytes(
        _jsonl(
            '{"text": "a", "label": 1}',
            '{"text": "b", "label": 1.0}',
            '{"text": "c", "label": true}',
            '{"text": "d", "label": " 2 "}',
        )
    )
    pd.DataFrame({"text": list("abcd"), "label": ["1", "1.0", "true", "2"]}).to_parquet(
        tmp_path / "a.parquet"
    )
    expected = ["1", "1.0", "true", "2"]
    for name in ("a.csv", "a.jsonl", "a.parquet"):
        data = load_labelled(tmp_path / name)
        assert data.labels == expected, name
        assert data.label_names() == ["1", "1.0", "2", "true"], name
    (tmp_path / "b.jsonl").write_bytes(_jsonl('{"text": "a", "label": false}', '{"text": "b", "label": 1e3}'))
    assert load_labelled(tmp_path / "b.jsonl").labels == ["false", "1e3"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_missing_like_labels_are_kept_with_a_warning(fmt: str, tmp_path: Path) -> None:
    labels = ["ham", "NaN", "spam", "null", "NA", "NaN", "ham"]
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels})
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    data = load_labelled(path)
    assert data.label_names() == ["NA", "NaN", "ham", "null", "spam"]
    assert len(data.warnings) == 3
    nan = next(w for w in data.warnings if "'NaN'" in w)
    assert "in 2 rows (first: data row 2)" in nan and "kept as a class" in nan
    assert load_labelled(SMS).warnings == []


def _utf8_case(fmt: str, at: int) -> tuple[bytes, int]:
    """A valid file with one Latin-1 byte placed at (about) byte ``at``; returns (bytes, offset)."""
    header = b"text,label\n" if fmt == "csv" else b""
    row = (
        b"caf\xc3\xa9 na\xc3\xafve r\xc3\xa9sum\xc3\xa9,ham\n"
        if fmt == "csv"
        else '{"text": "café naïve résumé", "label": "ham"}\n'.encode()
    )
    body = header
    while len(body) + len(row) < at:
        body += row
    bad_row = b"caf\xe9,spam\n" if fmt == "csv" else b'{"text": "caf\xe9", "label": "spam"}\n'
    offset = len(body) + bad_row.index(b"\xe9")
    return body + bad_row + row * 3, offset


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("at", [0, 537, 70_000, (1 << 20) - 3, (1 << 20) + 5000])
def test_invalid_utf8_names_the_byte_in_the_file(fmt: str, at: int, tmp_path: Path) -> None:
    """Not the offset inside pandas' read buffer (it said "at byte 4" for byte 537)."""
    raw, offset = _utf8_case(fmt, at)
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(raw)
    line = raw[:offset].count(b"\n") + 1
    with pytest.raises(DataError, match=rf"not UTF-8 text \(.* at byte {offset}, line {line}\)$"):
        load_labelled(path)


def test_a_character_across_read_chunks_is_valid_utf8(tmp_path: Path) -> None:
    """A multi-byte character split by the 1 MiB read chunk is not an error."""
    from scaler_wizard.training import data as data_module

    prefix = b"text,label\nhello,ham\n"
    path = tmp_path / "d.csv"
    # "é" (2 bytes) straddles the chunk boundary at 1 MiB
    filler = b"y" * (data_module._CHUNK - len(prefix) - 1)
    raw = prefix + filler + "é,spam\nhi,ham\n".encode()
    assert raw[data_module._CHUNK - 1 : data_module._CHUNK + 1] == "é".encode()
    path.write_bytes(raw)
    assert load_labelled(path).label_names() == ["ham", "spam"]


def test_many_classes_get_a_short_summary_and_a_stated_eval_split(
    store_path: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """60 classes of 2 rows: the `data:` line stays short, and the 50% eval split is stated."""
    rows = [(f"message {c} number {i}", f"class-{c:03d}") for c in range(60) for i in range(2)]
    path = tmp_path / "many.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    code, out, err = run_cli(
        [
            "--store",
            str(store_path),
            "branch",
            "add",
            "demo",
            "many",
            "--data",
            str(path),
            "--epochs",
            "1",
            "--json",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    data_line = next(line for line in err.splitlines() if line.startswith("data:"))
    assert len(data_line) < 400, data_line
    assert "60 classes" in data_line and "and 50 more" in data_line
    warning = next(line for line in err.splitlines() if "eval split" in line)
    assert warning.startswith("warning: ") and "holds out 60 of 120 rows (50%, not 10%)" in warning
