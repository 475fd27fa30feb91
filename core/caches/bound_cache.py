"""The derived caches' one integrity rule (issue 11 item 5), for every kind of cache file.

The store keeps three derived caches, one folder each, placed by
``ContentStore.cache_path(kind, key)``: ``features`` (the trunk's pooled output, for
``branch add``), ``tokens`` (the trunk's token states, for token-reading strategies) and
``base-states`` (the frozen base's token states, for ``scaler train``). A file is named by a
hash of its inputs (its *key*), but a name is only a claim: a file copied over another's name,
damaged on disk, truncated by a full disk, or written by something else must never be used.

So every cache file, whatever its kind, is one safetensors file written atomically (temp file
and rename: a reader sees the old file or the new one, never half of one) that carries in its
metadata the binding version, its kind, its key, the inputs it is bound to (trunk or base, row
count, dtype, max length, ...), every tensor's dtype and shape, and a sha256 *seal* over all of
that and the tensors' bytes. It is read through :func:`read_cache` only, which returns the
tensors when everything matches what the caller expects, and None (a miss: recompute) when the
file is missing, unreadable or truncated, of another kind or binding version, computed from
another key or other inputs, holds other tensors or other dtypes or shapes, does not match its
seal (a flipped byte, or a header that lies about what follows it), holds a NaN or an infinity,
or fails the kind's own structural check (offsets that do not cut the flat states into the
examples). :func:`cached` computes on a miss, writes the result over the file and reads it
back, so a run that computed the values and one that found them use the very same numbers.

Files written before binding version 3 (whose checksum covered the tensors' bytes only, not
their names, dtypes, shapes or key), including every cache file already on users' disks from
earlier releases, are simply misses: recomputed and overwritten, never trusted, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.atomic import atomic_writer
from scaler_wizard.banks.safetensors_bank import read_bank_metadata
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.tensor_banks import encode_bank, load_bank_tensors

log = logging.getLogger(__name__)

#: Bumped when the binding changes: older files are then misses, never misread.
BINDING_VERSION = "3"

#: Each tensor's dtype and shape (``None`` for a size the reader cannot know in advance).
Expect = Mapping[str, tuple[torch.dtype, tuple[int | None, ...]]]


@dataclass(frozen=True)
class Ragged:
    """``offsets`` (n + 1, int64) cuts ``flat`` (total, d) into n examples: example ``i`` is
    ``flat[offsets[i]:offsets[i + 1]]``, of ``min_rows``..``max_rows`` rows."""

    offsets: str
    flat: str
    min_rows: int = 0
    max_rows: int | None = None

    def holds(self, tensors: Mapping[str, Tensor]) -> bool:
        offsets, flat = tensors[self.offsets], tensors[self.flat]
        if offsets.numel() == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != int(flat.shape[0]):
            return False
        steps = offsets[1:] - offsets[:-1]
        if bool((steps < self.min_rows).any()):
            return False
        return self.max_rows is None or not bool((steps > self.max_rows).any())


@dataclass(frozen=True)
class CacheSpec:
    """What one cache file must be: its store ``kind``, its ``key`` (hex digest of the inputs),
    the inputs it is ``bound`` to, the tensors it holds (``expect``) and, for variable-length
    examples, how their offsets cut the flat tensor (``ragged``)."""

    kind: str
    key: str
    bound: Mapping[str, object]
    expect: Expect
    ragged: Ragged | None = None

    def path(self, store: ContentStore) -> Path:
        return store.cache_path(self.kind, self.key)


def read_cache(store: ContentStore, spec: CacheSpec) -> dict[str, Tensor] | None:
    """The cache file's tensors (memory-mapped) if everything about it is what ``spec`` says,
    else None: missing, damaged, from another key or inputs, non-finite or mis-shaped."""
    path = spec.path(store)
    tensors = read_bound(path, kind=spec.kind, key=spec.key, bound=spec.bound, expect=spec.expect)
    if tensors is not None and spec.ragged is not None and not spec.ragged.holds(tensors):
        log.warning("cache file %s not used (offsets do not cut its states): recomputing", path.name)
        return None
    return tensors


def cached(
    store: ContentStore,
    spec: CacheSpec,
    compute: Callable[[], Mapping[str, Tensor]],
    *,
    write: bool = True,
    reopen: bool = True,
) -> tuple[dict[str, Tensor], bool]:
    """(tensors, came from the cache). On a miss, ``compute()`` (which refuses non-finite
    values with its own message), then, with ``write``, the fresh tensors overwrite the file;
    with ``reopen`` they are read back from it (memory-mapped, so the fresh copy can be freed,
    and the very bytes a later hit gives), or are the fresh tensors if the write failed."""
    found = read_cache(store, spec)
    if found is not None:
        return found, True
    fresh = dict(compute())
    if not write:
        return fresh, False
    write_bound(spec.path(store), fresh, kind=spec.kind, key=spec.key, bound=spec.bound)
    again = read_cache(store, spec) if reopen else None
    return (fresh if again is None else again), False


# -- the file format: path-level primitives ---------------------------------------------------


def tensors_checksum(tensors: Mapping[str, Tensor], header: Mapping[str, object] | None = None) -> str:
    """The seal: sha256 over ``header`` (binding, kind, key, bound inputs; canonical JSON),
    then each tensor in name order as its name, dtype and shape followed by its bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dict(header or {}), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\n")
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def _header(kind: str, key: str, bound: Mapping[str, object]) -> dict[str, object]:
    return {"binding": BINDING_VERSION, "kind": kind, "key": key, "bound": dict(bound)}


