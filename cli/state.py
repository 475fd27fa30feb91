"""Options shared by every command (store location, debug) and output helpers."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console


@dataclass
class State:
    store: Path | None = None
    debug: bool = False


STATE = State()
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def open_store(create: bool = False) -> Any:
    from scaler_wizard.banks import ContentStore

    return ContentStore.open(STATE.store, create=create)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()
