"""The ``onnx`` cache: exported graphs, one sealed folder per graph, placed by the store.

``cache/onnx/<key>/`` holds ``model.onnx`` (the graph's bytes) and ``seal.json``: the binding
version, the kind, the key, the inputs the graph is bound to (trunk id, base, branch banks,
exporter/onnx/onnxruntime/torch versions, precision, ...) and a sha256 *seal* over all of that
and the graph's bytes. The rules are ``caches.bound_cache``'s: a name is only a claim, so a
folder is read through :func:`read_graph` only, which returns the graph's bytes when everything
matches what the caller expects, and None (a miss: re-export) when the folder or a file is
missing, unreadable, truncated, of another kind, binding, key or inputs, or the bytes do not
match the seal. The bytes returned are the very bytes that were hashed: onnxruntime loads them
from memory, never the file again (no window between the check and the load).

:func:`write_graph` stages the folder beside its place (``.tmp-onnx-<pid>-<ns>``, removed by
``ContentStore.clean_temp`` if the writer dies) and renames it into place; a damaged folder
there is moved aside and removed first. A cache that cannot be written is not fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.atomic import TMP_PREFIX, atomic_write_bytes

log = logging.getLogger(__name__)

KIND = "onnx"
#: Bumped when the folder layout or the seal changes: older folders are then misses.
BINDING_VERSION = "1"
GRAPH = "model.onnx"
SEAL = "seal.json"


def graph_key(bound: Mapping[str, object]) -> str:
    """The cache key (64 hex digits) of a graph bound to ``bound`` (canonical JSON)."""
    data = json.dumps(dict(bound), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def graph_dir(store: ContentStore, key: str) -> Path:
    """Where the graph of ``key`` lives (``store.cache_path`` checks the key's form)."""
    return store.cache_path(KIND, key).with_suffix("")


def seal_of(data: bytes, *, key: str, bound: Mapping[str, object]) -> str:
    """sha256 over the header (binding, kind, key, bound inputs; canonical JSON) then the graph."""
    header = {"binding": BINDING_VERSION, "kind": KIND, "key": key, "bound": dict(bound)}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    digest.update(data)
    return "sha256:" + digest.hexdigest()


def read_graph(store: ContentStore, key: str, bound: Mapping[str, object]) -> bytes | None:
    """The cached graph's bytes if its folder is exactly what ``key`` and ``bound`` say, else None."""
    folder = graph_dir(store, key)
    if not folder.is_dir():
        return None
    why = _mismatch(folder, key, bound)
    if isinstance(why, str):
        log.warning("onnx cache %s not used (%s): re-exporting", folder.name[:12], why)
        return None
    return why


def _mismatch(folder: Path, key: str, bound: Mapping[str, object]) -> bytes | str:
    try:
        seal = json.loads((folder / SEAL).read_text(encoding="utf-8"))
        data = (folder / GRAPH).read_bytes()
    except (OSError, ValueError):
        return "unreadable"
    if not isinstance(seal, dict):
        return "unreadable"
    if seal.get("kind") != KIND:
        return f"kind {seal.get('kind')!r}, not {KIND!r}"
    if seal.get("binding") != BINDING_VERSION:
        return "written by another version"
    if seal.get("key") != key:
        return "computed from other inputs"
    if seal.get("bound") != json.loads(json.dumps(dict(bound), sort_keys=True)):
        return "bound to other inputs"
    if seal.get("size") != len(data):
        return "truncated or grown"
    if seal.get("sha256") != seal_of(data, key=key, bound=bound):
        return "checksum mismatch"
    return data


def write_graph(store: ContentStore, key: str, bound: Mapping[str, object], data: bytes) -> None:
    """Put ``data`` (a checked graph) in the cache under ``key``, atomically (folder rename)."""
    folder = graph_dir(store, key)
    seal = {
        "binding": BINDING_VERSION,
        "kind": KIND,
        "key": key,
        "bound": json.loads(json.dumps(dict(bound), sort_keys=True)),
        "size": len(data),
        "sha256": seal_of(data, key=key, bound=bound),
    }
    stamp = f"{os.getpid()}-{time.time_ns()}"
    staging = folder.parent / f"{TMP_PREFIX}{KIND}-{stamp}"
    try:
        staging.mkdir(parents=True)
        atomic_write_bytes(staging / GRAPH, data)
        atomic_write_bytes(staging / SEAL, (json.dumps(seal, sort_keys=True, indent=1) + "\n").encode())
        if folder.exists() or folder.is_symlink():
            trash = folder.parent / f"{TMP_PREFIX}{KIND}old-{stamp}"
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(folder)
    except OSError as exc:  # a cache that cannot be written: the next run exports again
        log.warning("onnx cache %s not written (%s)", key[:12], exc.strerror or exc)
    finally:
        if staging.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(staging)


__all__ = ["BINDING_VERSION", "GRAPH", "KIND", "SEAL", "graph_dir", "graph_key", "read_graph", "write_graph"]
