"""Errors: one module holds them all, and each carries fields a caller can read.

Every error is provoked through the real API (a real store, real files), then its fields are
read; its message stays the one line it always was.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, tamper_object

import scaler_wizard.errors as errors
from scaler_wizard import compose, init_model, new_trunk_layer
from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import (
    BankNotFoundError,
    BranchNotFoundError,
    CheckpointError,
    ConflictError,
    DataError,
    IntegrityError,
    ManifestError,
    ModelNotFoundError,
    PluginError,
    ScalerError,
    StoreError,
    TrainConfigError,
)
from scaler_wizard.manifests import validate_manifest
from scaler_wizard.names import validate_name
from scaler_wizard.plugin_manager import get_registry
from scaler_wizard.training.checkpoint import load_checkpoint
from scaler_wizard.training.config import TrainConfig, load_config_file
from scaler_wizard.training.data import load_labelled


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def demo_manifest(store: ContentStore) -> dict[str, Any]:
    return store.get_manifest(store.resolve("demo"))


# -- one module ---------------------------------------------------------------------------


def test_every_error_class_of_the_package_is_defined_in_scaler_wizard_errors() -> None:
    sources = [
        p
        for folder in ("core", "banks", "manifests", "cli", "plugins")
        for p in (REPO / folder).rglob("*.py")
    ]
    error_names = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    elsewhere = []
    for path in sources:
        if path == REPO / "core" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & error_names or node.name.endswith("Error"):
                    elsewhere.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert elsewhere == []


def test_errors_moved_to_the_kernel_are_the_same_classes_at_their_old_names() -> None:
    import scaler_wizard.banks.hub as hub
    import scaler_wizard.training.checkpoint as checkpoint
    import scaler_wizard.training.config as config

    assert checkpoint.CheckpointError is errors.CheckpointError
    assert config.TrainConfigError is errors.TrainConfigError
    assert hub.HubError is errors.HubError
    assert all(issubclass(getattr(errors, n), ScalerError) for n in errors.__all__ if n.endswith("Error"))


# -- fields, from the real API ---------------------------------------------------------------


def test_model_not_found_names_the_model_and_what_exists(store: ContentStore) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        compose(store, "dmeo")
    assert info.value.name == "dmeo"
    assert info.value.available == ("demo",)
    assert one_line(info.value) == f"no model named 'dmeo' in {store.root} (have: demo)"


def test_branch_not_found_names_the_branch_the_model_and_its_branches(store: ContentStore) -> None:
    model = compose(store, "demo")
    with pytest.raises(BranchNotFoundError) as info:
        model.branch("spma")
    assert (info.value.branch, info.value.model, info.value.available) == ("spma", "demo", ("spam", "topic"))
    assert one_line(info.value) == "no branch named 'spma' (have: spam, topic)"
    with pytest.raises(BranchNotFoundError) as removed:
        model.remove_branch("nope")
    assert removed.value.branch == "nope" and removed.value.available == ("spam", "topic")


def test_bank_not_found_names_the_bank(store: ContentStore) -> None:
    bank = demo_manifest(store)["trunk"]["layers"][0]["bank"]
    store.object_path(bank).unlink()
    with pytest.raises(BankNotFoundError) as info:
        compose(store, "demo")
    assert info.value.bank == bank
    assert one_line(info.value).startswith(f"trunk.layers[0].bank: bank {bank} is missing")
    with pytest.raises(BankNotFoundError) as read:
        store.verified_path(bank)
    assert read.value.bank == bank


def test_integrity_error_names_the_bank_and_its_file(store: ContentStore) -> None:
    bank = demo_manifest(store)["trunk"]["layers"][1]["bank"]
    path = store.object_path(bank)
    tamper_object(path)
    with pytest.raises(IntegrityError) as info:
        store.verified_path(bank, trust_cache=False)
    assert info.value.bank == bank
    assert info.value.path == path
    assert isinstance(info.value, StoreError)
    assert f"bank {bank} is corrupt or tampered" in one_line(info.value)


def test_integrity_error_for_bytes_that_are_not_the_bank_named(store: ContentStore) -> None:
    expected = demo_manifest(store)["trunk"]["layers"][0]["bank"]
    with pytest.raises(IntegrityError) as info:
        store.put_bytes(b"not the bank", expected=expected)
    assert info.value.bank == expected and info.value.path is None


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m["branches"]["spam"].__setitem__("labels", []), "branches.spam.labels"),
        (lambda m: m.__setitem__("version", "two"), "version"),
        (lambda m: m["trunk"].__setitem__("hidden_size", 385), "trunk.hidden_size"),
        (lambda m: m.__setitem__("parent", None), "parent"),
        (lambda m: m["branches"]["spam"]["strategy"].__setitem__("config", {"x": float("nan")}), None),
    ],
    ids=["too-short", "type", "semantics", "parent", "not-json"],
)
def test_manifest_error_names_the_field_as_a_json_path(
    store: ContentStore, edit: Any, field: str | None
) -> None:
    manifest = demo_manifest(store)
    edit(manifest)
    with pytest.raises(ManifestError) as info:
        validate_manifest(manifest)
    text = one_line(info.value)
    if field is None:  # the NaN: the path of the value
        field = "branches.spam.strategy.config.x"
    assert info.value.field == field
    assert f": {field}: " in text


def test_manifest_error_for_a_document_that_is_not_an_object() -> None:
    with pytest.raises(ManifestError) as info:
        validate_manifest([])
    assert info.value.field == "(top level)"


def test_plugin_error_names_the_plugin() -> None:
    with pytest.raises(PluginError) as unknown:
        new_trunk_layer(hidden_size=384, gating="round-robin")
    assert unknown.value.plugin == "round-robin"
    assert one_line(unknown.value) == "trunk.gating: unknown gating 'round-robin' (have: switch, topk)"
    with pytest.raises(PluginError) as config:
        new_trunk_layer(hidden_size=384, gating="topk", gating_config={"k": 0})
    assert config.value.plugin == "topk"
    assert one_line(config.value).startswith("trunk.gating.config.k: ")
    with pytest.raises(PluginError) as missing:
        get_registry().get(
            "head", "cosine", provider={"distribution": "scaler-wizard-extras", "version": "0.2.0"}
        )
    assert missing.value.plugin == "cosine"


def test_conflict_error_names_the_model(store: ContentStore) -> None:
    with pytest.raises(ConflictError) as info:
        init_model(store, "demo")
    assert info.value.model == "demo"
    assert one_line(info.value) == f"model 'demo' already exists in {store.root}"
    with store.lock(), pytest.raises(ConflictError) as moved:
        store.set_ref("demo", store.resolve("demo"), expected=None, reason="test")
    assert moved.value.model == "demo"


def test_data_error_names_the_file(tmp_path: Path) -> None:
    one_class = tmp_path / "one-class.csv"
    one_class.write_text("text,label\nhello,a\nworld,a\n")
    with pytest.raises(DataError) as info:
        load_labelled(one_class)
    assert info.value.path == one_class
    assert one_line(info.value).startswith(f"{one_class}: label column 'label' has only one class")
    with pytest.raises(DataError) as missing:
        load_labelled(tmp_path / "absent.jsonl")
    assert missing.value.path == tmp_path / "absent.jsonl"


def test_checkpoint_error_names_the_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "step-00000010"
    folder.mkdir()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    assert info.value.path == folder
    assert one_line(info.value).startswith(f"checkpoint {folder} is unreadable")


def test_train_config_error_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError) as info:
        TrainConfig(eval_split=1.5)
    assert info.value.field == "eval_split"
    assert one_line(info.value) == "eval_split must be between 0 and 1, got 1.5"
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"branches": {"spam": {"data": "x.csv", "colour": "red"}}}))
    with pytest.raises(TrainConfigError) as key:
        load_config_file(config)
    assert key.value.field == "branches.spam.colour"


def test_an_invalid_name_is_a_store_error_from_the_one_name_check(store: ContentStore) -> None:
    with pytest.raises(StoreError, match="Windows reserves it"):
        init_model(store, "con")
    with pytest.raises(StoreError, match=r"'\.' cannot name a module"):
        validate_name("a.b", what="branch")


def test_fields_survive_a_copy_and_unknown_fields_are_empty() -> None:
    """Exceptions cross processes (accelerate) by their reduce: the fields go with them."""
    exc = BranchNotFoundError("no branch named 'x'", branch="x", model="demo", available=["b", "a"])
    again = copy.copy(exc)
    assert (again.branch, again.model, again.available, str(again)) == ("x", "demo", ("a", "b"), str(exc))
    bare = ModelNotFoundError("no model named 'x'")
    assert bare.name is None and bare.available == ()
