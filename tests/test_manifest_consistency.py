"""Manifests that contradict their banks are refused, at compose and by ``verify`` (issue 10 #6).

Each case is a *schema-valid* edit of the real ``demo`` manifest that, before, loaded silently
and changed outputs: labels renamed or reordered, a head plugin swapped, a LoRA ``alpha``
edited, two same-shaped branches' banks or entries swapped, pooling changed, trunk layers
swapped / dropped / repeated, a gating config changed, the base's config.json changed. Every
bank now says in its metadata what it was written for (plugin, config, labels, branch, layer)
and every branch records the trunk it was trained on: composing (or first using the branch)
and ``scaler verify`` both refuse each case with one line naming the field.

Stores written before keep working: banks without the new metadata keys, and branches that
recorded the old (scheme 1) trunk id, still load; re-saving such a model keeps its trunk id.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import _copy_store, _perturb, run_scaler

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.safetensors_bank import read_bank_metadata
from scaler_wizard.errors import ScalerError
from scaler_wizard.manifests import validate_manifest
from scaler_wizard.manifests.facts import legacy_trunk_id, trunk_id
from scaler_wizard.manifests.model import PluginRef, parse_manifest
from scaler_wizard.modeling.bank_checks import head_meta
from scaler_wizard.modeling.compose import compose, new_branch, save_version
from scaler_wizard.modeling.tensor_banks import encode_bank, load_bank_tensors
from scaler_wizard.modeling.verify import verify_version

Manifest = dict[str, Any]
PROBE = ["win a free cruise now", "what is the capital of France?", "see you at lunch"]


@pytest.fixture(scope="module")
def twins_root(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session store plus a branch ``spam2`` shaped exactly like ``spam`` (demo v3)."""
    root = tmp_path_factory.mktemp("twins") / "store"
    _copy_store(session_store, root)
    store = ContentStore.open(root)
    model = compose(store, "demo")
    torch.manual_seed(7)
    branch = new_branch(hidden_size=384, labels=["ham", "spam"])
    _perturb(branch)
    model.add_branch("spam2", branch)
    save_version(store, model, message="add spam2")
    return root


@pytest.fixture
def twins(twins_root: Path, tmp_path: Path) -> ContentStore:
    dst = tmp_path / "twins"
    _copy_store(twins_root, dst)
    return ContentStore.open(dst)


def head_of(store: ContentStore) -> Manifest:
    return copy.deepcopy(store.get_manifest(store.resolve("demo")))


def install(store: ContentStore, manifest: Manifest) -> BankHash:
    with store.lock():
        h = store.put_manifest(manifest)
        store.set_ref("demo", h, expected=store.get_ref("demo"), reason="test: edited manifest")
    return h


def assert_one_line(exc: BaseException, *needles: str) -> None:
    msg = str(exc)
    assert isinstance(exc, ScalerError), f"{type(exc).__name__}: {msg}"
    assert msg and "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


# -- the mutants -------------------------------------------------------------------------------


def swap(a: tuple[Any, ...], b: tuple[Any, ...]) -> Callable[[Manifest, ContentStore], Manifest]:
    def mutate(m: Manifest, _store: ContentStore) -> Manifest:
        def parent(path: tuple[Any, ...]) -> Any:
            obj: Any = m
            for key in path[:-1]:
                obj = obj[key]
            return obj

        pa, pb = parent(a), parent(b)
        pa[a[-1]], pb[b[-1]] = pb[b[-1]], pa[a[-1]]
        return m

    return mutate


def put(path: tuple[Any, ...], value: Any) -> Callable[[Manifest, ContentStore], Manifest]:
    def mutate(m: Manifest, _store: ContentStore) -> Manifest:
        obj: Any = m
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = copy.deepcopy(value(m) if callable(value) else value)
        return m

    return mutate


def base_config(change: dict[str, Any]) -> Callable[[Manifest, ContentStore], Manifest]:
    """Point base.files config.json at an edited copy of the base's config."""

    def mutate(m: Manifest, store: ContentStore) -> Manifest:
        cfg = json.loads(store.verified_path(m["base"]["files"]["config.json"]).read_text())
        cfg.update(change)
        edited = store.root / "tmp" / "edited-config.json"
        edited.parent.mkdir(exist_ok=True)
        edited.write_text(json.dumps(cfg))
        m["base"]["files"]["config.json"] = str(store.put_file(edited))
        return m

    return mutate


@dataclass(frozen=True)
class Mutant:
    id: str
    mutate: Callable[[Manifest, ContentStore], Manifest]
    field: str  # the field the one-line error names, at compose/first use and in verify
    verify_field: str = ""  # where verify reports it, if elsewhere ("" = same)


