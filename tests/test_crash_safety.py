"""A writer killed with SIGKILL at any moment of saving a version leaves a loadable store.

A real subprocess composes ``demo``, changes weights and calls ``save_version`` in a loop;
it is killed at several moments (right after composing, then at fractions of the duration of
a save, measured on the save before it, so that the kills spread over a save whatever the
machine's speed), each time on the store the previous killed writer left. After every kill the store must open at a
version that validates, composes and verifies, which is the version the writer started from or
one it finished; leftover ``.tmp-*`` files may exist but are never taken for store content.
Finally a writer runs to completion on that store.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.atomic import TMP_PREFIX
from scaler_wizard.manifests import validate_manifest
from scaler_wizard.modeling.compose import compose
from scaler_wizard.modeling.verify import verify_version
from scaler_wizard.versions.history import history

WRITER = textwrap.dedent(
    """
    import os, sys
    import torch
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, save_version

    store = ContentStore.open(sys.argv[1])
    model = compose(store, "demo")
    spam = model.branch("spam")
    torch.manual_seed(os.getpid())
    print("ready", store.resolve("demo"), flush=True)
    for i in range(int(sys.argv[2])):
        with torch.no_grad():
            for p in [*model.trunk.layers[0].parameters(), *spam.parameters()]:
                p.add_(torch.randn_like(p) * 1e-3)
        print("saving", i, flush=True)
        h = save_version(store, model, message=f"writer {os.getpid()} step {i}")
        print("saved", h, flush=True)
    print("done", flush=True)
    """
)

#: when to kill: None = as soon as the writer has composed; f = f x (the duration of its
#: first save) into its second save
KILL_AT = [None, 0.1, 0.35, 0.6, 0.85]


class Writer:
    """The writer subprocess and the lines it printed."""

    def __init__(self, script: Path, root: Path, steps: int, log: Path) -> None:
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(root), str(steps)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: list[str] = []
        self.started_from = self.expect("ready sha256:")[0].split()[1]

    def expect(self, prefix: str) -> tuple[str, float]:
        """Read the next line (it must start with ``prefix``) and when it arrived."""
        watchdog = threading.Timer(240, self.proc.kill)
        watchdog.start()
        try:
            line = self.proc.stdout.readline().rstrip("\n") if self.proc.stdout else ""
        finally:
            watchdog.cancel()
        assert line.startswith(prefix), (prefix, line, self.log.read_text())
        self.lines.append(line)
        return line, time.monotonic()

    def finish(self, *, kill: bool) -> list[str]:
        """Kill it (or let it end); the manifests it printed as saved."""
        if kill:
            self.proc.send_signal(signal.SIGKILL)
        out, _ = self.proc.communicate(timeout=240)
        self.lines += out.splitlines()
        assert self.proc.returncode == (-signal.SIGKILL if kill else 0), self.log.read_text()
        return [line.split()[1] for line in self.lines if line.startswith("saved ")]


class Checker:
    """Everything a store left by a killed writer must satisfy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hashed: set[str] = set()  # objects already re-hashed in an earlier round

    def check(self, started_from: str, saved: list[str]) -> BankHash:
        store = ContentStore.open(self.root)
        head = store.resolve("demo")
        m = validate_manifest(store.get_manifest(head))
        if head not in (started_from, *saved):
            # Killed after the ref moved, before the writer printed it: the save in flight,
            # complete (the ref moves last) and the child of the last one printed.
            last = saved[-1] if saved else started_from
            assert m["parent"] == last, (head, m["parent"], last)
            assert m["version"] == store.get_manifest(last)["version"] + 1
        assert [c for c in verify_version(store, head) if not c.ok] == []
        assert [mm["version"] for _, mm in history(store, head)] == list(range(m["version"], 0, -1))
        model = compose(store, "demo")
        model.load_all_branches()
        assert sorted(model.branch_names) == ["spam", "topic"]

        log = store.reflog("demo")
        # the log line is written before the ref moves: at most one line ahead of the ref
        assert log[-1]["new"] == head or (log[-1]["old"] == head and store.has_manifest(log[-1]["new"]))

        # leftovers are allowed, but nothing that is listed as content is a leftover or partial
        assert store.models() == ["demo"]
        for h in store.iter_manifests():
            store.get_manifest(h)  # whole: its bytes hash to its name
        for h in store.iter_objects():
            assert TMP_PREFIX not in store.object_path(h).name
            if h not in self.hashed:
                store.verified_path(h, trust_cache=False)
                self.hashed.add(h)
        return head


@pytest.mark.slow
def test_sigkill_while_saving_leaves_the_previous_version(store: ContentStore, tmp_path: Path) -> None:
    script, log = tmp_path / "writer.py", tmp_path / "writer.err"
    script.write_text(WRITER)
    checker = Checker(store.root)
    head = store.resolve("demo")
    killed_mid_save = 0
    for fraction in KILL_AT:
        writer = Writer(script, store.root, 1000, log)
        assert writer.started_from == head
        if fraction is not None:
            t0 = writer.expect("saving 0")[1]
            t1 = writer.expect("saved sha256:")[1]
            writer.expect("saving 1")
            time.sleep(fraction * (t1 - t0))
        saved = writer.finish(kill=True)
        killed_mid_save += writer.lines[-1].startswith("saving ")
        head = checker.check(writer.started_from, saved)
    assert killed_mid_save >= 2, "the kills did not land inside save_version"

    # a writer on the store the killed ones left runs to completion (the lock died with them)
    writer = Writer(script, store.root, 2, log)
    saved = writer.finish(kill=False)
    assert writer.started_from == head and len(saved) == 2 and writer.lines[-1] == "done"
    assert checker.check(writer.started_from, saved) == saved[-1]
    final = ContentStore.open(store.root)
    with final.lock(timeout=10):
        final.clean_temp()
    assert not [p for p in store.root.rglob(f"{TMP_PREFIX}*")]
    assert checker.check(saved[-1], []) == saved[-1]
