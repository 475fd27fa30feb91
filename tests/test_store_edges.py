"""The store's edges (issue 10 #4, #5, #8, #10, #12): version numbers, reflog order, stale
temps, links inside a store, refs that are not files, store paths that are not folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, SCALER, run_scaler
from hubserver import fixtures as hub_fixtures
from hubserver.fixtures import HubServer

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.atomic import TMP_PREFIX
from scaler_wizard.errors import StoreError
from scaler_wizard.modeling.compose import compose, new_branch, save_version
from scaler_wizard.versions.history import find_version, history, rollback

SECRET = "password=hunter2"
hub_server = hub_fixtures.hub_server  # the test Hub's fixtures, used by name below
hub_env = hub_fixtures.hub_env


def versions(store: ContentStore) -> dict[int, BankHash]:
    return {m["version"]: h for h, m in history(store, store.resolve("demo"))}


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _add_alpha(store: ContentStore, seed: int) -> BankHash:
    model = compose(store, "demo")
    torch.manual_seed(seed)
    branch = new_branch(hidden_size=384, labels=["a", "b"])
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.add_branch(f"alpha{seed}", branch)
    return save_version(store, model, message=f"add alpha{seed}")


# -- #4: a version number names one version, even after a rollback --------------------------------------


def test_a_save_after_a_rollback_takes_a_new_number(store: ContentStore) -> None:
    v = versions(store)
    rollback(store, "demo", "1")
    h3 = _add_alpha(store, 1)
    m3 = store.get_manifest(h3)
    assert (m3["version"], m3["parent"]) == (3, v[1])  # not a second v2
    assert [m["version"] for _, m in history(store, h3)] == [3, 1]  # reads naturally: v3 <- v1
    assert find_version(store, "demo", "2") == v[2] and find_version(store, "demo", "v3") == h3
    rollback(store, "demo", "2")
    h4 = _add_alpha(store, 2)
    assert store.get_manifest(h4)["version"] == 4  # v3 is known from the reflog
    assert {n: find_version(store, "demo", str(n)) for n in (1, 2, 3, 4)} == {**v, 3: h3, 4: h4}


@pytest.mark.slow
def test_cli_versions_stay_unique_after_a_rollback(store: ContentStore, scaler_env: dict[str, str]) -> None:
    for args in (
        ("branch", "remove", "demo", "spam"),  # v3
        ("rollback", "demo", "2"),
        ("branch", "remove", "demo", "topic"),  # v4, not a second v3
    ):
        proc = run_scaler(*args, env=scaler_env)
        assert proc.returncode == 0, proc.stderr
    assert "demo v4 " in proc.stdout
    for n, branches in ((3, ["topic"]), (4, ["spam"])):
        proc = run_scaler("show", f"demo@{n}", "--json", env=scaler_env)
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout)
        assert shown["version"] == n and sorted(shown["branches"]) == branches


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_pull_into_after_a_rollback_takes_a_new_number(store: ContentStore, hub_env: HubServer) -> None:
    from scaler_wizard.remote import publish, pull

    repo_id = f"{hub_env.user}/edges-{os.getpid()}-{time.time_ns()}"
    publish(store, "demo", repo_id)
    pull(store, repo_id, branches=["spam"], as_name="s")  # s v1
    assert pull(store, repo_id, branches=["topic"], into="s").version == 2
    rollback(store, "s", "1")
    again = pull(store, repo_id, branches=["topic"], into="s")
    assert again.version == 3 and store.get_manifest(store.resolve("s"))["version"] == 3
    assert find_version(store, "s", "2") != find_version(store, "s", "3")


# -- #5: the reflog never records a move that did not happen; stale temps go ----------------------------

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from scaler_wizard.banks import refs as store_mod
    from scaler_wizard.banks.store import ContentStore
    from scaler_wizard.versions.history import rollback

    point = sys.argv[2]
    real_write, real_append = store_mod.atomic_write_bytes, ContentStore._append_log

    def write(target, data, **kw):
        if point == "before-ref-moves" and target.parent.name == "models":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(target, data, **kw)

    def append(self, log, entries):
        if point == "before-reflog-line":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_append(self, log, entries)

    store_mod.atomic_write_bytes = write
    ContentStore._append_log = append
    rollback(ContentStore.open(sys.argv[1]), "demo", "1")
    """
)


