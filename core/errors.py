"""Exceptions. Every error a user can cause is a ScalerError whose str() is one line."""

from __future__ import annotations


class ScalerError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits 1."""


class StoreError(ScalerError):
    """The bank store is missing, locked, or inconsistent."""


class BankNotFoundError(StoreError):
    """A bank named in a manifest is not in the store."""


class IntegrityError(StoreError):
    """A bank's bytes do not hash to its name: tampered or corrupt."""


class ManifestError(ScalerError):
    """A manifest failed validation; the message names the field."""


class PluginError(ScalerError):
    """A plugin is missing, broken, duplicated, or misconfigured."""


class ModelNotFoundError(ScalerError):
    """No model (ref) of that name in the store."""


class BranchNotFoundError(ScalerError):
    """No branch of that name in the model."""


class ConflictError(ScalerError):
    """The model moved on while this change was being made (another writer)."""


class DataError(ScalerError):
    """Input data is unusable (missing column, one class, blank labels...)."""


def did_you_mean(name: str, existing: list[str] | tuple[str, ...] | set[str]) -> str:
    """A short suffix listing what exists, for not-found messages."""
    names = sorted(existing)
    if not names:
        return "(there are none)"
    return "(have: " + ", ".join(names) + ")"