def write_bound(
    path: Path, tensors: Mapping[str, Tensor], *, kind: str, key: str, bound: Mapping[str, object]
) -> None:
    """Write a cache file bound to ``key`` and ``bound``, atomically (a cache that cannot be
    written is not fatal: the next run recomputes it)."""
    meta: dict[str, object] = {
        "binding": BINDING_VERSION,
        "key": key,
        "tensors": {n: [str(t.dtype), list(t.shape)] for n, t in sorted(tensors.items())},
        "sha256": tensors_checksum(tensors, _header(kind, key, bound)),
        **bound,
    }
    bank = encode_bank(dict(tensors), kind=kind, metadata=meta)
    with contextlib.suppress(OSError), atomic_writer(path) as fh:
        fh.write(bank.data)


def read_bound(
    path: Path, *, kind: str, key: str, bound: Mapping[str, object], expect: Expect
) -> dict[str, Tensor] | None:
    """The file's tensors if everything about it matches, else None (a miss: recompute).

    ``expect`` gives each tensor's dtype and shape; no other tensor may be in the file.
    """
    if not path.is_file():
        return None
    why = _mismatch(path, kind=kind, key=key, bound=bound, expect=expect)
    if isinstance(why, str):
        log.warning("cache file %s not used (%s): recomputing", path.name, why)
        return None
    return why


def _mismatch(
    path: Path, *, kind: str, key: str, bound: Mapping[str, object], expect: Expect
) -> dict[str, Tensor] | str:
    try:
        meta = read_bank_metadata(path)
        tensors = load_bank_tensors(path)
    except Exception:  # whatever a damaged file makes the reader raise, it is a miss
        return "unreadable"
    if meta.get("scaler.kind") != kind:
        return f"kind {meta.get('scaler.kind')!r}, not {kind!r}"
    if meta.get("scaler.binding") != BINDING_VERSION:
        return "written by another version"
    if meta.get("scaler.key") != key:
        return "computed from other inputs"
    for name, value in bound.items():
        want = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if meta.get(f"scaler.{name}") != want:
            return f"{name} differs"
    if set(tensors) != set(expect):
        return "unexpected tensors"
    for name, (dtype, shape) in expect.items():
        t = tensors[name]
        if t.dtype != dtype:
            return f"{name} is {t.dtype}, not {dtype}"
        if t.dim() != len(shape) or any(
            w is not None and w != s for w, s in zip(shape, t.shape, strict=True)
        ):
            return f"{name} has shape {tuple(t.shape)}"
    shapes = {n: [str(t.dtype), list(t.shape)] for n, t in sorted(tensors.items())}
    if meta.get("scaler.tensors") != json.dumps(shapes, sort_keys=True):
        return "tensor shapes differ from the recorded ones"
    if meta.get("scaler.sha256") != tensors_checksum(tensors, _header(kind, key, bound)):
        return "checksum mismatch"
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} is not finite"
    return tensors


_Part = TypeVar("_Part")


def over_shards(
    texts: Sequence[str], shard_rows: int, one_shard: Callable[[Sequence[str]], tuple[_Part, bool]]
) -> tuple[list[_Part], bool]:
    """Cache ``texts`` shard by shard (``shard_rows`` each; an empty list is one empty shard),
    each shard its own bound file, so a killed run keeps the shards it finished: the parts,
    and whether every one came from its cache."""
    parts: list[_Part] = []
    all_cached = True
    for start in range(0, max(1, len(texts)), shard_rows):
        part, hit = one_shard(texts[start : start + shard_rows])
        parts.append(part)
        all_cached = all_cached and hit
    return parts, all_cached


def require_finite(tensor: Tensor, what: str) -> None:
    """Raise a one-line ScalerError if ``tensor`` holds a NaN or an infinity."""
    bad = int((~torch.isfinite(tensor.detach())).sum())
    if bad:
        raise ScalerError(
            f"{what}: {bad} of {tensor.numel()} values are not finite (NaN or infinite); nothing saved"
        )
