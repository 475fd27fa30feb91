"""Derived-cache files bound to the key they were computed from.

A cache file (trunk features, base states) is named by a hash of its inputs, but a name is
only a claim: a file copied over another's name, damaged on disk, or written by something
else must never be used. So every file carries, inside its safetensors metadata, the key it
was computed from and the facts a reader can check (kind, key, row count, dtype, shapes,
anything else the writer binds) plus a checksum of its tensors. A reader accepts the file
only when *all* of that matches what it expects and every floating tensor is finite;
anything else is a miss (logged once as a warning) and the caller recomputes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from scaler_wizard.banks.atomic import atomic_writer
from scaler_wizard.banks.safetensors_bank import encode_bank, load_bank_tensors, read_bank_metadata
from scaler_wizard.errors import ScalerError

log = logging.getLogger(__name__)

#: Bumped when the binding changes: older files are then misses, never misread.
BINDING_VERSION = "2"


def tensors_checksum(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the tensors' bytes, in name order (their names, dtypes and shapes are
    bound separately, in the ``tensors`` metadata)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def write_bound(
    path: Path, tensors: Mapping[str, Tensor], *, kind: str, key: str, bound: Mapping[str, object]
) -> None:
    """Write a cache file bound to ``key`` and ``bound`` (failing to write a cache is not fatal)."""
    meta: dict[str, object] = {
        "binding": BINDING_VERSION,
        "key": key,
        "tensors": {n: [str(t.dtype), list(t.shape)] for n, t in sorted(tensors.items())},
        "sha256": tensors_checksum(tensors),
        **bound,
    }
    bank = encode_bank(dict(tensors), kind=kind, metadata=meta)
    with contextlib.suppress(OSError), atomic_writer(path) as fh:
        fh.write(bank.data)


def read_bound(
    path: Path,
    *,
    kind: str,
    key: str,
    bound: Mapping[str, object],
    expect: Mapping[str, tuple[torch.dtype, tuple[int | None, ...]]],
) -> dict[str, Tensor] | None:
    """The file's tensors if everything about it matches, else None (a miss: recompute).

    ``expect`` gives each tensor's dtype and shape (``None`` for a size the reader cannot
    know in advance); no other tensor may be in the file.
    """
    if not path.is_file():
        return None
    why = _mismatch(path, kind=kind, key=key, bound=bound, expect=expect)
    if isinstance(why, str):
        log.warning("cache file %s not used (%s): recomputing", path.name, why)
        return None
    return why


def _mismatch(
    path: Path,
    *,
    kind: str,
    key: str,
    bound: Mapping[str, object],
    expect: Mapping[str, tuple[torch.dtype, tuple[int | None, ...]]],
) -> dict[str, Tensor] | str:
    try:
        meta = read_bank_metadata(path)
        tensors = load_bank_tensors(path)
    except ScalerError:
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
    if meta.get("scaler.sha256") != tensors_checksum(tensors):
        return "checksum mismatch"
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} is not finite"
    return tensors


def require_finite(tensor: Tensor, what: str) -> None:
    """Raise a one-line ScalerError if ``tensor`` holds a NaN or an infinity."""
    bad = int((~torch.isfinite(tensor.detach())).sum())
    if bad:
        raise ScalerError(
            f"{what}: {bad} of {tensor.numel()} values are not finite (NaN or infinite); nothing saved"
        )
