"""Concurrent writers of one model (issue 10 #11): a branch change lands on a head that moved.

A branch add changes nothing shared, so when another writer moved the model meanwhile but
left its trunk alone, the new branch is re-applied onto the new head (as git rebases a commit
that touches other files). Only a real conflict — the trunk changed, or both sides changed
one branch — is refused, with a one-line reason.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA, SCALER

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ConflictError
from scaler_wizard.modeling.compose import compose, new_branch, save_version
from scaler_wizard.versions.history import history

SMS = DATA / "samples" / "sms_spam_small.csv"
TREC = DATA / "samples" / "trec_small.csv"


def _perturbed_branch(labels: list[str], seed: int) -> Any:
    torch.manual_seed(seed)
    branch = new_branch(hidden_size=384, labels=labels)
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return branch


def _wait_for(predicate: Any, procs: list[subprocess.Popen[str]], what: str, limit: float = 400) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            out, err = dead[0].communicate()
            pytest.fail(f"a writer exited before {what}: rc {dead[0].returncode}: {err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_four_concurrent_branch_adds_all_land(
    store: ContentStore, scaler_env: dict[str, str], tmp_path: Path
) -> None:
    """4 `branch add` (different names, same trunk) + a 5th reusing one name: 4 land, 1 is refused.

    The test holds the store lock until every writer has composed the model (v2) and started
    training, so all five save against a head that moved: deterministic, not a timing race.
    """
    v2 = store.resolve("demo")
    env = {**scaler_env, "SCALER_LOCK_TIMEOUT": "600", "OMP_NUM_THREADS": "1"}
    jobs = [("b0", SMS, 0), ("b1", TREC, 1), ("b2", SMS, 2), ("b3", TREC, 3), ("b0", TREC, 4)]
    runs = store.root / "runs" / "demo"
    procs: list[subprocess.Popen[str]] = []
    with store.lock():
        for name, data, seed in jobs:
            args = ["branch", "add", "demo", name, "--data", str(data), "--epochs", "1", "--seed", str(seed)]
            procs.append(
                subprocess.Popen(
                    [str(SCALER), *args],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        # A run's log folder appears when its training starts, long after it composed the model.
        _wait_for(
            lambda: runs.is_dir() and len(list(runs.iterdir())) == len(jobs), procs, "every writer to train"
        )
        assert store.resolve("demo") == v2
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = [p.returncode for p, _, _ in results]
    assert sorted(codes) == [0, 0, 0, 0, 1], [err[-1500:] for _, _, err in results]
    [(_, _, refusal)] = [r for r in results if r[0].returncode == 1]
    lines = [line for line in refusal.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "internal error" not in refusal, refusal
    assert "added branch 'b0' too" in lines[0] and "demo" in lines[0]
    assert [job[0] for job, r in zip(jobs, results, strict=True) if r[0].returncode == 1] == ["b0"]

    head = store.get_manifest(store.resolve("demo"))
    assert sorted(head["branches"]) == ["b0", "b1", "b2", "b3", "spam", "topic"]
    chain = history(store, store.resolve("demo"))
    assert [m["version"] for _, m in chain] == [6, 5, 4, 3, 2, 1]  # linear, numbers unique
    rebased = [m["message"] for _, m in chain if "rebased onto" in m["message"]]
    assert len(rebased) == 3  # the first saved on v2; the others were re-applied
    old = store.get_manifest(v2)["branches"]
    for name in ("spam", "topic"):  # untouched, byte for byte
        assert head["branches"][name] == old[name]
    model = compose(store, "demo")
    texts = ["win a free prize now", "what is the capital of france"]
    for name in ("b0", "b1", "b2", "b3"):
        assert len(model.predict(texts, branches=[name])[name]) == 2


def test_a_branch_add_rebases_onto_a_head_that_gained_a_branch(store: ContentStore) -> None:
    v2 = store.resolve("demo")
    first, second = compose(store, "demo"), compose(store, "demo")
    first.add_branch("alpha", _perturbed_branch(["a", "b"], 1))
    second.add_branch("beta", _perturbed_branch(["x", "y", "z"], 2))
    h3 = save_version(store, first, message="add branch alpha")
    h4 = save_version(store, second, message="add branch beta")
    m4 = store.get_manifest(h4)
    assert m4["parent"] == h3 and m4["version"] == 4
    assert m4["message"] == f"add branch beta (rebased onto v3 {h3.short})"
    assert store.reflog("demo")[-1]["reason"] == m4["message"]
    assert sorted(m4["branches"]) == ["alpha", "beta", "spam", "topic"]
    assert m4["branches"]["alpha"] == store.get_manifest(h3)["branches"]["alpha"]
    assert m4["trunk"] == store.get_manifest(v2)["trunk"]
    assert second.origin is not None and second.origin.manifest_hash == v2  # what it was composed from


def test_a_branch_remove_racing_an_add_keeps_both_changes(store: ContentStore) -> None:
    adder, remover = compose(store, "demo"), compose(store, "demo")
    adder.add_branch("alpha", _perturbed_branch(["a", "b"], 1))
    remover.remove_branch("spam")
    save_version(store, adder, message="add branch alpha")
    h = save_version(store, remover, message="remove branch spam")
    assert sorted(store.get_manifest(h)["branches"]) == ["alpha", "topic"]
    # and the other way round: the remove lands first
    adder, remover = compose(store, "demo"), compose(store, "demo")
    adder.add_branch("beta", _perturbed_branch(["a", "b"], 2))
    remover.remove_branch("alpha")
    save_version(store, remover, message="remove branch alpha")
    h = save_version(store, adder, message="add branch beta")
    assert sorted(store.get_manifest(h)["branches"]) == ["beta", "topic"]


def _nudge_trunk(model: Any) -> None:
    with torch.no_grad():
        for p in model.trunk.parameters():
            p.add_(torch.randn_like(p) * 1e-3)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("same-name", "v3 added branch 'alpha' too"),
        ("both-change-one-branch", "v3 changed branch 'spam' too"),
        ("remove-a-changed-branch", "v3 changed branch 'spam' too"),
        ("head-retrained-trunk", "v3 changed the trunk this change was made on"),
        ("this-retrains-trunk", "this change replaces the trunk"),
    ],
)
def test_a_real_conflict_is_refused_in_one_line(store: ContentStore, case: str, reason: str) -> None:
    first, second = compose(store, "demo"), compose(store, "demo")
    if case == "same-name":
        first.add_branch("alpha", _perturbed_branch(["a", "b"], 1))
        second.add_branch("alpha", _perturbed_branch(["a", "b"], 2))
    elif case in ("both-change-one-branch", "remove-a-changed-branch"):
        first.remove_branch("spam")
        first.add_branch("spam", _perturbed_branch(["ham", "spam"], 1))
        if case == "both-change-one-branch":
            second.remove_branch("spam")
            second.add_branch("spam", _perturbed_branch(["ham", "spam"], 2))
        else:
            second.remove_branch("spam")
    elif case == "head-retrained-trunk":
        _nudge_trunk(first)
        second.add_branch("alpha", _perturbed_branch(["a", "b"], 1))
    else:
        first.add_branch("alpha", _perturbed_branch(["a", "b"], 1))
        _nudge_trunk(second)
    h3 = save_version(store, first, message="first")
    manifests = set(store.iter_manifests())
    with pytest.raises(ConflictError) as info:
        save_version(store, second, message="second")
    message = str(info.value)
    assert "\n" not in message and reason in message and f"moved to {h3}" in message
    assert store.resolve("demo") == h3 and set(store.iter_manifests()) == manifests
