"""Refs (a model name -> its current manifest) and their reflog, and the store's no-links rule.

A ref moves first and its reflog line follows, so the reflog never records a move that did
not happen; a move whose line a crash prevented is reported by ``reflog_problem`` and logged
by the next move. Nothing here follows a symbolic link inside the store, and nothing echoes
what a damaged ref holds (a ref linked or copied from elsewhere may hold a secret).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from scaler_wizard.banks.atomic import atomic_write_bytes
from scaler_wizard.banks.hashing import BankHash, is_bank_hash
from scaler_wizard.errors import ConflictError, ModelNotFoundError, StoreError, did_you_mean

_REF_MAX_BYTES = 256
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def read_plain_file(path: Path, limit: int | None) -> bytes:
    """Read a regular file without following a final symlink (at most ``limit`` bytes)."""
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))  # a FIFO never blocks
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(21, "not a plain file (a folder?)")
        if limit is None:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        return os.read(fd, limit)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _is_reflog_entry(entry: Any) -> bool:
    """A well-formed reflog line (others, e.g. one cut short by a crash, are skipped)."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("time"), (int, float))
        and not isinstance(entry.get("time"), bool)
        and 0 <= entry["time"] < 1e11  # finite, a date
        and all(entry.get(k) is None or is_bank_hash(entry.get(k)) for k in ("old", "new"))
        and isinstance(entry.get("reason", ""), str)
    )


class RefStore:
    """Refs and reflogs of a store; mixed into ``ContentStore``, which provides the paths."""

    root: Path

    def _ref_path(self, name: str) -> Path:
        raise NotImplementedError

    def _log_path(self, name: str) -> Path:
        raise NotImplementedError

    def models(self) -> list[str]:
        raise NotImplementedError

    def has_manifest(self, h: str) -> bool:
        raise NotImplementedError

    def refuse_links(self, path: Path) -> None:
        """Refuse a path under the store any part of which is a symbolic link (or not a folder).

        Writes must land inside the store: a link in ``refs/`` or ``logs/`` pointing outside
        would make a ref move append to, or overwrite, someone else's file.
        """
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return
        current = self.root
        for part in rel.parts:
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                return
            except NotADirectoryError:
                raise StoreError(f"{current.parent} is in the store's way: it is not a folder") from None
            if stat.S_ISLNK(st.st_mode):
                raise StoreError(
                    f"refusing {current}: it is a symbolic link, and scaler never follows links "
                    "inside a store (replace it with the real file or folder)"
                )

    def get_ref(self, name: str) -> BankHash | None:
        path = self._ref_path(name)
        self.refuse_links(path)
        try:
            data = read_plain_file(path, _REF_MAX_BYTES)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"ref {path} is unreadable: {exc.strerror or exc}") from None
        text = data.decode("ascii", errors="replace").strip()
        if not is_bank_hash(text):
            # Never echo the content: a ref linked or copied from elsewhere may hold a secret.
            raise StoreError(
                f"ref {path} is damaged: it does not hold a manifest hash (sha256:<64 hex digits>)"
            )
        return BankHash(text)

    def resolve(self, name: str) -> BankHash:
        """The current manifest hash of a model; a clear error listing models if absent."""
        h = self.get_ref(name)  # the name is checked on the way
        if h is None:
            models = self.models()
            raise ModelNotFoundError(
                f"no model named {name!r} in {self.root} {did_you_mean(name, models)}",
                name=name,
                available=models,
            )
        return h

    def set_ref(self, name: str, new: str, *, expected: str | None, reason: str) -> None:
        """Move a ref from ``expected`` (None = must not exist) to ``new``. Call under ``lock()``.

        The ref moves first and the reflog line follows, so the reflog never records a move
        that did not happen. A writer killed between the two leaves a move with no line:
        ``reflog()`` shows it as unlogged, ``reflog_problem()`` reports it, and the next move
        logs it before logging itself.
        """
        new_h = BankHash(new)
        if not self.has_manifest(new_h):
            raise StoreError(f"refusing to point {name!r} at {new_h}: no such manifest")
        current = self.get_ref(name)
        if current != expected:
            if expected is None:
                raise ConflictError(f"model {name!r} already exists", model=name)
            raise ConflictError(
                f"model {name!r} moved to {current} while this change was made from "
                f"{expected}; redo it on the current version",
                model=name,
            )
        log = self._log_path(name)
        self.refuse_links(log)
        self.refuse_links(self._ref_path(name))
        missing = self._unlogged_move(name, current)
        lines = [missing] if missing else []
        lines.append({"time": time.time(), "old": current, "new": new_h, "reason": reason})
        atomic_write_bytes(self._ref_path(name), (new_h + "\n").encode())
        self._append_log(log, lines)

    def _append_log(self, log: Path, entries: list[dict[str, Any]]) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.refuse_links(log)
        text = "".join(json.dumps(e) + "\n" for e in entries).encode()
        try:
            fd = os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write the reflog {log}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"reflog {log} is not a plain file")
            if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                text = b"\n" + text  # a line cut short by a crash stays one (skipped) line
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _raw_reflog(self, name: str) -> list[dict[str, Any]]:
        log = self._log_path(name)
        self.refuse_links(log)
        try:
            data = read_plain_file(log, None)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"reflog {log} is unreadable: {exc.strerror or exc}") from None
        out = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if _is_reflog_entry(entry):
                    out.append(entry)
        return out

    def _unlogged_move(self, name: str, current: BankHash | None) -> dict[str, Any] | None:
        """A reflog entry for a move of the ref that its log does not record, if there is one."""
        raw = self._raw_reflog(name)
        last = raw[-1].get("new") if raw else None
        if last == current or (current is None and not raw):
            return None
        try:
            when = os.lstat(self._ref_path(name)).st_mtime
        except OSError:
            when = time.time()
        return {"time": when, "old": last, "new": current, "reason": "unlogged move (found later)"}

    def reflog(self, name: str) -> list[dict[str, Any]]:
        """Every recorded move of a model's ref, oldest first (an unlogged last move included)."""
        out = self._raw_reflog(name)
        try:
            current = self.get_ref(name)
        except StoreError:  # a damaged ref: the log is what tells where it was
            return out
        missing = self._unlogged_move(name, current)
        return [*out, missing] if missing else out

    def reflog_problem(self, name: str) -> str | None:
        """A one-line description of a disagreement between a ref and its reflog, or None."""
        current = self.get_ref(name)
        missing = self._unlogged_move(name, current)
        if missing is None:
            return None
        return (
            f"the reflog of {name!r} ends at {missing['old']}, but the ref points at {current}: "
            "a writer stopped between moving the ref and logging it (the next move logs it)"
        )
