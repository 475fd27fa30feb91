"""Every error of the package. Each one a user can cause is a ScalerError whose str() is one line.

Errors carry *fields*: keyword-only attributes naming what went wrong, for callers that
react to an error rather than print it::

    try:
        compose(store, "demo")
    except ModelNotFoundError as exc:
        print(exc.name, exc.available)

A field the raise site did not know is None (or an empty tuple). The message is the same
one line as ever: fields add to it, never replace it. Part of the kernel: stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def _path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


class ScalerError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits 1."""


class StoreError(ScalerError):
    """The bank store is missing, locked, or inconsistent."""


class BankNotFoundError(StoreError):
    """A bank named in a manifest is not in the store.

    ``bank``: the missing bank's name (``sha256:<hex>``).
    """

    def __init__(self, message: str, *, bank: str | None = None) -> None:
        super().__init__(message)
        self.bank = bank


class IntegrityError(StoreError):
    """A bank's bytes do not hash to its name: tampered or corrupt.

    ``bank``: the bank's name; ``path``: the file (or folder) that failed.
    """

    def __init__(
        self, message: str, *, bank: str | None = None, path: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__(message)
        self.bank = bank
        self.path = _path(path)


class ManifestError(ScalerError):
    """A manifest failed validation; the message names the field.

    ``field``: the JSON path of the bad field (``branches.spam.labels[0]``), ``(top level)``
    for the whole document.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PluginError(ScalerError):
    """A plugin is missing, broken, duplicated, or misconfigured.

    ``plugin``: the plugin's name as the message gives it: a registered name (``topk``) or
    the name a plugin was loaded under (an entry point, ``scaler_wizard.plugins.gating``).
    """

    def __init__(self, message: str, *, plugin: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class ModelNotFoundError(ScalerError):
    """No model (ref) of that name in the store.

    ``name``: the name asked for; ``available``: the models the store has.
    """

    def __init__(self, message: str, *, name: str | None = None, available: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.name = name
        self.available = tuple(sorted(available))


class BranchNotFoundError(ScalerError):
    """No branch of that name in the model.

    ``branch``: the name asked for; ``model``: the model (or version) searched;
    ``available``: the branches it has.
    """

    def __init__(
        self,
        message: str,
        *,
        branch: str | None = None,
        model: str | None = None,
        available: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.branch = branch
        self.model = model
        self.available = tuple(sorted(available))


class ConflictError(ScalerError):
    """The model moved on while this change was being made (another writer).

    ``model``: the model whose ref could not move.
    """

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class DataError(ScalerError):
    """Input data is unusable (missing column, one class, blank labels...).

    ``path``: the data file, when the problem is in one.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = _path(path)


class CheckpointError(ScalerError):
    """A checkpoint is missing, incomplete or does not fit the run.

    ``path``: the checkpoint folder.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = _path(path)


class TrainConfigError(ScalerError):
    """A bad training option or config file (names the field).

    ``field``: the option or config key at fault (``lr``, ``branches.spam``).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class HubError(ScalerError):
    """The Hub refused or failed a request (one line, never the token).

    ``repo``: the Hub repo id; ``revision``: the revision asked for, if any.
    """

    def __init__(self, message: str, *, repo: str | None = None, revision: str | None = None) -> None:
        super().__init__(message)
        self.repo = repo
        self.revision = revision


class RowBranchesError(ScalerError, ValueError):
    """``row_branches`` does not fit the batch (wrong length, a row with no branch)."""


class QueueFullError(ScalerError):
    """The serving request queue is full (HTTP 429)."""


class BatcherClosedError(ScalerError):
    """The batcher takes no more jobs (its version was swapped out, or the server stops)."""


class RequestError(ScalerError):
    """An HTTP request the server answers with a 4xx/5xx and a one-line message.

    ``status``: the HTTP status; ``headers``: extra response headers (``Retry-After``...).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ExportError(ScalerError):
    """An export that cannot be made (a branch that cannot be stock PEFT, a DEST in the way)."""


class TeacherError(ScalerError):
    """A teacher that cannot be used: not a safetensors encoder folder, a bad layer, no such teacher.

    ``teacher``: the teacher's name in the model (or the ``--model`` given); ``model``: the model.
    """

    def __init__(self, message: str, *, teacher: str | None = None, model: str | None = None) -> None:
        super().__init__(message)
        self.teacher = teacher
        self.model = model


class FeatureBankMismatchError(TeacherError):
    """A teacher's feature bank does not match what is asked (other teacher, data, layer...) or is damaged.

    ``bank``: the feature bank; ``field``: what differs (``teacher``, ``data``, ``layer``...).
    """

    def __init__(
        self,
        message: str,
        *,
        teacher: str | None = None,
        model: str | None = None,
        bank: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, teacher=teacher, model=model)
        self.bank = bank
        self.field = field


class DistillError(TeacherError):
    """A ``scaler distill`` run that cannot be made: unknown or featureless teachers, teachers on
    other texts, stale branches, a run folder that does not match (``teacher``, ``model``)."""


class GrowthError(ScalerError):
    """An expansion (``scaler expand``), pruning (``scaler experts prune``) or consolidation
    (``scaler consolidate``) refused: the operator does not apply to this model, or it
    would change what the model computes; nothing was stored.

    ``operator``: ``add-experts``, ``add-layer``, ``widen``, ``prune`` or ``consolidate``;
    ``max_delta``: the measured max |delta logits| over the probe set when that check refused
    (None otherwise)."""

    def __init__(self, message: str, *, operator: str | None = None, max_delta: float | None = None) -> None:
        super().__init__(message)
        self.operator = operator
        self.max_delta = max_delta


class ManifestMismatchError(ScalerError):
    """A worker (``scaler predict --engine ray``) would compose another manifest than the one
    pinned at submit time: its store lacks that manifest, or holds other bytes under its hash.

    ``expected``: the manifest hash pinned at submit; ``found``: what the worker read there
    (None when its store has no such manifest)."""

    def __init__(self, message: str, *, expected: str | None = None, found: str | None = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


def did_you_mean(name: str, existing: list[str] | tuple[str, ...] | set[str]) -> str:
    """A short suffix listing what exists, for not-found messages."""
    names = sorted(existing)
    if not names:
        return "(there are none)"
    return "(have: " + ", ".join(names) + ")"


__all__ = [
    "BatcherClosedError",
    "ExportError",
    "QueueFullError",
    "RequestError",
    "RowBranchesError",
    "BankNotFoundError",
    "BranchNotFoundError",
    "CheckpointError",
    "ConflictError",
    "DataError",
    "DistillError",
    "FeatureBankMismatchError",
    "GrowthError",
    "HubError",
    "IntegrityError",
    "ManifestError",
    "ManifestMismatchError",
    "ModelNotFoundError",
    "PluginError",
    "ScalerError",
    "StoreError",
    "TeacherError",
    "TrainConfigError",
    "did_you_mean",
]
