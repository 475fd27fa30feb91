"""The content-addressed store: objects, manifests, refs, reflog, versions, locking, conflicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_scaler, tamper_object

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.atomic import TMP_PREFIX
from scaler_wizard.banks.store import canonical_json, validate_name
from scaler_wizard.errors import (
    ConflictError,
    IntegrityError,
    ManifestError,
    ModelNotFoundError,
    ScalerError,
    StoreError,
)
from scaler_wizard.modeling.compose import compose, init_model, save_version
from scaler_wizard.modeling.verify import verify_version
from scaler_wizard.versions.history import find_version, history, resolve_version, rollback


def versions(store: ContentStore) -> dict[int, BankHash]:
    """version number -> manifest hash along demo's history."""
    return {m["version"]: h for h, m in history(store, store.resolve("demo"))}


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- objects ----------------------------------------------------------------------------------


def test_put_bytes_dedups_and_writes_once(empty_store: ContentStore) -> None:
    data = b"the same bytes" * 100
    h = empty_store.put_bytes(data)
    assert h == BankHash.of_bytes(data) and empty_store.has(h)
    path = empty_store.object_path(h)
    assert path.parent.name == h.hex[:2] and path.name == h.hex[2:]
    before = path.stat()
    assert empty_store.put_bytes(data) == h
    assert empty_store.put_bytes(memoryview(data)) == h
    src = empty_store.root.parent / "src.bin"
    src.write_bytes(data)
    assert empty_store.put_file(src) == h
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert list(empty_store.iter_objects()) == [h]
    assert empty_store.read_bytes(h) == data == empty_store.read_bytes(h, trust_cache=False)
    assert not [p for p in empty_store.root.rglob(f"{TMP_PREFIX}*")]


def test_put_refuses_bytes_that_are_not_what_was_expected(empty_store: ContentStore, tmp_path: Path) -> None:
    wanted = BankHash.of_bytes(b"good")
    with pytest.raises(IntegrityError, match="refusing bank"):
        empty_store.put_bytes(b"evil", expected=wanted)
    (tmp_path / "f").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match="refusing f"):
        empty_store.put_file(tmp_path / "f", expected=wanted)
    assert list(empty_store.iter_objects()) == []
    assert not [p for p in empty_store.root.rglob(f"{TMP_PREFIX}*")]


def test_objects_and_manifests_are_read_only(store: ContentStore) -> None:
    objects = list(store.iter_objects())
    manifests = list(store.iter_manifests())
    assert len(objects) >= 10 and len(manifests) == 2
    for path in [store.object_path(h) for h in objects] + [store.manifest_path(h) for h in manifests]:
        assert path.stat().st_mode & 0o222 == 0, path


def test_a_corrupt_object_is_healed_by_putting_the_good_bytes(empty_store: ContentStore) -> None:
    data = bytes(range(256)) * 4
    h = empty_store.put_bytes(data)
    tamper_object(empty_store.object_path(h))
    with pytest.raises(IntegrityError, match=h):
        empty_store.verified_path(h, trust_cache=False)
    assert empty_store.put_bytes(data) == h
    assert empty_store.read_bytes(h, trust_cache=False) == data


def test_bank_names_are_validated_before_touching_paths(store: ContentStore) -> None:
    bad_names = (
        "sha256:../../etc/passwd",
        "sha256:" + "A" * 64,
        "md5:" + "0" * 32,
        "",
        "sha256:" + "0" * 64 + "\n",
    )
    for bad in bad_names:
        with pytest.raises(StoreError, match="not a bank name"):
            store.object_path(bad)
        with pytest.raises(StoreError, match="not a bank name"):
            store.get_manifest(bad)
    with pytest.raises(StoreError, match="missing from the store"):
        store.verified_path("sha256:" + "0" * 64)


# -- refs, reflog, history, rollback ---------------------------------------------------------------


