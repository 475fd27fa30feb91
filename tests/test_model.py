"""The composed model: one trunk pass for any number of branches, lazy branches, save/compose."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import BranchNotFoundError, ScalerError
from scaler_wizard.modeling.compose import compose, new_branch, save_version
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.moe import MoELayer

TEXTS = [
    "WINNER!! Claim your free prize now, text WIN to 80082",
    "Are we still on for lunch tomorrow?",
    "How far is it from Denver to Aspen?",
    "Who wrote the novel Moby Dick?",
    "ok",
]
SPAM = ["ham", "spam"]
TOPIC = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere (a fresh LoRA B is zero), so outputs differ per branch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def add_branches(model: ScalerModel, n: int, *, prefix: str = "extra") -> list[str]:
    names = []
    for i in range(n):
        branch = new_branch(hidden_size=384, labels=[f"l{j}" for j in range(2 + i % 3)])
        perturb(branch, seed=100 + i)
        model.add_branch(f"{prefix}{i}", branch)
        names.append(f"{prefix}{i}")
    return names


def bank_entries(manifest: dict) -> dict[str, tuple[str, str]]:
    return {n: (e["adapter_bank"], e["head_bank"]) for n, e in manifest["branches"].items()}


def head_manifest(store: ContentStore, name: str = "demo") -> dict:
    return store.get_manifest(store.resolve(name))


# -- one trunk pass ------------------------------------------------------------------------


class CallCounter:
    def __init__(self, model: ScalerModel) -> None:
        self.trunk = 0
        self.layers = 0
        model.trunk.register_forward_hook(self._trunk)
        for layer in model.trunk.layers:
            assert isinstance(layer, MoELayer)
            layer.register_forward_hook(self._layer)

    def _trunk(self, *_: object) -> None:
        self.trunk += 1

    def _layer(self, *_: object) -> None:
        self.layers += 1


@pytest.mark.parametrize("extra", [0, 10])
def test_trunk_runs_once_whatever_the_number_of_branches(store: ContentStore, extra: int) -> None:
    model = compose(store, "demo")
    add_branches(model, extra)
    names = model.branch_names
    assert len(names) == 2 + extra
    counter = CallCounter(model)
    n_layers = len(model.trunk.layers)
    batch = model.base.tokenize(TEXTS)

    with torch.no_grad():
        out = model(**batch)  # every branch
    assert set(out.logits) == set(names)
    assert counter.trunk == 1
    assert counter.layers == n_layers

    # predict: one trunk pass per batch of texts, not per branch.
    counter.trunk = 0
    preds = model.predict(TEXTS, names)
    assert counter.trunk == 1
    assert all(len(preds[n]) == len(TEXTS) for n in names)
    counter.trunk = 0
    model.predict(TEXTS, names, batch_size=2)
    assert counter.trunk == 3

    # The per-branch logits are the branch applied to that single shared pass.
    trunk = model.encode(**batch)
    for n in names:
        torch.testing.assert_close(out.logits[n], model.branch(n)(trunk))


def test_forward_with_a_misspelt_branch_fails_before_computing(store: ContentStore) -> None:
    model = compose(store, "demo")
    counter = CallCounter(model)
    batch = model.base.tokenize(TEXTS[:1])
    with pytest.raises(BranchNotFoundError, match=r"'spma'.*have: spam, topic"):
        model(**batch, branches=["spam", "spma"])
    assert counter.trunk == 0


# -- save, then compose in a new process -----------------------------------------------------

ROUND_TRIP = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose

    store_path, out_path, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    model = compose(ContentStore.open(store_path), "demo")
    batch = model.base.tokenize(texts)
    with torch.no_grad():
        out = model(**batch)
    save_file({n: t.contiguous() for n, t in out.logits.items()}, out_path,
              metadata={"version": str(model.origin.manifest.version)})
    """
)


