"""Crash-safe file writes: temp file in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"


def temp_owner_pid(name: str) -> int | None:
    """The id of the process that made a temp file or folder (``.tmp-<what>-<pid>-<token>``)."""
    if not name.startswith(TMP_PREFIX):
        return None
    parts = name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isascii() or not parts[1].isdigit() or len(parts[1]) > 9:
        return None
    return int(parts[1])


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(target: Path, *, mode: int = 0o644, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a file handle; on clean exit the file appears at ``target`` whole, or not at all.

    A crash (even SIGKILL) at any point leaves either the old file or the new one, plus at
    worst a ``.tmp-*`` file that ``ContentStore.clean_temp`` removes. ``durable=False`` skips
    the fsyncs (still atomic against a killed process, not against power loss): for caches.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        if durable:
            fsync_path(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(
    target: Path, data: bytes | memoryview, *, mode: int = 0o644, durable: bool = True
) -> None:
    with atomic_writer(target, mode=mode, durable=durable) as fh:
        fh.write(data)
