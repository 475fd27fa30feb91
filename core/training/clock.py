"""Timestamps a training run records: one home for the package's clock formats."""

from __future__ import annotations

import datetime as dt

from scaler_wizard.versions.builder import rfc3339


def utc_now_iso() -> str:
    """Now, in UTC, to the second: ``2026-01-31T12:00:00Z`` (the manifests' format, ``rfc3339``)."""
    return rfc3339()


def utc_stamp() -> str:
    """Now, in UTC, as a folder-name stamp: ``20260131T120000Z`` (run and log folders)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