@pytest.mark.slow
def test_saved_model_gives_identical_logits_in_a_new_process(
    store: ContentStore, store_path: Path, tmp_path: Path
) -> None:
    import json

    model = compose(store, "demo")
    perturb(model.trunk, seed=1)  # the trunk changed too, not only the branches
    add_branches(model, 2, prefix="new")
    model.branch("spam")  # loaded but unchanged; "topic" stays unloaded
    h = save_version(store, model, message="two more branches")
    assert model.origin is not None and model.origin.manifest_hash == h

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels, same reduction order as the child process
    try:
        batch = model.base.tokenize(TEXTS)
        with torch.no_grad():
            expected = model(**batch).logits
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "logits.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, str(store_path), str(out), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = load_file(out)
    assert set(got) == {"spam", "topic", "new0", "new1"} == set(expected)
    for name, logits in expected.items():
        assert torch.equal(got[name], logits), name


def test_compose_again_in_process_gives_identical_logits(store: ContentStore) -> None:
    model = compose(store, "demo")
    perturb(model.trunk, seed=2)
    add_branches(model, 1)
    save_version(store, model, message="x")
    batch = model.base.tokenize(TEXTS)
    again = compose(store, "demo")
    with torch.no_grad():
        a, b = model(**batch).logits, again(**batch).logits
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- lazy branches -----------------------------------------------------------------------------


def test_branches_load_only_when_used(store: ContentStore) -> None:
    model = compose(store, "demo")
    assert model.branch_names == ["spam", "topic"]
    assert not model.is_loaded("spam") and not model.is_loaded("topic")
    model.predict(TEXTS[:2], ["spam"])
    assert model.is_loaded("spam") and not model.is_loaded("topic")
    assert model.branch_names == ["spam", "topic"]
    model.load_all_branches()
    assert model.is_loaded("topic")


def test_branches_follow_the_model_mode_and_order_whenever_they_load(store: ContentStore) -> None:
    model = compose(store, "demo")
    assert not model.training
    model.branch("topic")  # loading out of order does not reorder the names
    assert model.branch_names == ["spam", "topic"]
    fresh = new_branch(hidden_size=384, labels=SPAM)
    assert fresh.training
    model.add_branch("fresh", fresh)
    assert not model.branch("fresh").training  # an eval model gets an eval branch: no dropout
    model.train()
    assert model.branch("spam").training  # lazily loaded while training: trains
    assert not model.base.model.training  # the frozen base never does
    assert model.branch_names == ["spam", "topic", "fresh"]
    model.remove_branch("topic")
    assert model.branch_names == ["spam", "fresh"]


def test_a_deleted_bank_of_an_unused_branch_matters_only_when_that_branch_is_used(
    store: ContentStore,
) -> None:
    bank = head_manifest(store)["branches"]["topic"]["adapter_bank"]
    store.object_path(bank).unlink()

    model = compose(store, "demo")  # composing reads no branch bank
    preds = model.predict(TEXTS[:2], ["spam"])
    assert [p.label in SPAM for p in preds["spam"]] == [True, True]
    with pytest.raises(ScalerError) as info:
        model.branch("topic")
    assert bank in str(info.value)
    assert "branches.topic.adapter_bank" in str(info.value)
    assert not model.is_loaded("topic")
    with pytest.raises(ScalerError, match=bank):
        model.predict(TEXTS[:1])  # all branches


# -- predictions -------------------------------------------------------------------------------


def test_predict_returns_labels_of_the_branch_and_probabilities_summing_to_one(
    store: ContentStore,
) -> None:
    model = compose(store, "demo")
    preds = model.predict(TEXTS, ["spam", "topic"])
    for name, labels in (("spam", SPAM), ("topic", TOPIC)):
        assert len(preds[name]) == len(TEXTS)
        for p in preds[name]:
            assert p.label in labels
            assert list(p.scores) == labels
            assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-5)
            assert p.score == max(p.scores.values()) == p.scores[p.label]
    assert model.predict([], ["spam"]) == {"spam": []}


