"""Callbacks a training run makes on the main process (progress bars are the caller's business).

Kept free of torch so the CLI can subclass it without paying for the import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class TrainEvents:
    """The default does nothing."""

    def phase(self, description: str, total: int) -> Callable[[int], None]:
        """A preparation phase (e.g. computing base states); returns an advance(n) callback."""
        return lambda _n: None

    def message(self, text: str) -> None:
        """A line of information (data sizes, cache hits, resume point)."""

    def start(self, total_steps: int, start_step: int) -> None:
        """Training steps begin."""

    def step(self, record: dict[str, Any]) -> None:
        """One optimizer step done (its ``train`` record)."""

    def evaluated(self, record: dict[str, Any]) -> None:
        """An evaluation done (its ``eval`` record)."""

    def warning(self, record: dict[str, Any]) -> None:
        """A quality check fired."""

    def checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint was written."""
