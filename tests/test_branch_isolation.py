"""No branch can change another branch's outputs (issue 10, item 2 and its property test).

A model with two pooled ``lora`` branches (spam, topic) and two in-encoder ``peft-lora``
branches (intent, qa; random non-zero LoRA weights, different target modules) that share one
base: whatever branches are loaded, in whatever order, and predicted together, each branch's
logits are ``torch.equal`` to computing it alone on a freshly composed model. A hostile PEFT
bank (a PiSSA init, which rewrites the base it is loaded on) is refused and changes nothing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import _copy_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.store import TREE_FORMAT, canonical_json
from scaler_wizard.errors import IntegrityError
from scaler_wizard.modeling.compose import compose, new_branch, save_version

# different lengths, so padding and attention masks matter
TEXTS = [
    "Free entry in a weekly competition, text WIN now to claim",
    "Who wrote Hamlet?",
    "ok",
    "see you at 5",
]
GOOD = ("spam", "topic", "intent", "qa")


@pytest.fixture(scope="module")
def isolation_store(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> ContentStore:
    root = tmp_path_factory.mktemp("isolation") / "store"
    _copy_store(session_store, root)
    store = ContentStore.open(root)
    model = compose(store, "demo")
    model.add_branch("intent", new_branch(hidden_size=384, labels=["a", "b", "c"], strategy="peft-lora"))
    qa = new_branch(
        hidden_size=384,
        labels=["yes", "no"],
        strategy="peft-lora",
        strategy_config={"rank": 4, "target_modules": ["key", "dense"]},
    )
    model.add_branch("qa", qa)
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in model.base.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    save_version(store, model, message="add intent and qa")
    return store


@pytest.fixture(scope="module")
def batch(isolation_store: ContentStore) -> dict[str, torch.Tensor]:
    tokenized: dict[str, torch.Tensor] = compose(isolation_store, "demo").base.tokenize(TEXTS)
    return tokenized


@pytest.fixture(scope="module")
def alone(isolation_store: ContentStore, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each branch computed alone, on its own freshly composed model."""
    out = {}
    for name in GOOD:
        with torch.no_grad():
            out[name] = compose(isolation_store, "demo")(**batch, branches=[name]).logits[name]
    return out


def test_the_branches_differ_so_the_checks_below_can_fail(alone: dict[str, torch.Tensor]) -> None:
    assert alone["intent"].shape == (len(TEXTS), 3) and alone["qa"].shape == (len(TEXTS), 2)
    for name, logits in alone.items():
        assert torch.isfinite(logits).all() and logits.abs().sum() > 0, name


@pytest.fixture(scope="module")
def with_evil(isolation_store: ContentStore) -> str:
    """The model plus ``evil``, a hostile peft-lora branch (see ``_with_pissa_branch``)."""
    return _with_pissa_branch(isolation_store)


subsets = st.lists(st.sampled_from((*GOOD, "evil")), min_size=1, max_size=len(GOOD) + 1, unique=True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(load_order=subsets, data=st.data())
def test_any_set_of_branches_predicts_each_as_it_would_alone(
    isolation_store: ContentStore,
    with_evil: str,
    batch: dict[str, torch.Tensor],
    alone: dict[str, torch.Tensor],
    load_order: list[str],
    data: st.DataObject,
) -> None:
    """Load a set of branches in any order, predict them together (in any order): each branch's
    logits are torch.equal to computing it alone on a fresh compose. A hostile branch among
    them is refused when loaded and changes nothing."""
    model = compose(isolation_store, with_evil)
    for name in load_order:
        if name == "evil":
            with pytest.raises(IntegrityError, match="init_lora_weights"):
                model.branch(name)
        else:
            model.branch(name)
    good = [n for n in load_order if n != "evil"]
    if not good:
        return
    predict_order = data.draw(st.permutations(good), label="predict_order")
    with torch.no_grad():
        together = model(**batch, branches=predict_order).logits
        again = model(**batch, branches=[predict_order[-1]]).logits  # then one alone, same model
    for name in good:
        assert torch.equal(together[name], alone[name]), name
    assert torch.equal(again[predict_order[-1]], alone[predict_order[-1]])


def _with_pissa_branch(store: ContentStore) -> str:
    """An (unreferenced) version adding ``evil``: intent's bank with ``init_lora_weights: pissa``,
    written as an attacker would (objects + tree object, no checks)."""
    head = store.resolve("demo")
    manifest = copy.deepcopy(store.get_manifest(head))
    entry = copy.deepcopy(manifest["branches"]["intent"])
    files = {rel: store.read_bytes(h) for rel, h in store.tree_members(entry["adapter_bank"]).items()}
    config = json.loads(files["adapter_config.json"])
    config["init_lora_weights"] = "pissa"
    files["adapter_config.json"] = json.dumps(config).encode()
    listing = {rel: str(store.put_bytes(data)) for rel, data in files.items()}
    tree = {"format": TREE_FORMAT, "kind": "adapter", "layout": "peft", "files": listing}
    entry["adapter_bank"] = str(store.put_bytes(canonical_json(tree)))
    manifest["branches"] = {"evil": entry, **manifest["branches"]}  # loaded first, then the rest
    manifest["parent"] = str(head)
    manifest["version"] = int(manifest["version"]) + 1
    return str(store.put_manifest(manifest))


def _base_weights(model: Any) -> dict[str, torch.Tensor]:
    return {
        n.replace(".base_layer.", "."): p.detach().clone()
        for n, p in model.base.model.named_parameters()
        if "lora_" not in n
    }


def test_loading_every_branch_leaves_every_other_branch_unchanged_and_a_hostile_one_is_refused(
    isolation_store: ContentStore,
    with_evil: str,
    batch: dict[str, torch.Tensor],
    alone: dict[str, torch.Tensor],
) -> None:
    model = compose(isolation_store, with_evil)
    assert model.branch_names[0] == "evil"
    base_before = _base_weights(model)
    seen: dict[str, torch.Tensor] = {}
    for name in model.branch_names:
        if name == "evil":
            with pytest.raises(IntegrityError, match="init_lora_weights") as info:
                model.branch(name)
            assert "\n" not in str(info.value)
            assert not model.is_loaded("evil")
        else:
            model.branch(name)
            with torch.no_grad():
                seen[name] = model(**batch, branches=[name]).logits[name]
        with torch.no_grad():  # every branch loaded so far still gives what it gave
            now = model(**batch, branches=list(seen)).logits if seen else {}
        for other, logits in seen.items():
            assert torch.equal(now[other], logits), (name, other)
    after = _base_weights(model)
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in base_before)
    for name in GOOD:
        assert torch.equal(seen[name], alone[name]), name