def test_multilabel_head_predicts_lists(store: ContentStore) -> None:
    model = compose(store, "demo")
    labels = ["urgent", "billing", "social"]
    branch = new_branch(hidden_size=384, labels=labels, head="multilabel", head_config={"threshold": 0.5})
    with torch.no_grad():  # known answer: urgent and social on, billing off, for any input
        branch.head.linear.weight.zero_()
        branch.head.linear.bias.copy_(torch.tensor([4.0, -4.0, 2.0]))
    model.add_branch("tags", branch)
    preds = model.predict(TEXTS[:3], ["tags", "spam"])["tags"]
    for p in preds:
        assert p.label == ["urgent", "social"]
        assert set(p.scores) == set(labels)
        assert p.scores["billing"] < 0.5 <= p.scores["social"]
    # It survives a save and a fresh compose.
    save_version(store, model, message="add tags")
    again = compose(store, "demo")
    assert head_manifest(store)["branches"]["tags"]["head"]["plugin"] == "multilabel"
    assert [p.label for p in again.predict(TEXTS[:2], ["tags"])["tags"]] == [["urgent", "social"]] * 2


# -- versions keep the banks of what did not change ----------------------------------------------


@pytest.mark.parametrize("load_kept", [False, True])
def test_remove_branch_keeps_the_other_banks(store: ContentStore, load_kept: bool) -> None:
    before_hash = str(store.resolve("demo"))
    before = head_manifest(store)
    model = compose(store, "demo")
    if load_kept:
        model.predict(TEXTS[:1], ["topic"])  # loaded: its banks are re-encoded on save
    model.remove_branch("spam")
    assert model.branch_names == ["topic"]
    with pytest.raises(BranchNotFoundError):
        model.remove_branch("spam")
    h = save_version(store, model, message="remove spam")
    after = store.get_manifest(h)
    assert after["version"] == before["version"] + 1
    assert after["parent"] == before_hash
    assert bank_entries(after) == {"topic": bank_entries(before)["topic"]}
    assert after["branches"]["topic"] == before["branches"]["topic"]
    assert [la["bank"] for la in after["trunk"]["layers"]] == [la["bank"] for la in before["trunk"]["layers"]]
    # The removed branch's banks stay in the store: the old version still composes.
    for bank in bank_entries(before)["spam"]:
        assert store.has(bank)
    old = compose(store, "demo@2")
    assert old.branch_names == ["spam", "topic"]
    assert old.predict(TEXTS[:1], ["spam"])["spam"][0].label in SPAM


def test_unchanged_branches_keep_their_bank_hashes_across_versions(store: ContentStore) -> None:
    v2 = head_manifest(store)
    model = compose(store, "demo")
    model.predict(TEXTS[:2])  # loads both existing branches
    add_branches(model, 1, prefix="intent")
    v3 = store.get_manifest(save_version(store, model, message="add intent0"))
    assert v3["version"] == 3
    for name in ("spam", "topic"):
        assert bank_entries(v3)[name] == bank_entries(v2)[name]
    assert v3["trunk"] == v2["trunk"]
    assert v3["base"] == v2["base"]

    # Change one branch: only its banks change.
    model = compose(store, "demo")
    perturb(model.branch("topic").adapter, seed=5)
    v4 = store.get_manifest(save_version(store, model, message="tune topic"))
    assert bank_entries(v4)["spam"] == bank_entries(v3)["spam"]
    assert bank_entries(v4)["intent0"] == bank_entries(v3)["intent0"]
    assert bank_entries(v4)["topic"][0] != bank_entries(v3)["topic"][0]  # adapter changed
    assert bank_entries(v4)["topic"][1] == bank_entries(v3)["topic"][1]  # head did not


def test_a_stale_model_is_rebased_or_refused_never_overwrites(store: ContentStore) -> None:
    from scaler_wizard.errors import ConflictError

    first = compose(store, "demo")
    second = compose(store, "demo")
    third = compose(store, "demo")
    add_branches(first, 1, prefix="a")
    save_version(store, first, message="a")
    # Another branch on the same trunk: re-applied onto the new head, nothing lost.
    add_branches(second, 1, prefix="b")
    save_version(store, second, message="b")
    assert set(head_manifest(store)["branches"]) == {"spam", "topic", "a0", "b0"}
    # The same name as a branch added since: a real conflict, refused in one line.
    add_branches(third, 1, prefix="a")
    with pytest.raises(ConflictError) as info:
        save_version(store, third, message="a again")
    assert "\n" not in str(info.value) and "a0" in str(info.value)
    assert set(head_manifest(store)["branches"]) == {"spam", "topic", "a0", "b0"}