def test_ref_and_reflog_record_every_move(store: ContentStore) -> None:
    v = versions(store)
    assert sorted(v) == [1, 2] and store.resolve("demo") == v[2]
    assert store.models() == ["demo"]
    log = store.reflog("demo")
    assert [(e["old"], e["new"]) for e in log] == [(None, v[1]), (v[1], v[2])]
    assert log[0]["reason"] == "init" and log[1]["reason"] == "add spam and topic"
    assert store.get_manifest(v[2])["parent"] == v[1]
    assert store.get_manifest(v[1])["parent"] is None


def test_set_ref_refuses_missing_manifests_and_stale_expectations(store: ContentStore) -> None:
    v = versions(store)
    with store.lock():
        with pytest.raises(StoreError, match="no such manifest"):
            store.set_ref("demo", "sha256:" + "0" * 64, expected=v[2], reason="x")
        with pytest.raises(ConflictError, match="moved"):
            store.set_ref("demo", v[1], expected=v[1], reason="x")
        with pytest.raises(ConflictError, match="already exists"):
            store.set_ref("demo", v[1], expected=None, reason="x")
    assert store.resolve("demo") == v[2] and len(store.reflog("demo")) == 2


def test_rollback_and_forward_again(store: ContentStore) -> None:
    v = versions(store)
    assert rollback(store, "demo", "1") == v[1]
    assert store.resolve("demo") == v[1]
    assert [h for h, _ in history(store, store.resolve("demo"))] == [v[1]]
    assert compose(store, "demo").branch_names == []
    # v2 is no longer in the history, but the reflog remembers it: forward again works
    assert rollback(store, "demo", "v2") == v[2]
    assert rollback(store, "demo", v[2].hex[:12]) == v[2]  # already there: no move
    log = store.reflog("demo")
    assert [(e["old"], e["new"], e["reason"]) for e in log[2:]] == [
        (v[2], v[1], "rollback to 1"),
        (v[1], v[2], "rollback to v2"),
    ]
    assert sorted(compose(store, "demo").branch_names) == ["spam", "topic"]
    assert store.get_manifest(v[1]) and store.get_manifest(v[2])  # nothing was deleted


