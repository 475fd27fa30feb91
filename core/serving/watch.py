"""``scaler serve --watch``: when the model's ref moves, compose the new version in the
background and swap it in atomically; requests already queued finish on the old one."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from scaler_wizard.banks import ContentStore
from scaler_wizard.serving.app import Live, Served
from scaler_wizard.versions.history import resolve_version


class Watcher:
    def __init__(
        self,
        store: ContentStore,
        name: str,
        live: Live,
        make: Callable[[str], Served],
        *,
        interval_s: float = 2.0,
    ) -> None:
        """``make(name)`` composes the model's current version and wraps it (not started)."""
        self.store = store
        self.name = name
        self.live = live
        self.make = make
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scaler-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def check(self) -> bool:
        """Swap in the ref's version if it moved; whether it did."""
        _, h = resolve_version(self.store, self.name)
        if str(h) == self.live.current.version:
            return False
        new = self.make(self.name)
        if new.version == self.live.current.version:
            return False
        old = self.live.swap(new)
        old.batcher.close()
        print(f"switched {self.name} {old.version} -> {new.version}", file=sys.stderr, flush=True)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # keep serving the current version
                line = f"{exc}".splitlines()[0] if str(exc) else type(exc).__name__
                print(
                    f"watch: cannot load the new version of {self.name}: {line}", file=sys.stderr, flush=True
                )