SPAM, SPAM2 = ("branches", "spam"), ("branches", "spam2")
MUTANTS = [
    Mutant("labels-renamed", put((*SPAM, "labels"), ["ham", "SPAM"]), "branches.spam.labels"),
    Mutant("labels-reordered", put((*SPAM, "labels"), ["spam", "ham"]), "branches.spam.labels"),
    Mutant(
        "head-linear-to-multilabel", put((*SPAM, "head", "plugin"), "multilabel"), "branches.spam.head.plugin"
    ),
    Mutant(
        "head-config-changed", put((*SPAM, "head", "config", "dropout"), 0.5), "branches.spam.head.config"
    ),
    Mutant("lora-alpha-0", put((*SPAM, "strategy", "config", "alpha"), 0.0), "branches.spam.strategy.config"),
    Mutant("head-banks-swapped", swap((*SPAM, "head_bank"), (*SPAM2, "head_bank")), "branches.spam"),
    Mutant("adapter-banks-swapped", swap((*SPAM, "adapter_bank"), (*SPAM2, "adapter_bank")), "branches.spam"),
    Mutant("entries-swapped", swap(SPAM, SPAM2), "branches.spam"),
    Mutant("pooling-mean-to-cls", put(("trunk", "pooling"), "cls"), "branches.spam.trunk"),
    Mutant(
        "trunk-layers-swapped",
        swap(("trunk", "layers", 0), ("trunk", "layers", 1)),
        "trunk.layers[0].bank",
    ),
    Mutant(
        "trunk-layer-dropped",
        put(("trunk", "layers"), lambda m: m["trunk"]["layers"][:1]),
        "branches.spam.trunk",
    ),
    Mutant(
        "trunk-layer-repeated",
        put(("trunk", "layers"), lambda m: [m["trunk"]["layers"][0]] * 2),
        "trunk.layers[1].bank",
    ),
    Mutant(
        "gating-k-2-to-1",
        put(("trunk", "layers", 0, "gating", "config", "k"), 1),
        "trunk.layers[0].gating.config",
    ),
    Mutant("base-architecture-changed", put(("base", "architecture"), "RobertaModel"), "base.architecture"),
    Mutant(
        "base-config-fewer-layers",
        base_config({"num_hidden_layers": 3}),
        "base.bank",
        verify_field="branches.spam.trunk",
    ),
    Mutant(
        "base-config-changed",  # loads, but base.files is part of the trunk id
        base_config({"layer_norm_eps": 1e-5}),
        "branches.spam.trunk",
    ),
]


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_a_manifest_contradicting_its_banks_is_refused(mutant: Mutant, twins: ContentStore) -> None:
    bad = mutant.mutate(head_of(twins), twins)
    validate_manifest(bad)  # schema-valid: only the banks can tell
    h = install(twins, bad)

    with pytest.raises(ScalerError) as info:
        model = compose(twins, "demo")
        model.load_all_branches()
    assert_one_line(info.value, mutant.field)

    failed = [c for c in verify_version(twins, str(h)) if not c.ok]
    where = mutant.verify_field or mutant.field
    assert any(where in f"{c.what}: {c.detail}" for c in failed), failed


def test_the_unchanged_twins_compose_and_verify(twins: ContentStore) -> None:
    """The control: the manifest the mutants start from loads and verifies."""
    model = compose(twins, "demo")
    model.load_all_branches()
    assert sorted(model.branch_names) == ["spam", "spam2", "topic"]
    assert all(c.ok for c in verify_version(twins, str(twins.resolve("demo"))))


@pytest.mark.parametrize("mutant", [MUTANTS[0], MUTANTS[8]], ids=[MUTANTS[0].id, MUTANTS[8].id])
def test_the_cli_refuses_them_in_one_line(mutant: Mutant, twins: ContentStore) -> None:
    install(twins, mutant.mutate(head_of(twins), twins))
    env = dict(os.environ, SCALER_HOME=str(twins.root), HF_HUB_OFFLINE="1")
    env.pop("SCALER_DEBUG", None)
    for argv in (["predict", "demo", "-b", "spam", "win a free cruise"], ["verify", "demo"]):
        proc = run_scaler(*argv, env=env)
        assert proc.returncode == 1, (argv, proc.stdout, proc.stderr)
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert mutant.field in proc.stderr, proc.stderr


