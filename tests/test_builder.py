"""One way to make a version (``core/versions/builder.py``): for init, branch add, branch
remove, train (trunk changed, branches left stale) and pull (``--branches``, ``--into``), the
builder gives the very manifest the current code writes: given the writer's ``created``, the
same bytes, so the same hash.

The pre-re-layering fixture's history (init, train, three branch adds) is checked version by
version; the other operations run for real here (the library, the CLI in-process, a short
``scaler train`` run, pull's planner), and the builder derives the same version from the
parent.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, _copy_store
from train_helpers import SMS, copy_store, one_thread, tiny_template  # noqa: F401

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import BranchNotFoundError, ConflictError, ManifestError, ScalerError
from scaler_wizard.manifests import facts
from scaler_wizard.manifests.model import BranchEntry, LibraryInfo, Manifest, parse_manifest
from scaler_wizard.versions.builder import (
    CURRENT_LIBRARY,
    new_version,
    rebased,
    rfc3339,
    with_branch,
    with_trunk,
    without_branch,
)

LEGACY = REPO / "tests" / "fixtures" / "legacy_store" / "store"


def stored(store: ContentStore, spec: str) -> Manifest:
    from scaler_wizard.versions.history import resolve_version

    h = resolve_version(store, spec)[1]
    m = parse_manifest(store.manifest_path(h).read_bytes(), canonical=True)
    assert m.hash == h
    return m


def same(built: Manifest, written: Manifest) -> None:
    """Identical: every field, so the canonical bytes and the hash."""
    assert built.to_dict() == written.to_dict()
    assert built.to_bytes() == written.to_bytes() and built.hash == written.hash


def legacy_history() -> list[Manifest]:
    ms = [parse_manifest(p.read_bytes()) for p in (LEGACY / "manifests").glob("*.json")]
    return sorted(ms, key=lambda m: m.version)


# -- the history written before the re-layering --------------------------------------------


def test_the_legacy_history_is_rebuilt_version_by_version() -> None:
    v1, v2, v3, v4, v5 = legacy_history()
    # init: a first version, no parent, no branches
    same(
        new_version(
            None, name="legacy", message=v1.message or "", created=v1.created, base=v1.base, trunk=v1.trunk
        ),
        v1,
    )
    # train: a new trunk, the trained branch on it
    same(
        with_trunk(
            v1, v2.trunk, message=v2.message or "", branches={"seed": v2.branches["seed"]}, created=v2.created
        ),
        v2,
    )
    # branch add, three times (the default message is the CLI's)
    for parent, child, name in ((v2, v3, "spam"), (v3, v4, "lin"), (v4, v5, "enc")):
        same(with_branch(parent, name, child.branches[name], created=child.created), child)
        assert child.parent == parent.hash and child.version == parent.version + 1


# -- the operations, run now ---------------------------------------------------------------


def test_init_and_a_library_save_that_changes_the_trunk(store: ContentStore) -> None:
    """The session store: v1 by ``init_model``, v2 by ``save_version`` after the trunk was
    perturbed and two branches added; then v3: the trunk changed again, branches not retrained."""
    from scaler_wizard.modeling.compose import compose, save_version

    v1, v2 = stored(store, "demo@1"), stored(store, "demo@2")
    same(
        new_version(
            None, name="demo", message=v1.message or "", created=v1.created, base=v1.base, trunk=v1.trunk
        ),
        v1,
    )
    same(
        new_version(v1, message=v2.message or "", trunk=v2.trunk, branches=v2.branches, created=v2.created),
        v2,
    )

    model = compose(store, "demo")
    with torch.no_grad():
        next(model.trunk.parameters()).add_(0.01)
    save_version(store, model, message="retune the trunk")
    v3 = stored(store, "demo")
    built = with_trunk(v2, v3.trunk, message="retune the trunk", created=v3.created)
    same(built, v3)
    for name in ("spam", "topic"):  # both left on the old trunk: marked stale, since v3
        stale = built.branches[name].provenance["stale"]  # type: ignore[index]
        assert stale["since_version"] == 3 and stale["trained_on_trunk"] == facts.trunk_id(v2)
        assert facts.branch_trunk_problem(built, name) is None


@pytest.fixture(scope="module")
def added_and_removed(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manifest]:
    """``branch add demo sms`` by the library, then ``scaler branch remove demo sms`` (in-process)."""
    from scaler_wizard.cli.app import main
    from scaler_wizard.training.branch_add import DataSpec, add_branch
    from scaler_wizard.training.branch_fit import BranchTrainingConfig

    root = tmp_path_factory.mktemp("builder") / "store"
    _copy_store(session_store, root)
    store = ContentStore.open(root)
    before = stored(store, "demo")
    add_branch(store, "demo", "sms", DataSpec(SMS), training=BranchTrainingConfig(epochs=1))
    after = stored(store, "demo")
    with pytest.raises(SystemExit) as exit_info:
        main(["--store", str(root), "branch", "remove", "demo", "sms"])
    assert exit_info.value.code in (0, None)
    return {"before": before, "after": after, "removed": stored(store, "demo")}


def test_branch_add_and_remove(added_and_removed: dict[str, Manifest]) -> None:
    before, after, removed = (
        added_and_removed["before"],
        added_and_removed["after"],
        added_and_removed["removed"],
    )
    entry = after.branches["sms"]
    assert entry.trunk == facts.trunk_id(before) and entry.provenance and entry.metrics and entry.fingerprint
    same(with_branch(before, "sms", entry, created=after.created), after)
    same(without_branch(after, "sms", created=removed.created), removed)
    # what stays: base, trunk, the other branches' entries, untouched
    assert removed.branches == before.branches and removed.trunk == before.trunk


@pytest.mark.usefixtures("one_thread")
def test_train_with_a_branch_left_stale(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from scaler_wizard.modeling.compose import compose, new_branch, save_version
    from scaler_wizard.training.config import BranchSpec, TrainConfig
    from scaler_wizard.training.loop import make_accelerator, plan_run, start_run, train_run

    root = tmp_path / "store"
    copy_store(tiny_template(tmp_path_factory), root)
    store = ContentStore.open(root)
    model = compose(store, "tiny")
    model.add_branch("old", new_branch(hidden_size=384, labels=["x", "y"]))
    save_version(store, model, message="add old")
    v2 = stored(store, "tiny")
    config = TrainConfig(steps=4, batch_size=16, eval_every=4, checkpoint_every=4, check_window=4)
    plan = plan_run(store, "tiny", [BranchSpec("spam", SMS)], config, allow_stale_branches=True)
    acc = make_accelerator()
    train_run(store, start_run(store, plan, run_dir=tmp_path / "run", accelerator=acc), accelerator=acc)
    v3 = stored(store, "tiny")

    # `scaler train` marks the branches it leaves behind itself (with its run): the builder
    # keeps a mark it is given, and would have marked the branch anyway
    train_stale = v3.branches["old"].provenance["stale"]  # type: ignore[index]
    assert train_stale["run"] == "run" and train_stale["trained_on_trunk"] == v2.branches["old"].trunk
    old = facts.mark_stale(v2.branches["old"], train_stale)
    built = with_trunk(
        v2,
        v3.trunk,
        message=v3.message or "",
        branches={"spam": v3.branches["spam"], "old": old},
        created=v3.created,
    )
    same(built, v3)
    unmarked = with_trunk(v2, v3.trunk, message="m", branches={"spam": v3.branches["spam"]})
    assert facts.is_stale(unmarked.branches["old"]) and not facts.is_stale(unmarked.branches["spam"])
    assert unmarked.branches["old"].provenance["stale"]["since_version"] == 3  # type: ignore[index]


def _planner() -> tuple[Any, Any]:
    from scaler_wizard.remote.sync import _plan, _Remote

    return _plan, _Remote


def test_pull_some_branches_then_more_into_that_model(store: ContentStore) -> None:
    """What ``pull --branches spam --as spam-only`` and then ``pull --branches topic --into
    spam-only`` store, from pull's own planner (no Hub needed: those plans download nothing)."""
    plan, remote_cls = _planner()
    remote_h = store.resolve("demo")
    remote = stored(store, "demo")
    source = remote_cls("org/demo@v2", {}, lambda paths: {})
    label = f"{source.label} ({remote.name} v{remote.version}"
    tid = facts.trunk_id(remote)

    only = plan(store, remote, remote_h, source, as_name="spam-only", branches=["spam"], into=None)
    target = only.target
    old = remote.to_dict()  # what the planner wrote before it used the builder, field for field
    assert (
        target.to_bytes()
        == parse_manifest(
            {
                **old,
                "name": "spam-only",
                "version": 1,
                "parent": None,
                "message": f"branches spam of {label}, {remote_h})",
                "branches": {
                    "spam": {**old["branches"]["spam"], "trunk": old["branches"]["spam"].get("trunk", tid)}
                },
            }
        ).to_bytes()
    )
    # a model of its own: version 1, the remote's base, trunk, time and library
    built = new_version(
        None,
        name="spam-only",
        message=f"branches spam of {label}, {remote_h})",
        created=remote.created,
        library=remote.library,
        base=remote.base,
        trunk=remote.trunk,
        branches={
            "spam": dataclasses.replace(remote.branches["spam"], trunk=remote.branches["spam"].trunk or tid)
        },
    )
    same(built, target)
    with store.lock():
        h = store.put_manifest(only.target)
        store.set_ref("spam-only", h, expected=None, reason="test")

    grown = plan(store, remote, remote_h, source, as_name=None, branches=["topic"], into="spam-only")
    target2 = grown.target
    local = target.to_dict()  # what the planner wrote before it used the builder, field for field
    assert (
        target2.to_bytes()
        == parse_manifest(
            {
                **local,
                "version": 2,
                "parent": str(target.hash),
                "created": target2.created,
                "message": f"pull topic from {label})",
                "branches": {**local["branches"], "topic": remote.to_dict()["branches"]["topic"]},
            }
        ).to_bytes()
    )
    # pull --into keeps the local model's ``library`` (not this writer's): the builder says so
    built2 = with_branch(
        target,
        "topic",
        remote.branches["topic"],
        message=f"pull topic from {label})",
        created=target2.created,
    )
    assert built2.library == CURRENT_LIBRARY
    same(dataclasses.replace(built2, library=target.library), target2)
    same(
        new_version(
            target,
            message=f"pull topic from {label})",
            created=target2.created,
            library=target.library,
            branches={**target.branches, "topic": remote.branches["topic"]},
        ),
        target2,
    )