def _log_lines(store: ContentStore) -> list[dict[str, Any]]:
    log = store.root / "logs" / "refs" / "models" / "demo"
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("point", ["before-ref-moves", "before-reflog-line"])
def test_a_killed_ref_move_never_leaves_a_reflog_line_for_a_move_that_did_not_happen(
    store: ContentStore, point: str
) -> None:
    v = versions(store)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(store.root), point], capture_output=True, text=True, check=False
    )
    assert proc.returncode == -9, proc.stderr
    logged = _log_lines(store)
    assert len(logged) == 2 and logged[-1]["new"] == v[2]  # the file holds no line for the kill
    if point == "before-ref-moves":
        assert store.resolve("demo") == v[2] and store.reflog_problem("demo") is None
        assert store.reflog("demo") == logged
    else:  # the ref moved, its line was not written: readers see it, and the next move logs it
        assert store.resolve("demo") == v[1]
        problem = store.reflog_problem("demo")
        assert problem is not None and "\n" not in problem and v[1] in problem
        last = store.reflog("demo")[-1]
        assert (last["old"], last["new"]) == (v[2], v[1]) and "unlogged" in last["reason"]
        env = {**os.environ, "SCALER_HOME": str(store.root), "HF_HUB_OFFLINE": "1"}
        seen = run_scaler("verify", "demo", "--json", env=env)
        assert seen.returncode == 0, seen.stderr  # the ref is right: a warning, not a failure
        assert "warning: the reflog of 'demo'" in seen.stderr
        assert json.loads(seen.stdout)["reflog"] == problem
    rollback(store, "demo", "2" if point == "before-reflog-line" else "1")  # the next move
    moves = [(e["old"], e["new"]) for e in _log_lines(store)]
    assert moves[-1] == ((v[1], v[2]) if point == "before-reflog-line" else (v[2], v[1]))
    assert all(a[1] == b[0] for a, b in zip(moves[:-1], moves[1:], strict=True))  # an unbroken chain of moves
    assert store.reflog_problem("demo") is None


def test_a_reflog_line_cut_short_by_a_crash_does_not_swallow_the_next(store: ContentStore) -> None:
    v = versions(store)
    log = store.root / "logs" / "refs" / "models" / "demo"
    with open(log, "a") as fh:
        fh.write('{"time": 1, "old": "sha')  # a line a crash cut short
    rollback(store, "demo", "1")
    assert [(e["old"], e["new"]) for e in store.reflog("demo")][-1] == (v[2], v[1])
    assert store.reflog_problem("demo") is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_the_next_write_cleans_temps_of_dead_writers_only(
    store: ContentStore, scaler_env: dict[str, str]
) -> None:
    dead = _dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        h = next(iter(store.iter_objects()))
        stale = [
            store.object_path(h).parent / f"{TMP_PREFIX}{h.hex[2:]}-{dead}-abcd1234",
            store.root / "manifests" / f"{TMP_PREFIX}{'1' * 64}.json-{dead}-abcd1234",
            store.root / "refs" / "models" / f"{TMP_PREFIX}demo-{dead}-abcd1234",
            store.root / "cache" / f"{TMP_PREFIX}verified.json-{dead}-abcd1234",
        ]
        stale_dir = store.root / "tmp" / f"{TMP_PREFIX}adapter-view-{dead}-1234"
        kept = [
            store.root / "manifests" / f"{TMP_PREFIX}{'2' * 64}.json-{alive.pid}-abcd1234",  # being written
            store.root / "tmp" / f"{TMP_PREFIX}pull-{dead}-1234" / "download" / "x",  # a pull adopts it
        ]
        for p in [*stale, *kept, stale_dir / "adapter_model.safetensors"]:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"half a write")
        proc = run_scaler("rollback", "demo", "1", env=scaler_env)
        assert proc.returncode == 0, proc.stderr
        assert not any(p.exists() for p in [*stale, stale_dir])
        assert all(p.exists() for p in kept)
    finally:
        alive.kill()
        alive.wait()


# -- #8, #12: refs that are not plain files, links inside the store ------------------------------------


def _ref(store: ContentStore) -> Path:
    return store.root / "refs" / "models" / "demo"


def _outside(store: ContentStore) -> Path:
    path = store.root.parent / "outside.txt"
    path.write_text(f"{SECRET}\n")
    return path


def ref_is_a_folder(store: ContentStore) -> None:
    _ref(store).unlink()
    _ref(store).mkdir()


def ref_links_outside(store: ContentStore) -> None:
    _ref(store).unlink()
    _ref(store).symlink_to(_outside(store))


