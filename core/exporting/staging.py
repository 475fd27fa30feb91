"""Where exports are written: a temporary folder beside DEST, renamed into place at the end.

A failed or interrupted export leaves DEST as it was (absent, or an empty folder); nothing is
ever written into a DEST that holds files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from scaler_wizard.errors import ExportError


def check_dest(dest: Path) -> None:
    """DEST must be absent or an empty folder (one-line ``ExportError`` otherwise)."""
    if dest.is_file() or (dest.is_symlink() and not dest.is_dir()):
        raise ExportError(f"export destination {dest} is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise ExportError(f"export destination {dest} exists and is not empty; give a new or empty folder")


@contextlib.contextmanager
def staged(dest: Path) -> Iterator[Path]:
    """A fresh folder beside ``dest`` to write the export into; when the block ends without an
    error it becomes ``dest`` (checked again, renamed), else it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.export-{os.getpid()}-{time.time_ns()}"
    staging.mkdir()
    try:
        yield staging
        check_dest(dest)
        if dest.is_dir():
            dest.rmdir()  # empty (checked): the rename below takes its place
        try:
            os.rename(staging, dest)
        except OSError as exc:
            raise ExportError(f"cannot move the export into {dest}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["check_dest", "staged"]
