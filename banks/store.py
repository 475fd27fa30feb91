"""The content-addressed store: ``objects/`` (banks), ``manifests/`` (versions), ``refs/`` (names).

Same idea as git's object store: objects are immutable and named by the sha256 of their
bytes; a model name is a ref pointing at its current manifest; refs move last, under a
lock, so a crash anywhere leaves the store loadable at its previous version.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from scaler_wizard.banks.atomic import TMP_PREFIX, atomic_write_bytes, atomic_writer, temp_owner_pid
from scaler_wizard.banks.hashing import BankHash, sha256_file
from scaler_wizard.banks.refs import RefStore, pid_alive, read_plain_file
from scaler_wizard.errors import (
    BankNotFoundError,
    IntegrityError,
    ManifestError,
    StoreError,
)
from scaler_wizard.names import validate_name

if TYPE_CHECKING:
    from scaler_wizard.manifests.model import Manifest

STORE_FORMAT = "scaler-wizard-store"
TREE_FORMAT = "scaler-wizard/tree"
_TREE_MAGIC = b'{\n  "files"'  # canonical_json of a tree starts so ("files" sorts first)
_TREE_MAX_BYTES = 1 << 20
STORE_VERSION = 1
_LOCK_TIMEOUT_S = float(os.environ.get("SCALER_LOCK_TIMEOUT", "120"))
#: The derived caches under ``cache/``, one folder each (trunk features, trunk token states,
#: the frozen base's token states); files are named by the hex digest of their inputs.
CACHE_KINDS = frozenset({"features", "tokens", "base-states", "teacher-features", "onnx"})
_CACHE_KEY_RE = re.compile(r"[0-9a-f]{64}")


def _safe_relpath(rel: str) -> bool:
    parts = rel.split("/")
    return (
        bool(rel)
        and not rel.startswith("/")
        and all(p not in ("", ".", "..") for p in parts)
        and "\\" not in rel
    )


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a manifest: its hash is its version's name.

    The same bytes as ``scaler_wizard.manifests.model.canonical_json`` (tests/test_store.py
    checks they agree); kept here so importing the store does not import the manifest schema.
    """
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def default_store_path() -> Path:
    """``$SCALER_HOME`` if set, else ``./scaler-store``."""
    return Path(os.environ.get("SCALER_HOME") or "scaler-store")