def ref_holds_a_secret(store: ContentStore) -> None:
    _ref(store).write_text(f"{SECRET}\n")


def ref_links_to_a_good_copy(store: ContentStore) -> None:  # even a link holding a good hash
    copy = store.root.parent / "ref-copy"
    copy.write_bytes(_ref(store).read_bytes())
    _ref(store).unlink()
    _ref(store).symlink_to(copy)


def refs_folder_links_outside(store: ContentStore) -> None:
    outside = store.root.parent / "outside-refs"
    os.rename(store.root / "refs" / "models", outside)
    (store.root / "refs" / "models").symlink_to(outside, target_is_directory=True)


BROKEN_REFS: dict[str, tuple[Callable[[ContentStore], None], str]] = {
    "ref-is-a-folder": (ref_is_a_folder, "not a plain file"),
    "ref-links-outside": (ref_links_outside, "symbolic link"),
    "ref-holds-a-secret": (ref_holds_a_secret, "does not hold a manifest hash"),
    "ref-links-to-a-good-copy": (ref_links_to_a_good_copy, "symbolic link"),
    "refs-folder-links-outside": (refs_folder_links_outside, "symbolic link"),
}
READERS = {
    "show": ("show", "demo"),
    "verify": ("verify", "demo"),
    "predict": ("predict", "demo", "hello", "--all-branches"),
    "history": ("history", "demo"),
    "reflog": ("history", "demo", "--reflog"),
    "rollback": ("rollback", "demo", "1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_REFS))
def test_a_broken_ref_is_a_clear_error_that_echoes_nothing(store: ContentStore, case: str) -> None:
    breaks, reason = BROKEN_REFS[case]
    breaks(store)
    with pytest.raises(StoreError, match=reason) as info:
        store.resolve("demo")
    assert SECRET not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(READERS))
@pytest.mark.parametrize("case", ["ref-is-a-folder", "ref-links-outside", "ref-holds-a-secret"])
def test_cli_on_a_broken_ref(
    store: ContentStore, scaler_env: dict[str, str], case: str, command: str
) -> None:
    breaks, reason = BROKEN_REFS[case]
    breaks(store)
    proc = run_scaler(*READERS[command], env=scaler_env)
    one_error_line(proc, reason)
    assert SECRET not in proc.stdout + proc.stderr


def reflog_links_outside(store: ContentStore) -> Path:
    log = store.root / "logs" / "refs" / "models" / "demo"
    log.unlink()
    log.symlink_to(_outside(store))
    return _outside(store)


def logs_folder_links_outside(store: ContentStore) -> Path:
    outside = store.root.parent / "outside-logs"
    os.rename(store.root / "logs", outside)
    (store.root / "logs").symlink_to(outside, target_is_directory=True)
    return outside / "refs" / "models" / "demo"


def lock_links_outside(store: ContentStore) -> Path:
    (store.root / ".lock").unlink(missing_ok=True)
    (store.root / ".lock").symlink_to(_outside(store))
    return _outside(store)


def lock_loops(store: ContentStore) -> Path:
    (store.root / ".lock").unlink(missing_ok=True)
    (store.root / ".lock").symlink_to(store.root / ".lock")
    return _outside(store)


LINKED_WRITES = {
    "reflog-links-outside": reflog_links_outside,
    "logs-folder-links-outside": logs_folder_links_outside,
    "lock-links-outside": lock_links_outside,
    "lock-loops": lock_loops,
}
WRITERS = {"rollback": ("rollback", "demo", "1"), "remove": ("branch", "remove", "demo", "spam")}


@pytest.mark.parametrize("case", sorted(LINKED_WRITES))
def test_a_write_never_follows_a_link_in_the_store(store: ContentStore, case: str) -> None:
    target = LINKED_WRITES[case](store)
    before, head = target.read_bytes(), store.resolve("demo")
    with pytest.raises(StoreError, match="symbolic link") as info:
        rollback(store, "demo", "1")
    assert "\n" not in str(info.value)
    assert target.read_bytes() == before and store.resolve("demo") == head


def test_banks_and_manifests_are_never_written_through_a_linked_folder(store: ContentStore) -> None:
    data = b"a bank written through a link"
    sub = store.object_path(BankHash.of_bytes(data)).parent
    outside = store.root.parent / "outside-objects"
    outside.mkdir()
    if sub.exists():
        sub.rename(outside / "moved")
    sub.symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="symbolic link"):
        store.put_bytes(data)
    model = compose(store, "demo")
    model.remove_branch("spam")
    os.rename(store.root / "manifests", store.root.parent / "outside-manifests")
    (store.root / "manifests").symlink_to(store.root.parent / "outside-manifests", target_is_directory=True)
    before = sorted(os.listdir(store.root.parent / "outside-manifests"))
    with pytest.raises(StoreError, match="symbolic link"):
        save_version(store, model, message="remove spam")
    assert sorted(os.listdir(store.root.parent / "outside-manifests")) == before
    assert [p.name for p in outside.iterdir()] == (["moved"] if (outside / "moved").exists() else [])


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(WRITERS))
@pytest.mark.parametrize("case", sorted(LINKED_WRITES))
def test_cli_write_through_a_link_is_refused(
    store: ContentStore, scaler_env: dict[str, str], case: str, command: str
) -> None:
    target = LINKED_WRITES[case](store)
    before, head = target.read_bytes(), store.resolve("demo")
    one_error_line(run_scaler(*WRITERS[command], env=scaler_env), "symbolic link")
    assert target.read_bytes() == before and store.resolve("demo") == head