def test_rebase_moves_a_version_onto_a_newer_head(store: ContentStore) -> None:
    from scaler_wizard.versions.history import rebase_branches

    v2 = stored(store, "demo")
    ours = without_branch(v2, "spam")
    theirs = without_branch(v2, "topic", created=ours.created)
    merged = rebase_branches("demo", origin=(v2.hash, v2), ours=ours, head=(theirs.hash, theirs))
    moved = rebased(ours, onto=theirs.hash, branches=merged.branches, message=merged.message)
    same(moved, merged)
    assert moved.branches == {} and moved.parent == theirs.hash and moved.version == ours.version


# -- the rules -----------------------------------------------------------------------------


def test_what_is_inherited_and_what_is_new(store: ContentStore) -> None:
    v2 = stored(store, "demo")
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    m = new_version(v2, message="nothing changed")
    after = dt.datetime.now(dt.timezone.utc)
    assert (m.name, m.version, m.parent, m.message) == ("demo", 3, v2.hash, "nothing changed")
    assert (m.base, m.trunk, m.branches) == (v2.base, v2.trunk, v2.branches)
    assert m.library == LibraryInfo("scaler-wizard", CURRENT_LIBRARY.version)
    assert m.created.endswith("Z") and len(m.created) == 20
    assert before <= dt.datetime.fromisoformat(m.created.replace("Z", "+00:00")) <= after
    # numbers unique after a rollback: the caller passes history.next_version's answer
    assert new_version(v2, message="m", version=7).version == 7
    when = dt.datetime(2026, 1, 31, 13, 0, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert new_version(v2, message="m", created=when).created == "2026-01-31T12:00:05Z" == rfc3339(when)
    with pytest.raises(ValueError, match="naive"):
        rfc3339(dt.datetime(2026, 1, 31))
    assert new_version(v2, message="m", library=None).library is None
    saved_as = new_version(
        None, name="copy", message="save as", base=v2.base, trunk=v2.trunk, branches=v2.branches
    )
    assert (saved_as.version, saved_as.parent, saved_as.name) == (1, None, "copy")
    with pytest.raises(TypeError, match="base, trunk"):
        new_version(None, name="x", message="m")


def test_an_invalid_result_is_refused_with_one_line(store: ContentStore) -> None:
    v2 = stored(store, "demo")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"trunk": dataclasses.replace(v2.trunk, hidden_size=512)}, "trunk.hidden_size"),
        ({"name": "con"}, "name:"),
        ({"branches": {"a.b": v2.branches["spam"]}}, "branches"),
        ({"created": "yesterday"}, "created"),
        ({"version": 0}, "version"),
    ]
    for change, needle in cases:
        with pytest.raises(ManifestError) as info:
            new_version(v2, message="m", **change)
        msg = str(info.value)
        assert msg.startswith("invalid new manifest: ") and needle in msg and "\n" not in msg, msg
    with pytest.raises(ConflictError, match="already has a branch 'spam'"):
        with_branch(v2, "spam", v2.branches["spam"])
    with pytest.raises(BranchNotFoundError, match="no branch named 'nope'"):
        without_branch(v2, "nope")
    with pytest.raises(ScalerError, match="first and cannot be rebased"):
        rebased(stored(store, "demo@1"), onto=v2.hash, branches={})


