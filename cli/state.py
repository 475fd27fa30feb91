"""Options shared by every command (store location, debug) and output helpers."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console


@dataclass
class State:
    store: str | Path | None = None
    debug: bool = False


STATE = State()
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def open_store(create: bool = False) -> Any:
    from scaler_wizard.banks import ContentStore

    return ContentStore.open(STATE.store, create=create)


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: bare ``NaN`` is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    """Strict JSON on stdout (non-finite numbers become null)."""
    text = json.dumps(finite_json(obj), indent=2, ensure_ascii=False, default=str, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
