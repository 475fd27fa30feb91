"""The runtime's history API (scaler_wizard.versions.history): Version, log, resolve, rollback,
and the part rule that made it: the byte store's Hub transport knows nothing of versions."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import run_scaler

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.store import canonical_json
from scaler_wizard.errors import ModelNotFoundError, ScalerError
from scaler_wizard.versions.history import Version, log, resolve, rollback


def _twin(manifest: dict[str, Any], h: BankHash) -> dict[str, Any]:
    """A copy of ``manifest`` (another message) whose hash shares its first 4 hex digits with ``h``."""
    for i in range(4_000_000):
        twin = dict(manifest, message=f"twin {i}")
        if BankHash.of_bytes(canonical_json(twin)).hex[:4] == h.hex[:4]:
            return twin
    raise AssertionError("no twin found")


def test_log_lists_versions_newest_first_with_their_fields(store: ContentStore) -> None:
    versions = log(store, "demo")
    assert [v.number for v in versions] == [2, 1]
    v2, v1 = versions
    assert v2.hash == store.resolve("demo") and v2.parent == v1.hash and v1.parent is None
    assert v2.branches == ("spam", "topic") and v1.branches == ()
    for v in versions:
        m = store.get_manifest(v.hash)
        assert (v.name, v.message, v.created, v.manifest) == ("demo", m["message"], m["created"], m)
        assert v.short == v.hash.short and BankHash.of_bytes(canonical_json(v.manifest)) == v.hash
    assert [v.number for v in log(store, "demo@1")] == [1]  # from any version back
    assert isinstance(v2, Version) and Version.load(store, v2.hash) == v2
    with pytest.raises(dataclasses.FrozenInstanceError):
        v2.number = 3  # type: ignore[misc]


@pytest.mark.slow
def test_log_is_what_scaler_history_prints(store: ContentStore, scaler_env: dict[str, str]) -> None:
    proc = run_scaler("history", "demo", "--json", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [v.summary() for v in log(store, "demo")]


def test_resolve_by_name_number_prefix_and_hash(store: ContentStore) -> None:
    v2, v1 = log(store, "demo")
    assert resolve(store, "demo") == v2
    assert resolve(store, "demo@1") == v1 and resolve(store, "demo@v2") == v2
    assert resolve(store, f"demo@{v1.short.removeprefix('sha256:')}") == v1  # as `history` shows it
    assert resolve(store, f"demo@sha256:{v1.hash.hex[:6]}") == v1
    by_hash = resolve(store, str(v1.hash))
    assert by_hash == v1 and by_hash.name == "demo"
    with store.lock():  # another name for v1: the version is named as it was asked for
        store.set_ref("copy", v1.hash, expected=None, reason="test")
    assert resolve(store, "copy@1").name == "copy" and resolve(store, "copy@1").manifest["name"] == "demo"


def test_resolve_refuses_unknown_and_ambiguous_versions_in_one_line(store: ContentStore) -> None:
    v2, _v1 = log(store, "demo")
    with pytest.raises(ScalerError, match=r"model 'demo' has no version '7' \(have: 1, 2\)") as info:
        resolve(store, "demo@7")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelNotFoundError, match="no model named 'dmeo'"):
        resolve(store, "dmeo")
    with store.lock():  # a second version whose hash starts like v2's
        t = store.put_manifest(_twin(v2.manifest, v2.hash))
        store.set_ref("demo", t, expected=v2.hash, reason="a twin of v2")
    assert t != v2.hash and t.hex[:4] == v2.hash.hex[:4]
    with pytest.raises(ScalerError, match=r"version '.{4}' of 'demo' is ambiguous: ") as info:
        resolve(store, f"demo@{t.hex[:4]}")
    message = str(info.value)
    assert "\n" not in message and v2.short in message and BankHash(t).short in message
    assert resolve(store, f"demo@{t.hex[:12]}").hash == t  # a longer prefix is unique


def test_rollback_moves_the_ref_and_keeps_the_reflog(store: ContentStore) -> None:
    v2, v1 = log(store, "demo")
    before = store.reflog("demo")
    assert rollback(store, "demo", "1") == v1.hash
    assert resolve(store, "demo") == v1 and log(store, "demo") == [v1]
    after = store.reflog("demo")
    assert after[: len(before)] == before  # the old moves are kept
    assert [(e["old"], e["new"], e["reason"]) for e in after[len(before) :]] == [
        (v2.hash, v1.hash, "rollback to 1")
    ]
    assert resolve(store, "demo@2") == v2  # the reflog still names it
    assert rollback(store, "demo", "v2") == v2.hash and resolve(store, "demo") == v2
    assert rollback(store, "demo", "2") == v2.hash  # already there: no move
    assert len(store.reflog("demo")) == len(before) + 2
    assert store.get_manifest(v1.hash) and store.get_manifest(v2.hash)  # nothing deleted
    with pytest.raises(ModelNotFoundError):
        rollback(store, "nope", "1")


def test_the_hub_transport_imports_no_runtime() -> None:
    """banks/hub.py is bytes: importing it loads nothing of the runtime or the CLI, and not even
    the Hub client (imported when a call needs it)."""
    code = (
        "import sys, scaler_wizard.banks.hub\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['scaler_wizard', 'versions'], ['scaler_wizard', 'remote'], "
        "['scaler_wizard', 'modeling'], ['scaler_wizard', 'training'], ['scaler_wizard', 'cli']) "
        "or m == 'huggingface_hub')\n"
        "print(bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