# -- verify load-checks banks --------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors",
    [
        {"linear.weight": torch.zeros(3, 384), "linear.bias": torch.zeros(3)},  # 3 classes, not 2
        {
            "linear.weight": torch.zeros(2, 384, dtype=torch.int32),
            "linear.bias": torch.zeros(2, dtype=torch.int32),
        },
        {"linear.weight": torch.zeros(2, 384)},  # bias missing
    ],
    ids=["wrong-shape", "integer-dtype", "missing-tensor"],
)
def test_verify_load_checks_each_bank(twins: ContentStore, tensors: dict[str, torch.Tensor]) -> None:
    """A head bank that describes itself correctly but does not fit: verify says so, as compose does."""
    m = head_of(twins)
    entry = m["branches"]["spam"]
    bank = encode_bank(
        tensors,
        kind="head",
        metadata={**head_meta("spam", PluginRef.from_dict(entry["head"]), entry["labels"]), "meta": "2"},
    )
    entry["head_bank"] = str(twins.put_bytes(bank.data))
    h = install(twins, m)
    failed = [c for c in verify_version(twins, str(h)) if not c.ok]
    assert [c.what for c in failed] == ["branches.spam.head_bank"], failed
    with pytest.raises(ScalerError) as info:
        compose(twins, "demo").branch("spam")
    assert_one_line(info.value, "branches.spam.head_bank")


# -- trunk ids -----------------------------------------------------------------------------------


def test_trunk_id_covers_base_files(twins: ContentStore) -> None:
    m = head_of(twins)
    other = copy.deepcopy(m)
    other["base"]["files"]["config.json"] = other["base"]["files"]["vocab.txt"]
    assert trunk_id(m) != trunk_id(other)
    assert legacy_trunk_id(m) == legacy_trunk_id(other)  # the old scheme could not tell them apart
    assert m["branches"]["spam"]["trunk"] == trunk_id(m)  # branches record the new scheme


def test_a_stale_branch_still_loads(twins: ContentStore) -> None:
    """``train --allow-stale-branches`` leaves a branch on the old trunk on purpose: it says so."""
    m = head_of(twins)
    m["branches"]["spam"]["trunk"] = "sha256:" + "1" * 64
    install(twins, m)
    with pytest.raises(ScalerError, match="branches.spam.trunk"):
        compose(twins, "demo").branch("spam")
    m["branches"]["spam"]["provenance"] = {
        "stale": {"since_version": 4, "trained_on_trunk": "sha256:" + "1" * 64}
    }
    install(twins, m)
    compose(twins, "demo").branch("spam")


# -- stores written before -------------------------------------------------------------------------

LEGACY_KEYS = {"trunk-layer": ("gating",), "adapter": ("strategy", "branch"), "head": ("head", "labels")}


def make_legacy(store: ContentStore) -> Manifest:
    """Rewrite demo's head version as older code wrote it: banks with only the old metadata
    keys, branches recording the scheme-1 trunk id. Returns the new manifest."""

    def legacy(h: str) -> str:
        path = store.verified_path(h)
        meta = read_bank_metadata(path)
        kind = meta["scaler.kind"]
        old = {
            k: json.loads(meta[f"scaler.{k}"]) if k == "labels" else meta[f"scaler.{k}"]
            for k in LEGACY_KEYS[kind]
        }
        return str(store.put_bytes(encode_bank(load_bank_tensors(path), kind=kind, metadata=old).data))

    m = head_of(store)
    for layer in m["trunk"]["layers"]:
        layer["bank"] = legacy(layer["bank"])
    for entry in m["branches"].values():
        entry["adapter_bank"], entry["head_bank"] = legacy(entry["adapter_bank"]), legacy(entry["head_bank"])
    for entry in m["branches"].values():
        entry["trunk"] = legacy_trunk_id(m)
    install(store, m)
    return m


@torch.no_grad()
def logits(store: ContentStore, spec: str = "demo") -> dict[str, torch.Tensor]:
    model = compose(store, spec)
    batch = model.base.tokenize(PROBE)
    return dict(model(**batch, branches=model.branch_names).logits)


def test_old_banks_and_old_trunk_ids_still_load(twins: ContentStore) -> None:
    before = logits(twins)
    m = make_legacy(twins)
    assert "scaler.meta" not in read_bank_metadata(twins.verified_path(m["branches"]["spam"]["head_bank"]))
    after = logits(twins)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(c.ok for c in verify_version(twins, str(twins.resolve("demo"))))


def test_old_banks_still_have_their_old_keys_checked(twins: ContentStore) -> None:
    m = make_legacy(twins)
    m["branches"]["spam"]["labels"] = ["spam", "ham"]
    install(twins, m)
    with pytest.raises(ScalerError) as info:
        compose(twins, "demo").branch("spam")
    assert_one_line(info.value, "branches.spam.labels")