@pytest.mark.slow
def test_cli_rollback_history_and_reflog(store: ContentStore, scaler_env: dict[str, str]) -> None:
    v = versions(store)
    proc = run_scaler("rollback", "demo", "1", env=scaler_env)
    assert proc.returncode == 0 and v[1] in proc.stdout, proc.stderr
    proc = run_scaler("history", "demo", "--json", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    assert [(e["version"], e["manifest"]) for e in json.loads(proc.stdout)] == [(1, v[1])]
    proc = run_scaler("rollback", "demo", "2", env=scaler_env)
    assert proc.returncode == 0 and v[2] in proc.stdout, proc.stderr
    proc = run_scaler("history", "demo", "--reflog", "--json", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    moves = [(e["old"], e["new"]) for e in json.loads(proc.stdout)]
    assert moves == [(None, v[1]), (v[1], v[2]), (v[2], v[1]), (v[1], v[2])]
    assert store.resolve("demo") == v[2]


# -- naming versions ---------------------------------------------------------------------------------


def test_name_at_version_and_hash_prefixes(store: ContentStore) -> None:
    v = versions(store)
    assert resolve_version(store, "demo") == ("demo", v[2])
    assert resolve_version(store, "demo@1") == ("demo", v[1])
    assert resolve_version(store, "demo@v2") == ("demo", v[2])
    assert resolve_version(store, f"demo@{v[1].hex[:12]}") == ("demo", v[1])  # as `history` shows it
    assert resolve_version(store, f"demo@sha256:{v[1].hex[:4]}") == ("demo", v[1])
    assert resolve_version(store, str(v[1])) == ("demo", v[1])
    model = compose(store, "demo@1")
    assert model.origin.manifest_hash == v[1] and model.origin.manifest.version == 1


def test_unknown_versions_and_models_list_what_exists(store: ContentStore) -> None:
    for spec in ("demo@7", "demo@v0", "demo@ffffffffffff", "demo@abc", "demo@latest", "demo@²", "demo@v٣"):
        with pytest.raises(ScalerError, match=r"has no version .* \(have: 1, 2\)") as info:
            resolve_version(store, spec)
        assert "\n" not in str(info.value)
    with pytest.raises(ModelNotFoundError, match=r"no model named 'dmeo'.*\(have: demo\)"):
        compose(store, "dmeo")
    with pytest.raises(ManifestError, match="missing from the store"):
        resolve_version(store, "sha256:" + "0" * 64)


def _twin_with_same_prefix(store: ContentStore, manifest: dict[str, Any], h: BankHash) -> dict[str, Any]:
    """A copy of ``manifest`` (another message) whose hash shares its first 4 hex digits with ``h``."""
    marker = "@@twin-%08d@@"
    twin = dict(manifest, message=marker % 0)
    template = canonical_json(twin)
    at = template.index(b"@@twin-")
    for i in range(4_000_000):
        candidate = template[:at] + (marker % i).encode() + template[at + len(marker % 0) :]
        if BankHash.of_bytes(candidate).hex[:4] == h.hex[:4]:
            return dict(manifest, message=marker % i)
    raise AssertionError("no twin found")


def test_a_short_hash_made_of_digits_is_still_a_hash(store: ContentStore) -> None:
    """`scaler history` shows 12 hex digits; when they are all decimal digits they still work."""
    v = versions(store)
    m = store.get_manifest(v[2])
    for i in range(100_000):
        twin = dict(m, message=f"digits {i}")
        if BankHash.of_bytes(canonical_json(twin)).hex[:12].isdigit():
            break
    else:
        raise AssertionError("no digit-only hash found")
    with store.lock():
        t = store.put_manifest(twin)
        store.set_ref("demo", t, expected=v[2], reason="a v2 with a digit-only short hash")
    assert resolve_version(store, f"demo@{t.hex[:12]}") == ("demo", t)
    assert rollback(store, "demo", "1") == v[1] and rollback(store, "demo", t.hex[:12]) == t
    with pytest.raises(ScalerError, match="has no version 'v" + t.hex[:12]):
        find_version(store, "demo", "v" + t.hex[:12])  # "v..." is always a version number


def test_ambiguous_versions_list_the_candidates(store: ContentStore) -> None:
    """After a rollback and a new save there are two v2s; a short prefix can also match two."""
    v = versions(store)
    twin = _twin_with_same_prefix(store, store.get_manifest(v[2]), v[2])
    with store.lock():
        t = store.put_manifest(twin)
        store.set_ref("demo", t, expected=v[2], reason="another v2")
    assert t != v[2] and t.hex[:4] == v[2].hex[:4]
    with pytest.raises(ScalerError, match=r"version '2' of 'demo' is ambiguous: ") as info:
        find_version(store, "demo", "2")
    assert v[2].short in str(info.value) and t.short in str(info.value)
    with pytest.raises(ScalerError, match="is ambiguous") as info:
        resolve_version(store, f"demo@sha256:{t.hex[:4]}")
    assert v[2].short in str(info.value) and t.short in str(info.value)
    assert resolve_version(store, f"demo@{t.hex[:12]}") == ("demo", t)  # a longer prefix is unique


# -- writers: conflicts and the lock ------------------------------------------------------------------


def _nudge(model: Any) -> None:
    with torch.no_grad():
        for p in model.trunk.parameters():
            p.add_(torch.randn_like(p) * 1e-3)


def test_two_writers_of_the_same_version_second_is_refused(store: ContentStore) -> None:
    v = versions(store)
    first, second = compose(store, "demo"), compose(store, "demo")
    _nudge(first)
    _nudge(second)
    h1 = save_version(store, first, message="first")
    manifests_before = set(store.iter_manifests())
    with pytest.raises(ConflictError, match=r"moved to .* since this model was composed") as info:
        save_version(store, second, message="second")
    assert "\n" not in str(info.value)
    assert store.resolve("demo") == h1 and store.get_manifest(h1)["message"] == "first"
    assert store.get_manifest(h1)["parent"] == v[2] and store.get_manifest(h1)["version"] == 3
    assert set(store.iter_manifests()) == manifests_before  # the loser wrote no manifest
    assert [e["new"] for e in store.reflog("demo")][-1] == h1
    # redone on the current version, it goes through
    again = compose(store, "demo")
    _nudge(again)
    h2 = save_version(store, again, message="second, redone")
    assert store.get_manifest(h2)["parent"] == h1


def test_new_names_must_not_exist(store: ContentStore) -> None:
    model = compose(store, "demo")
    with pytest.raises(ConflictError, match="'demo' already exists"):
        init_model(store, "demo")
    h = save_version(store, model, message="fork", name="demo-fork")
    assert store.models() == ["demo", "demo-fork"] and store.get_manifest(h)["version"] == 1
    with pytest.raises(ConflictError, match="already exists"):
        save_version(store, compose(store, "demo"), message="fork again", name="demo-fork")


def test_lock_times_out_with_a_clear_error(store: ContentStore) -> None:
    other = ContentStore.open(store.root)
    with store.lock(), pytest.raises(StoreError, match="locked by another writer"), other.lock(timeout=0.2):
        pass
    with other.lock(timeout=0.2):  # released: free again
        pass


LOCKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from scaler_wizard.banks import ContentStore

    store = ContentStore.open(sys.argv[1])
    out, barrier = Path(sys.argv[2]), Path(sys.argv[3])
    (barrier / str(os.getpid())).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.01)
    for _ in range(3):
        asked = time.time()
        with store.lock(timeout=60):
            got = time.time()
            time.sleep(0.15)
            done = time.time()
        with open(out, "a") as fh:
            fh.write(json.dumps([os.getpid(), asked, got, done]) + "\\n")
    """
)


@pytest.mark.slow
def test_the_lock_serialises_writers_in_two_processes(store: ContentStore, tmp_path: Path) -> None:
    script, out, barrier = tmp_path / "locker.py", tmp_path / "held.jsonl", tmp_path / "barrier"
    script.write_text(LOCKER)
    barrier.mkdir()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(store.root), str(out), str(barrier)])
        for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    held = sorted(
        (got, done, pid, asked) for pid, asked, got, done in map(json.loads, out.read_text().splitlines())
    )
    assert len(held) == 6 and len({h[2] for h in held}) == 2
    for (_, done, *_), (got, *_) in zip(held, held[1:], strict=False):
        assert got >= done, "two writers held the lock at once"
    assert max(got - asked for got, _, _, asked in held) > 0.05, "the writers never contended"


# -- opening, names, tampering --------------------------------------------------------------------------


def test_missing_or_foreign_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at .*scaler init"):
        ContentStore.open(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()  # reading never creates a store
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "scaler-store.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(StoreError, match="not a scaler-wizard store"):
        ContentStore.open(foreign)
    (foreign / "scaler-store.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        ContentStore.open(foreign)


def test_cli_missing_store(tmp_path: Path, scaler_env: dict[str, str]) -> None:
    env = dict(scaler_env, SCALER_HOME=str(tmp_path / "nowhere"))
    one_error_line(run_scaler("show", "demo", env=env), "no store at", "nowhere")
    assert not (tmp_path / "nowhere").exists()


BAD_NAMES = [
    "",
    "../evil",
    "a/b",
    "/abs",
    ".hidden",
    "-flag",
    "x.lock",
    "a" * 101,
    "with space",
    "demo\n",
    "ünï",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_invalid_model_names_are_refused(name: str, store: ContentStore) -> None:
    with pytest.raises(StoreError, match="invalid model name"):
        validate_name(name)
    with pytest.raises(StoreError, match="invalid model name"):
        store.resolve(name)
    with pytest.raises(StoreError, match="invalid model name"):
        store.get_ref(name)
    with pytest.raises(StoreError, match="invalid model name"):
        init_model(store, name)
    if name:  # name="" means "the model's own name"
        with pytest.raises(StoreError, match="invalid model name"):
            save_version(store, compose(store, "demo@1"), message="x", name=name)
    assert store.models() == ["demo"]


def test_cli_invalid_name(store: ContentStore, scaler_env: dict[str, str]) -> None:
    one_error_line(run_scaler("init", "../evil", env=scaler_env), "invalid model name", "../evil")
    assert store.models() == ["demo"] and not (store.root / "refs" / "evil").exists()


def test_tampered_manifest_is_detected(
    store: ContentStore, store_path: Path, scaler_env: dict[str, str]
) -> None:
    v = versions(store)
    path = store.manifest_path(v[2])
    text = path.read_text().replace("add spam and topic", "add spam and topix")
    path.unlink()
    path.write_text(text)
    for action in (
        lambda: store.get_manifest(v[2]),
        lambda: compose(store, "demo"),
        lambda: history(store, v[2]),
    ):
        with pytest.raises(IntegrityError, match=f"manifest {v[2]} is corrupt or tampered"):
            action()
    [check] = verify_version(store, v[2])
    assert not check.ok and "tampered" in check.detail
    proc = run_scaler("verify", "demo", env=scaler_env)
    assert proc.returncode == 1 and f"FAILED manifest {v[2]}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_damaged_ref_is_a_clear_error(store: ContentStore) -> None:
    ref = store.root / "refs" / "models" / "demo"
    ref.write_text("../../../etc/passwd\n")
    with pytest.raises(StoreError, match="is damaged"):
        compose(store, "demo")


def test_temp_files_are_never_taken_for_objects_refs_or_manifests(store: ContentStore) -> None:
    h = next(iter(store.iter_objects()))
    leftovers = [
        store.object_path(h).parent / f"{TMP_PREFIX}{h.hex[2:]}-123-abcd",
        store.root / "manifests" / f"{TMP_PREFIX}{'1' * 64}.json-123-abcd",
        store.root / "refs" / "models" / f"{TMP_PREFIX}demo-123-abcd",
    ]
    for p in leftovers:
        p.write_bytes(b"half a write")
    assert all(not o.startswith("sha256:" + h.hex[:2] + TMP_PREFIX) for o in store.iter_objects())
    assert len(list(store.iter_objects())) == len(set(store.iter_objects()))
    assert store.models() == ["demo"] and len(list(store.iter_manifests())) == 2
    compose(store, "demo").load_all_branches()
    with store.lock():
        assert store.clean_temp() >= 3
    assert not any(p.exists() for p in leftovers)
    assert [e["new"] for e in store.reflog("demo")][-1] == store.resolve("demo")
    assert os.listdir(store.root / "refs" / "models") == ["demo"]


def test_relative_store_path_composes(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store given as a relative path (``--store s1``, ``SCALER_HOME=s1``) works from its folder."""
    monkeypatch.chdir(store_path.parent)
    rel = ContentStore.open(store_path.name)
    assert rel.root.is_absolute()
    model = compose(rel, "demo")
    assert model.predict(["hello"], ["spam"])["spam"][0].label in ("ham", "spam")


def test_the_store_reads_a_manifest_typed_and_validated_in_one_place(store: ContentStore) -> None:
    """``ContentStore.manifest`` checks the hash, parses and validates; ``put_manifest`` takes
    the typed model or its JSON and writes the same canonical bytes (the manifests' own form)."""
    from scaler_wizard.manifests.model import Manifest
    from scaler_wizard.manifests.model import canonical_json as manifests_canonical_json

    h = store.resolve("demo")
    m = store.manifest(h)
    assert isinstance(m, Manifest) and m.hash == h and m.name == "demo"
    raw = store.manifest_path(h).read_bytes()
    assert canonical_json(m.to_dict()) == manifests_canonical_json(m.to_dict()) == raw == m.to_bytes()
    with store.lock():
        assert store.put_manifest(m) == h == store.put_manifest(m.to_dict())
    # valid JSON, hash intact, but not a manifest: one line naming the field, and ``where``
    bad = {**m.to_dict(), "version": 0}
    with store.lock():
        bh = store.put_manifest(bad)
    with pytest.raises(ManifestError) as info:
        store.manifest(bh, where="manifest under test")
    text = str(info.value)
    assert "\n" not in text and "manifest under test: version:" in text
    assert store.get_manifest(bh)["version"] == 0  # the raw reader still only checks the hash
    path = store.manifest_path(h)
    os.chmod(path, 0o644)
    tamper_object(path, offset=10)
    with pytest.raises(IntegrityError):
        store.manifest(h)
