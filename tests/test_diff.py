"""``scaler diff A B`` (issue 10, item 20): branches added / removed / changed, banks, plugin
configs and metrics between two versions, for people and (``--json``) for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_scaler

from scaler_wizard.banks import ContentStore
from scaler_wizard.versions.history import resolve_version


@pytest.fixture
def versions(store: ContentStore) -> dict[str, Any]:
    """demo v3: + trec, - topic; v4: spam's head retrained (new bank, new accuracy);
    model `other` v1: the same trunk shape with topk k=1."""
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    model = compose(store, "demo")
    torch.manual_seed(3)
    model.add_branch("trec", new_branch(hidden_size=384, labels=["ABBR", "HUM", "LOC"]))
    model.remove_branch("topic")
    v3 = save_version(store, model, message="trec in, topic out")
    model = compose(store, "demo")
    spam = model.branch("spam")
    with torch.no_grad():
        for p in spam.head.parameters():
            p.add_(0.5)
    spam.entry["metrics"] = {"accuracy": 0.75, "macro_f1": 0.5, "eval_rows": 20}
    v4 = save_version(store, model, message="retrain spam head")
    other = init_model(store, "other", gating_config={"k": 1}, seed=0)
    return {"v3": v3, "v4": v4, "other": other}


def diff_json(scaler_env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = run_scaler("diff", *args, "--json", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_diff_lists_branches_added_removed_and_changed(
    versions: dict[str, Any], store: ContentStore, scaler_env: dict[str, str]
) -> None:
    report = diff_json(scaler_env, "demo@2", "demo@4")
    assert (report["a"]["version"], report["b"]["version"]) == (2, 4)
    branches = report["branches"]
    assert list(branches["added"]) == ["trec"] and branches["added"]["trec"]["labels"] == 3
    assert list(branches["removed"]) == ["topic"]
    assert list(branches["changed"]) == ["spam"] and branches["unchanged"] == []
    spam = {c["path"]: c for c in branches["changed"]["spam"]}
    v2 = store.get_manifest(resolve_version(store, "demo@2")[1])["branches"]["spam"]
    v4 = store.get_manifest(versions["v4"])["branches"]["spam"]
    assert spam["head_bank"] == {"path": "head_bank", "a": v2["head_bank"], "b": v4["head_bank"]}
    assert spam["metrics.accuracy"] == {"path": "metrics.accuracy", "b": 0.75}  # v2 had no metrics
    assert "adapter_bank" not in spam and "labels" not in spam
    assert v4["head_bank"] in report["banks"]["added"] and v2["head_bank"] in report["banks"]["removed"]
    assert report["base"] == [] and report["trunk"] == {"layers": [], "other": []}


def test_diff_shows_metric_deltas_and_plugin_configs(
    versions: dict[str, Any], store: ContentStore, scaler_env: dict[str, str]
) -> None:
    # v4 -> a v5 whose spam metrics moved: a numeric change carries its delta
    from scaler_wizard.modeling.compose import compose, save_version

    model = compose(store, "demo")
    model.branch("spam").entry["metrics"] = {"accuracy": 0.8, "macro_f1": 0.5, "eval_rows": 20}
    save_version(store, model, message="new eval")
    spam = {c["path"]: c for c in diff_json(scaler_env, "demo@4", "demo@5")["branches"]["changed"]["spam"]}
    assert spam["metrics.accuracy"]["a"] == 0.75 and spam["metrics.accuracy"]["b"] == 0.8
    assert spam["metrics.accuracy"]["delta"] == pytest.approx(0.05)

    trunk = diff_json(scaler_env, "demo@1", "other")["trunk"]
    assert [layer["layer"] for layer in trunk["layers"]] == [0, 1]
    changes = {c["path"]: c for c in trunk["layers"][0]["changes"]}
    assert changes["gating.config.k"] == {"path": "gating.config.k", "a": 2, "b": 1, "delta": -1}


def test_diff_for_people_and_its_defaults(versions: dict[str, Any], scaler_env: dict[str, str]) -> None:
    proc = run_scaler("diff", "demo@2", "demo@4", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "demo v2 sha256:" in text and "-> demo v4 sha256:" in text
    assert "1 added, 1 removed, 1 changed, 0 unchanged" in text
    assert "+ trec (lora, linear, 3 labels)" in text and "- topic (lora, linear, 6 labels)" in text
    assert "~ spam" in text and "head_bank: sha256:" in text and "metrics.accuracy: + 0.75" in text
    # by hash, the same report; `diff demo` = parent -> current; `diff demo@3` = v3 -> current
    by_hash = diff_json(scaler_env, str(versions["v3"]), str(versions["v4"]))
    assert by_hash == diff_json(scaler_env, "demo@3", "demo@4") == diff_json(scaler_env, "demo")
    assert diff_json(scaler_env, "demo@3") == by_hash
    same = run_scaler("diff", "demo@4", "demo", env=scaler_env)
    assert same.returncode == 0 and "the same version: no differences" in same.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (("demo@9", "demo"), "demo"),
        (("nope@1", "demo"), "no model named 'nope'"),
        (("other",), "only one version"),
    ],
    ids=["missing-version", "missing-model", "single-version"],
)
def test_diff_errors_are_one_line(
    args: tuple[str, ...], needle: str, versions: dict[str, Any], scaler_env: dict[str, str], store_path: Path
) -> None:
    proc = run_scaler("diff", *args, env=scaler_env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0] and "internal error" not in lines[0]