# -- #12: store paths that are not folders, markers that are not objects ----------------------------------


def test_store_paths_that_cannot_be_stores(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for root, reason in (
        (a_file, "is a file, not a store folder"),
        (a_file / "sub" / "store", "is a file, not a folder"),
        ("", "store path is empty"),
        ("  ", "store path is empty"),
    ):
        for create in (False, True):
            with pytest.raises(StoreError, match=reason):
                ContentStore.open(root, create=create)
    assert a_file.read_text() == "x"
    for marker in ("[]", '"scaler-wizard-store"', "null", "{"):
        (tmp_path / "s").mkdir(exist_ok=True)
        (tmp_path / "s" / "scaler-store.json").write_text(marker)
        with pytest.raises(StoreError, match="not a scaler-wizard store|unreadable"):
            ContentStore.open(tmp_path / "s")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["file", "under-a-file", "list-marker", "linked-marker"])
def test_cli_store_paths_that_cannot_be_stores(
    tmp_path: Path, scaler_env: dict[str, str], where: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    store = {"file": a_file, "under-a-file": a_file / "store"}.get(where, tmp_path / "s")
    if where == "list-marker":
        store.mkdir()
        (store / "scaler-store.json").write_text('["format", "scaler-wizard-store"]')
    if where == "linked-marker":
        store.mkdir()
        (tmp_path / "marker").write_text('{"format": "scaler-wizard-store", "version": 1}')
        (store / "scaler-store.json").symlink_to(tmp_path / "marker")
    env = {**scaler_env, "SCALER_HOME": str(store)}
    for args in (("init", "m"), ("show", "m")):
        one_error_line(run_scaler(*args, env=env))
    assert a_file.read_text() == "x"


@pytest.mark.slow
def test_cli_an_empty_store_path_is_refused(tmp_path: Path, scaler_env: dict[str, str]) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [str(SCALER), "--store", "", "init", "m"],
        env=scaler_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    one_error_line(proc, "empty")
    assert list(cwd.iterdir()) == []  # the current folder did not become a store


# -- #10: the verification cache's trust boundary ------------------------------------------------------


@pytest.mark.slow
def test_verify_catches_a_bank_rewritten_with_its_cache_entry(
    store: ContentStore, scaler_env: dict[str, str]
) -> None:
    """Whoever can write a store can make the cache vouch for a rewritten bank: `verify` re-hashes."""
    bank = BankHash(store.get_manifest(store.resolve("demo"))["branches"]["spam"]["head_bank"])
    path = store.object_path(bank)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.unlink()
    path.write_bytes(bytes(data))
    cache = store.root / "cache" / "verified.json"
    entries = json.loads(cache.read_text())
    st = path.stat()
    entries[bank.hex] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    cache.write_text(json.dumps(entries))
    assert ContentStore.open(store.root).verified_path(bank) == path  # the cache vouches for it
    proc = run_scaler("verify", "demo", env=scaler_env)
    assert proc.returncode == 1 and "FAILED branches.spam.head_bank" in proc.stderr, proc.stderr
    assert f"bank {bank} is corrupt or tampered" in proc.stderr
    proc = run_scaler("verify", "--help", env=scaler_env)
    help_text = " ".join(proc.stdout.split())
    assert "did not write" in help_text and "cache" in help_text
    doc = (REPO / "docs" / "store.md").read_text()
    assert "trust boundary" in doc and "scaler verify" in doc