def test_the_preflight_check_before_branch_add_is_a_with_branch(store: ContentStore) -> None:
    """``branch add`` refuses a 1,001-character label before training by validating the
    version the add would make: ``with_branch`` on the entry-to-be says the same line."""
    from scaler_wizard.plugin_manager import get_registry
    from scaler_wizard.training.preflight import dry_run_entry, preflight_branch

    current = store.get_manifest(store.resolve("demo"))
    labels = ["ok", "x" * 1001]
    with pytest.raises(ManifestError) as before:
        preflight_branch(current, "new", strategy="lora", labels=labels)
    entry = BranchEntry.from_dict(
        dry_run_entry(
            get_registry(),
            strategy="lora",
            strategy_config=None,
            head="linear",
            head_config=None,
            labels=labels,
        )
    )
    where = "branch 'new' (checked before training)"
    with pytest.raises(ManifestError) as now:
        with_branch(parse_manifest(current), "new", entry, where=where)
    assert str(now.value) == str(before.value) and "branches.new.labels[1]" in str(now.value)
    fine = with_branch(
        parse_manifest(current), "new", dataclasses.replace(entry, labels=("a", "b")), where=where
    )
    assert facts.trunk_id_of(fine.base, fine.trunk) == facts.trunk_id(fine) == facts.trunk_id(current)