class ContentStore(RefStore):
    """A local folder of banks, manifests and refs."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()  # symlinked views (base, folder banks) need absolute targets
        self._verified: dict[str, list[int]] | None = None
        self._verified_dirty = False
        self._defer_cache_writes = 0

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path | None = None, *, create: bool = False) -> ContentStore:
        if isinstance(root, str) and not root.strip():
            raise StoreError("the store path is empty: give a folder (--store PATH or SCALER_HOME)")
        store = cls(root if root is not None else default_store_path())
        for folder in (store.root, *store.root.parents):
            if os.path.lexists(folder):
                if folder == store.root and not folder.is_dir():
                    raise StoreError(f"{store.root} is a file, not a store folder")
                if not folder.is_dir():
                    raise StoreError(f"{store.root} cannot be a store: {folder} is a file, not a folder")
                break
        marker = store.root / "scaler-store.json"
        found, info = store._read_marker(marker)
        if found:
            if (
                not isinstance(info, dict)
                or info.get("format") != STORE_FORMAT
                or info.get("version") != STORE_VERSION
            ):
                raise StoreError(f"{store.root} is not a scaler-wizard store of version 1")
            return store
        if not create:
            raise StoreError(
                f"no store at {store.root} (create one with `scaler init`, "
                "or point --store / SCALER_HOME at an existing one)"
            )
        try:
            for sub in ("objects", "manifests", "refs/models", "logs/refs/models", "cache"):
                (store.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a parent of the path is a file
            raise StoreError(f"cannot create a store at {store.root}: {exc.strerror or exc}") from None
        for sub in ("objects", "manifests", "refs/models", "logs/refs/models", "cache"):
            store.refuse_links(store.root / sub)
        atomic_write_bytes(marker, canonical_json({"format": STORE_FORMAT, "version": STORE_VERSION}))
        return store

    def _read_marker(self, marker: Path) -> tuple[bool, Any]:
        """(whether there is a ``scaler-store.json``, its parsed content)."""
        try:
            self.refuse_links(marker)
            data = read_plain_file(marker, 1 << 16)
        except FileNotFoundError:
            return False, None
        except NotADirectoryError:
            raise StoreError(f"{self.root} is not a folder") from None
        except OSError as exc:
            raise StoreError(f"{marker} is unreadable: {exc.strerror or exc}") from None
        try:
            return True, json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{marker} is unreadable: {exc}") from exc

    # -- locking -------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout: float = _LOCK_TIMEOUT_S) -> Iterator[None]:
        """Serialise writers. Readers never need it: what they read is immutable or atomic."""
        path = self.root / ".lock"
        self.refuse_links(path)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise StoreError(
                f"store {self.root} is locked by another writer (waited {timeout:.0f}s)"
            ) from exc
        except OSError as exc:
            raise StoreError(f"cannot lock the store: {path}: {exc.strerror or exc}") from None
        try:
            yield
        finally:
            lock.release()

    # -- objects (banks) -----------------------------------------------------------
    def object_path(self, h: str) -> Path:
        bh = BankHash(h)
        return self.root / "objects" / bh.hex[:2] / bh.hex[2:]

    def has(self, h: str) -> bool:
        return self.object_path(h).is_file()

    def put_bytes(self, data: bytes | memoryview, expected: str | None = None) -> BankHash:
        """Store bytes as an object (no-op when present and intact); returns its name."""
        h = BankHash.of_bytes(data)
        if expected is not None and h != expected:
            raise IntegrityError(f"refusing bank {expected}: its bytes hash to {h}", bank=expected)
        path = self.object_path(h)
        if not self._present_and_intact(h, path):
            self.refuse_links(path)
            atomic_write_bytes(path, data, mode=0o444)
            self._remember_verified(h, path)
        return h

    def put_file(self, src: str | Path, expected: str | None = None) -> BankHash:
        """Copy a file into the store, hashing the bytes actually copied."""
        import hashlib

        src = Path(src)
        digest = hashlib.sha256()
        staging = self.root / "objects" / f"{TMP_PREFIX}import-{os.getpid()}-{time.time_ns()}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(src, "rb") as fin, open(staging, "wb") as fout:
                while chunk := fin.read(4 * 1024 * 1024):
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            h = BankHash("sha256:" + digest.hexdigest())
            if expected is not None and h != expected:
                raise IntegrityError(
                    f"refusing {src.name}: expected {expected}, bytes hash to {h}", bank=expected, path=src
                )
            path = self.object_path(h)
            if not self._present_and_intact(h, path):
                self.refuse_links(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(staging, 0o444)
                os.replace(staging, path)
                from scaler_wizard.banks.atomic import fsync_path

                fsync_path(path.parent)
                self._remember_verified(h, path)
            return h
        finally:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()

    def _present_and_intact(self, h: BankHash, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            self.verified_path(h)
            return True
        except IntegrityError:
            return False  # a corrupt copy gets replaced by the good bytes we hold

    def verified_path(self, h: str, *, trust_cache: bool = True) -> Path:
        """Path of an object whose bytes hash to its name (raises otherwise)."""
        bh = BankHash(h)
        path = self.object_path(bh)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BankNotFoundError(f"bank {bh} is missing from the store {self.root}", bank=bh) from None
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if trust_cache and self._verified_cache().get(bh.hex) == key:
            return path
        actual = sha256_file(path)
        if actual != bh:
            raise IntegrityError(
                f"bank {bh} is corrupt or tampered: its bytes hash to {actual} "
                f"({path}); restore it from a copy or `scaler pull` it again",
                bank=bh,
                path=path,
            )
        self._remember_verified(bh, path, key)
        return path

    def read_bytes(self, h: str, *, trust_cache: bool = True) -> bytes:
        bh = BankHash(h)
        data = self.verified_path(bh, trust_cache=trust_cache).read_bytes()
        if not trust_cache and BankHash.of_bytes(data) != bh:  # raced with a writer
            raise IntegrityError(f"bank {bh} changed while being read", bank=bh)
        return data

    def iter_objects(self) -> Iterator[BankHash]:
        objects = self.root / "objects"
        for sub in sorted(objects.iterdir()) if objects.is_dir() else []:
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sorted(sub.iterdir()):
                if not f.name.startswith(TMP_PREFIX):
                    with contextlib.suppress(StoreError):
                        yield BankHash("sha256:" + sub.name + f.name)

    # -- trees (folder banks, e.g. a PEFT adapter folder) ------------------------------
    #: What a folder bank may hold: JSON config and safetensors, never pickle (.bin, .pt, .pkl)
    #: or code, which a library loading the folder might run (PEFT's .bin fallback is torch.load).
    TREE_MEMBER_NAMES = ("adapter_config.json",)
    TREE_MEMBER_SUFFIX = ".safetensors"

    @classmethod
    def check_tree_files(cls, names: list[str], *, what: str) -> None:
        """Refuse a member not on the allow-list, and a path that is both a file and a folder."""
        listed = set(names)
        for rel in sorted(listed):
            base = rel.rsplit("/", 1)[-1]
            suffix = cls.TREE_MEMBER_SUFFIX
            if base not in cls.TREE_MEMBER_NAMES and not (base.endswith(suffix) and base != suffix):
                raise IntegrityError(
                    f"{what}: member {rel!r:.80} is not allowed in a folder bank "
                    f"(only {', '.join(cls.TREE_MEMBER_NAMES)} and *{suffix}: no pickle, no code)"
                )
            parts = rel.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in listed:
                    raise IntegrityError(
                        f"{what}: lists both {'/'.join(parts[:i])!r:.80} and {rel!r:.80}: "
                        "a path cannot be a file and a folder"
                    )

    def put_tree(self, folder: str | Path, *, kind: str, layout: str) -> BankHash:
        """Store every file of a folder, then a tree object naming them; returns the tree's name.

        A tree is canonical JSON ``{"format": TREE_FORMAT, "kind", "layout", "files": {path: hash}}``,
        so a folder bank is named by the sha256 of its content like any other bank. Its members
        must be on the allow-list (``check_tree_files``).
        """
        folder = Path(folder)
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        self.check_tree_files([p.relative_to(folder).as_posix() for p in paths], what=f"folder {folder}")
        files: dict[str, str] = {}
        for path in paths:
            rel = path.relative_to(folder).as_posix()
            files[rel] = str(self.put_file(path))
        return self.put_bytes(
            canonical_json({"format": TREE_FORMAT, "kind": kind, "layout": layout, "files": files})
        )

    def read_tree(self, h: str, *, trust_cache: bool = True) -> dict[str, Any] | None:
        """The tree object's JSON if ``h`` names a tree, else None (it is a plain bank)."""
        path = self.verified_path(h, trust_cache=trust_cache)
        with open(path, "rb") as fh:
            head = fh.read(len(_TREE_MAGIC))
        if head != _TREE_MAGIC or path.stat().st_size > _TREE_MAX_BYTES:
            return None
        try:
            tree = json.loads(path.read_bytes())
        except ValueError:
            return None
        if not isinstance(tree, dict) or tree.get("format") != TREE_FORMAT:
            return None
        files = tree.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and _safe_relpath(k) and isinstance(v, str) for k, v in files.items()
        ):
            raise IntegrityError(f"tree {h} lists an invalid file name or hash")
        for v in files.values():
            BankHash(v)
        self.check_tree_files(list(files), what=f"tree {h}")  # pull and verify read trees here
        return tree

    def tree_members(self, h: str) -> dict[str, BankHash]:
        """``{relative path: object}`` of a tree; empty for a plain bank."""
        tree = self.read_tree(h)
        return {k: BankHash(v) for k, v in tree["files"].items()} if tree else {}

    def materialize_tree(self, h: str, dest: Path) -> Path:
        """Lay a tree out under ``dest`` as symlinks to verified objects (read-only view)."""
        tree = self.read_tree(h)
        if tree is None:
            raise IntegrityError(f"bank {h} is not a folder bank")
        for rel, member in sorted(tree["files"].items()):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(self.verified_path(member), target)
        return dest

    # -- the verification cache ------------------------------------------------------
    def _cache_file(self) -> Path:
        return self.root / "cache" / "verified.json"

    def _verified_cache(self) -> dict[str, list[int]]:
        if self._verified is None:
            try:
                loaded = json.loads(self._cache_file().read_text())
                self._verified = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._verified = {}
        return self._verified

    def _remember_verified(self, h: BankHash, path: Path, key: list[int] | None = None) -> None:
        if key is None:
            st = path.stat()
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        cache = self._verified_cache()
        if cache.get(h.hex) == key:
            return
        cache[h.hex] = key
        self._verified_dirty = True
        if not self._defer_cache_writes:
            self.flush_verified()

    @contextlib.contextmanager
    def deferred_cache_writes(self) -> Iterator[None]:
        """Write the verification cache once, at the end, however many banks are checked or put.

        Without it every new entry rewrites the whole JSON file: O(N^2) bytes over N banks.
        """
        self._defer_cache_writes += 1
        try:
            yield
        finally:
            self._defer_cache_writes -= 1
            if not self._defer_cache_writes:
                self.flush_verified()

    def flush_verified(self) -> None:
        if not self._verified_dirty:
            return
        self._verified_dirty = False
        # An optimisation only: losing it to a crash costs a re-hash, so no fsync (which made
        # verifying many small banks cost one fsync pair each).
        with contextlib.suppress(OSError, StoreError):
            self.refuse_links(self._cache_file())
            atomic_write_bytes(self._cache_file(), json.dumps(self._verified_cache()).encode(), durable=False)

    def forget_verified(self) -> None:
        """Drop the verification cache (``scaler verify`` re-hashes everything anyway)."""
        self._verified = {}
        with contextlib.suppress(FileNotFoundError):
            self._cache_file().unlink()

    # -- derived caches (issue 11 item 5: the one layout of ``cache/``) -----------------
    def cache_dir(self, kind: str) -> Path:
        """The folder of one kind of derived cache (``kind`` is one of ``CACHE_KINDS``)."""
        if kind not in CACHE_KINDS:
            raise StoreError(f"unknown cache kind {kind!r}; known: {', '.join(sorted(CACHE_KINDS))}")
        return self.root / "cache" / kind

    def cache_path(self, kind: str, key: str) -> Path:
        """Where the ``kind`` cache file computed from inputs hashed to ``key`` (64 hex digits)
        lives. The store only places the file: what is inside, and whether it can be trusted,
        is the business of whoever reads it."""
        if not isinstance(key, str) or not _CACHE_KEY_RE.fullmatch(key):
            raise StoreError(f"invalid cache key {key!r}: expected 64 lowercase hex digits")
        return self.cache_dir(kind) / f"{key}.safetensors"

    # -- manifests -------------------------------------------------------------------
    def manifest_path(self, h: str) -> Path:
        return self.root / "manifests" / f"{BankHash(h).hex}.json"

    def put_manifest(self, manifest: Manifest | Any) -> BankHash:
        """Store a manifest's canonical bytes (a typed Manifest, or JSON: validated by readers); its hash."""
        if manifest is None or isinstance(manifest, (dict, list, str, int, float)):
            data = canonical_json(manifest)  # JSON (an int has a to_bytes too, of another kind)
        else:
            data = manifest.to_bytes()
        h = BankHash.of_bytes(data)
        path = self.manifest_path(h)
        if not path.is_file() or BankHash.of_bytes(path.read_bytes()) != h:
            self.refuse_links(path)
            atomic_write_bytes(path, data, mode=0o444)
        return h

    def has_manifest(self, h: str) -> bool:
        return self.manifest_path(h).is_file()

    def get_manifest(self, h: str) -> dict[str, Any]:
        """A manifest's JSON, its hash checked (not yet schema-validated)."""
        bh = BankHash(h)
        path = self.manifest_path(bh)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"manifest {bh} is missing from the store {self.root}") from None
        if BankHash.of_bytes(data) != bh:
            raise IntegrityError(f"manifest {bh} is corrupt or tampered ({path})", bank=bh, path=path)
        # -- manifest limits (engineer D, issue 10 item 8): size, depth, integer range --
        from scaler_wizard.manifests.validation import parse_manifest_bytes

        obj = parse_manifest_bytes(data, f"manifest {bh}")
        # -- end manifest limits --
        if not isinstance(obj, dict):
            raise ManifestError(f"manifest {bh}: top level must be an object")
        return obj

    def manifest(self, h: str, *, where: str | None = None) -> Manifest:
        """A stored manifest, its hash checked, parsed and validated (the one way to read one).

        ``where`` starts any ManifestError (default ``manifest sha256:abcd1234``).
        """
        from scaler_wizard.manifests.model import parse_manifest

        bh = BankHash(h)
        return parse_manifest(self.get_manifest(bh), where=where or f"manifest {bh.short}")

    def iter_manifests(self) -> Iterator[BankHash]:
        for f in sorted((self.root / "manifests").glob("*.json")):
            with contextlib.suppress(StoreError):
                yield BankHash("sha256:" + f.stem)

    # -- refs ------------------------------------------------------------------------
    def _ref_path(self, name: str) -> Path:
        return self.root / "refs" / "models" / validate_name(name)

    def models(self) -> list[str]:
        d = self.root / "refs" / "models"
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(TMP_PREFIX)) if d.is_dir() else []

    def _log_path(self, name: str) -> Path:
        return self.root / "logs" / "refs" / "models" / validate_name(name)

    # -- housekeeping -------------------------------------------------------------------
    def clean_temp(self, *, stale_only: bool = False) -> int:
        """Remove temp files and folders left by writers that died (call under ``lock()``).

        ``stale_only`` keeps those of processes still alive (readers write caches without the
        lock) and a dead pull's downloads (the next pull adopts them).
        """
        n = 0
        me = os.getpid()
        for path in sorted(self.root.rglob(f"{TMP_PREFIX}*"), key=lambda p: len(p.parts)):
            if stale_only:
                if path.name.startswith(f"{TMP_PREFIX}pull-"):
                    continue
                pid = temp_owner_pid(path.name)
                if pid is None or pid == me or pid_alive(pid):
                    continue
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                n += 1
        return n

    def scratch_dir(self, purpose: str) -> Path:
        """A fresh folder under the store (same filesystem) for staging; caller removes it."""
        d = self.root / "tmp" / f"{TMP_PREFIX}{purpose}-{os.getpid()}-{time.time_ns()}"
        d.mkdir(parents=True)
        return d


__all__ = ["ContentStore", "atomic_writer", "canonical_json", "default_store_path", "validate_name"]