def test_a_new_bank_must_carry_every_key(twins: ContentStore) -> None:
    m = head_of(twins)
    entry = m["branches"]["spam"]
    path = twins.verified_path(entry["head_bank"])
    meta = {
        k.removeprefix("scaler."): v for k, v in read_bank_metadata(path).items() if k.startswith("scaler.")
    }
    for key in ("kind", "format", "branch"):
        meta.pop(key)
    entry["head_bank"] = str(
        twins.put_bytes(encode_bank(load_bank_tensors(path), kind="head", metadata=meta).data)
    )
    install(twins, m)
    with pytest.raises(ScalerError) as info:
        compose(twins, "demo").branch("spam")
    assert_one_line(info.value, "branches.spam.head_bank", "lacks its scaler.branch")


def test_resaving_an_old_model_keeps_its_trunk(twins: ContentStore) -> None:
    """A branch added to a model written by older code: the trunk's banks (and id) are kept,
    so the old branches, which recorded the old trunk id, still load next to the new one."""
    m = make_legacy(twins)
    model = compose(twins, "demo")
    torch.manual_seed(3)
    branch = new_branch(hidden_size=384, labels=["a", "b", "c"])
    model.add_branch("fresh", branch)
    save_version(twins, model, message="add fresh")
    new = head_of(twins)
    assert [lay["bank"] for lay in new["trunk"]["layers"]] == [lay["bank"] for lay in m["trunk"]["layers"]]
    assert new["branches"]["fresh"]["trunk"] == trunk_id(new)
    assert new["branches"]["spam"]["trunk"] == legacy_trunk_id(new)
    compose(twins, "demo").load_all_branches()


def test_a_config_with_extra_weights_in_the_bank_is_refused_by_load_base(twins: ContentStore) -> None:
    """Regression for ``unexpected_keys`` being ignored: 3 layers of config, 6 of weights.
    ``verify`` loads the base too, so a model with no branch to notice it is caught as well."""
    from scaler_wizard.modeling.base_encoder import load_base

    m = base_config({"num_hidden_layers": 3})(head_of(twins), twins)
    with pytest.raises(ScalerError) as info:
        load_base(twins, m["base"])
    assert_one_line(info.value, "base.bank", "unexpected tensor", "encoder.layer.3")
    m["branches"] = {}
    h = install(twins, m)
    assert all(c.ok for c in verify_version(twins, str(h)))  # without load_base: hashes and banks only
    failed = [c for c in verify_version(twins, str(h), load_base=True) if not c.ok]
    assert [c.what for c in failed] == ["base.bank"] and "unexpected tensor" in failed[0].detail, failed


def test_pull_into_accepts_a_branch_recorded_with_the_old_trunk_id(twins: ContentStore) -> None:
    """``pull --into`` compares a remote branch's recorded trunk with the local one under both
    schemes: a model published before scheme 2 can still graft onto the same trunk."""
    from scaler_wizard.banks.store import canonical_json
    from scaler_wizard.errors import ConflictError
    from scaler_wizard.remote import sync as hub
    from scaler_wizard.versions.history import find_version

    with twins.lock():
        twins.set_ref("local", find_version(twins, "demo", "2"), expected=None, reason="test")
    remote = head_of(twins)  # v3: spam, topic, spam2, on the same trunk as v2
    source = hub._Remote("me/demo@main", {}, lambda _paths: {})

    def plan(recorded: str) -> Any:
        remote["branches"]["spam2"]["trunk"] = recorded
        return hub._plan(
            twins,
            parse_manifest(remote),
            BankHash.of_bytes(canonical_json(remote)),
            source,
            as_name=None,
            branches=["spam2"],
            into="local",
        )

    for recorded in (trunk_id(remote), legacy_trunk_id(remote)):
        assert sorted(plan(recorded).target.branches) == ["spam", "spam2", "topic"]
    with pytest.raises(ConflictError, match="spam2"):
        plan("sha256:" + "2" * 64)


def test_a_trunk_changed_in_memory_marks_the_untrained_branches_stale(twins: ContentStore) -> None:
    """Saving a model whose trunk was changed (library API) without retraining its branches:
    they are marked stale, as `scaler train --allow-stale-branches` does, and still load."""
    model = compose(twins, "demo")
    model.branch("spam")  # one loaded, the others not: both kinds keep their old trunk id
    with torch.no_grad():
        for p in model.trunk.parameters():
            p.add_(0.01)
    fresh = new_branch(hidden_size=384, labels=["x", "y"])
    model.add_branch("fresh", fresh)
    save_version(twins, model, message="trunk edited")
    m = head_of(twins)
    stale = {n for n, e in m["branches"].items() if (e.get("provenance") or {}).get("stale")}
    assert stale == {"spam", "spam2", "topic"}
    assert m["branches"]["fresh"]["trunk"] == trunk_id(m)
    assert m["branches"]["spam"]["provenance"]["stale"]["trained_on_trunk"] != trunk_id(m)
    compose(twins, "demo").load_all_branches()
