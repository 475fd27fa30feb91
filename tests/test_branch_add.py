"""``scaler branch add``: a new branch trained on real data, and nothing else changes.

The session store's ``demo`` has branches ``spam`` and ``topic`` (random weights). A module
fixture adds a third, ``sms``, with the library on data/samples/sms_spam_small.csv; the tests
then check that the old branches are bit-identical, what the new manifest entry records, the
CLI views of it (show, list, eval, history, remove, rollback), the trunk-feature cache, and
determinism. Two slow tests train on (subsets of) the full SMS Spam and TREC sets and check
that the branches really learn.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import DATA, _copy_store
from torch import Tensor

from scaler_wizard.banks import ContentStore
from scaler_wizard.caches.features import cache_dir
from scaler_wizard.errors import BranchNotFoundError
from scaler_wizard.modeling.compose import compose, init_model
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.training.branch_add import BranchAddResult, DataSpec, add_branch
from scaler_wizard.training.branch_fit import BranchTrainingConfig

SMS = DATA / "samples" / "sms_spam_small.csv"
OLD = ["spam", "topic"]
TEXTS = [
    "WINNER!! Claim your free prize now, text WIN to 80082",
    "Are we still on for lunch tomorrow?",
    "How far is it from Denver to Aspen?",
    "Who wrote the novel Moby Dick?",
    "Your account is locked: reply with your PIN to unlock it",
    "ok",
]
FAST = BranchTrainingConfig(epochs=3)  # what the CLI tests pass as --epochs 3 (seed 0)


@torch.inference_mode()
def logits_of(model: ScalerModel, branches: list[str]) -> dict[str, Tensor]:
    model.eval()
    batch = model.base.tokenize(TEXTS, model.device)
    return {k: v.clone() for k, v in model(**batch, branches=branches).logits.items()}


def run_cli(argv: list[str], monkeypatch: Any, capsys: Any) -> tuple[int, str, str]:
    """``scaler ARGV`` in this process (the same ``main`` the console script calls)."""
    from scaler_wizard.cli.app import main

    monkeypatch.delenv("SCALER_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def cli_ok(store_path: Path, monkeypatch: Any, capsys: Any, *argv: str) -> str:
    code, out, err = run_cli(["--store", str(store_path), *argv], monkeypatch, capsys)
    assert code == 0, err
    return out


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Added:
    root: Path
    before_hash: str
    before: dict[str, Any]  # the manifest before the add
    before_logits: dict[str, Tensor]  # spam, topic
    result: BranchAddResult
    after: dict[str, Any]  # the manifest after the add
    sms_logits: Tensor


@pytest.fixture(scope="module")
def added(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Added:
    """``demo`` + branch ``sms`` added by the library (read-only for the tests: copy to change)."""
    root = tmp_path_factory.mktemp("added") / "store"
    _copy_store(session_store, root)
    store = ContentStore.open(root)
    before_hash = store.resolve("demo")
    before_logits = logits_of(compose(store, "demo"), OLD)
    result = add_branch(store, "demo", "sms", DataSpec(SMS), training=FAST)
    sms_logits = logits_of(compose(store, "demo"), ["sms"])["sms"]
    return Added(
        root,
        before_hash,
        store.get_manifest(before_hash),
        before_logits,
        result,
        store.get_manifest(store.resolve("demo")),
        sms_logits,
    )


@pytest.fixture
def added_copy(added: Added, tmp_path: Path) -> Path:
    """A private copy of the ``added`` store (objects hard-linked: never write into one)."""
    dst = tmp_path / "store"
    _copy_store(added.root, dst)
    return dst


# -- 1. the old branches do not change -------------------------------------------------------


def test_old_branches_are_bit_identical_after_add(added: Added, monkeypatch: Any, capsys: Any) -> None:
    store = ContentStore.open(added.root)
    assert added.result.manifest == store.resolve("demo")
    fresh = compose(store, "demo")
    assert sorted(fresh.branch_names) == ["sms", "spam", "topic"]
    after = logits_of(fresh, OLD)
    for name in OLD:
        assert torch.equal(after[name], added.before_logits[name]), name
    # In one pass with the new branch, too; and the previous version is still the same model.
    together = logits_of(compose(store, "demo"), ["sms", *OLD])
    previous = logits_of(compose(store, "demo@2"), OLD)
    for name in OLD:
        assert torch.equal(together[name], added.before_logits[name]), name
        assert torch.equal(previous[name], added.before_logits[name]), name
    assert torch.equal(together["sms"], added.sms_logits)

    # The manifest carries the old entries over byte for byte, and the shared parts too.
    before, after_m = added.before, added.after
    for name in OLD:
        assert after_m["branches"][name] == before["branches"][name], name
    assert after_m["base"] == before["base"] and after_m["trunk"] == before["trunk"]
    assert after_m["parent"] == added.before_hash and after_m["version"] == before["version"] + 1
    assert set(after_m["branches"]) == {"spam", "topic", "sms"}
    for name in OLD:  # and the bank files still hash to their names
        for key in ("adapter_bank", "head_bank"):
            bank = before["branches"][name][key]
            assert sha256_of(store.object_path(bank)) == bank

    out = cli_ok(added.root, monkeypatch, capsys, "verify", "demo", "--deep", "--json")
    report = json.loads(out)
    assert report["ok"]
    fingerprints = {
        c["what"]: c for v in report["versions"] for c in v["checks"] if "fingerprint" in c["what"]
    }
    assert fingerprints["branches.sms.fingerprint"]["detail"] == "bit-identical"
    assert cli_ok(added.root, monkeypatch, capsys, "verify", "demo", "--deep").startswith("ok: demo")


def test_cli_predictions_of_old_branches_do_not_move(added: Added, monkeypatch: Any, capsys: Any) -> None:
    argv = ["-b", "spam", "-b", "topic", "--json", *TEXTS]
    before = json.loads(cli_ok(added.root, monkeypatch, capsys, "predict", "demo@2", *argv))
    after = json.loads(cli_ok(added.root, monkeypatch, capsys, "predict", "demo", *argv))
    assert after == before


# -- 5. what the new entry records, and the CLI views of it -----------------------------------


def test_manifest_records_provenance_metrics_and_fingerprint(
    added: Added, monkeypatch: Any, capsys: Any
) -> None:
    entry = added.after["branches"]["sms"]
    frame = pd.read_csv(SMS, dtype=str, keep_default_na=False)
    counts = frame["label"].value_counts().to_dict()
    assert entry["labels"] == ["ham", "spam"]

    prov = entry["provenance"]
    assert prov["data"]["sha256"] == sha256_of(SMS)
    assert prov["data"]["file"] == SMS.name and prov["data"]["rows"] == len(frame) == 200
    assert prov["label_counts"] == counts == {"ham": 175, "spam": 25}
    assert prov["train_rows"] + entry["metrics"]["eval_rows"] == 200
    training = prov["training"]
    # 20 eval rows: no epoch to choose, so no label smoothing either (issue 12)
    assert training["seed"] == 0 and training["epochs"] == 3 and training["label_smoothing"] == 0.0
    # small data: 180 rows a batch of 180 // 8 = 22 (not 64), so 9 steps an epoch
    assert training["batch_size"] == 22
    assert training["steps"] == added.result.training.steps == 3 * 9
    assert prov["library"]["distribution"] == "scaler-wizard"

    metrics = entry["metrics"]
    assert metrics["accuracy"] == added.result.metrics["accuracy"]
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    assert set(metrics["per_class"]) == {"ham", "spam"}
    assert all(set(m) == {"precision", "recall", "f1", "support"} for m in metrics["per_class"].values())
    matrix = metrics["confusion_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert sum(map(sum, matrix)) == metrics["eval_rows"] == 20  # 10% held out, stratified
    assert [sum(row) for row in matrix] == [metrics["per_class"][c]["support"] for c in ("ham", "spam")]
    assert metrics["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / 20)

    fp = entry["fingerprint"]
    assert fp["probe_set"] == "builtin-v1" and fp["sha256"].startswith("sha256:")
    assert torch.tensor(fp["logits"]).shape[1] == 2

    shown = json.loads(cli_ok(added.root, monkeypatch, capsys, "branch", "show", "demo", "sms", "--json"))
    assert shown == {"name": "sms", **entry}
    listed = json.loads(cli_ok(added.root, monkeypatch, capsys, "branch", "list", "demo", "--json"))
    assert [b["name"] for b in listed] == ["sms", "spam", "topic"]
    assert listed[0]["metrics"] == metrics
    table = cli_ok(added.root, monkeypatch, capsys, "branch", "list", "demo")
    sms_row = next(line for line in table.splitlines() if line.startswith("sms"))
    assert "lora" in sms_row and f"{metrics['accuracy']:.3f}" in sms_row


def test_eval_command_scores_the_new_branch(
    added: Added, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    frame = pd.read_csv(SMS, dtype=str, keep_default_na=False)
    subset = pd.concat([frame[frame.label == "ham"].head(30), frame[frame.label == "spam"].head(10)])
    path = tmp_path / "eval.tsv"
    subset.to_csv(path, sep="\t", index=False)
    report = json.loads(
        cli_ok(
            added.root, monkeypatch, capsys, "eval", "demo", "--branch", "sms", "--data", str(path), "--json"
        )
    )
    assert report["branch"] == "sms" and report["support"] == 40
    assert report["data"]["sha256"] == sha256_of(path)
    matrix = report["confusion_matrix"]
    assert [sum(row) for row in matrix] == [30, 10]  # rows are the true labels ham, spam
    assert report["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / 40)
    assert 0 <= report["macro_f1"] <= 1 and set(report["per_class"]) == {"ham", "spam"}

    # The same numbers as predicting through the library.
    model = compose(ContentStore.open(added.root), "demo")
    predicted = [p.label for p in model.predict(subset["text"].tolist(), ["sms"])["sms"]]
    correct = sum(p == t for p, t in zip(predicted, subset["label"], strict=True))
    assert report["accuracy"] == pytest.approx(correct / 40)


def test_remove_then_rollback_brings_the_branch_back(
    added: Added, added_copy: Path, monkeypatch: Any, capsys: Any
) -> None:
    store = ContentStore.open(added_copy)
    with_sms = store.resolve("demo")
    cli_ok(added_copy, monkeypatch, capsys, "branch", "remove", "demo", "sms")
    removed = store.resolve("demo")
    assert removed != with_sms
    manifest = store.get_manifest(removed)
    assert manifest["version"] == 4 and manifest["parent"] == with_sms
    assert set(manifest["branches"]) == set(OLD)
    for name in OLD:
        assert manifest["branches"][name] == added.before["branches"][name]
    model = compose(store, "demo")
    with pytest.raises(BranchNotFoundError, match="sms"):
        model.branch("sms")
    after = logits_of(model, OLD)
    assert all(torch.equal(after[n], added.before_logits[n]) for n in OLD)

    history = json.loads(cli_ok(added_copy, monkeypatch, capsys, "history", "demo", "--json"))
    assert [(h["version"], h["branches"]) for h in history] == [
        (4, ["spam", "topic"]),
        (3, ["sms", "spam", "topic"]),
        (2, ["spam", "topic"]),
        (1, []),
    ]
    assert history[1]["manifest"] == with_sms and history[0]["message"] == "remove branch sms"

    cli_ok(added_copy, monkeypatch, capsys, "rollback", "demo", "3")
    assert store.resolve("demo") == with_sms
    back = logits_of(compose(store, "demo"), ["sms", *OLD])
    assert torch.equal(back["sms"], added.sms_logits)
    assert all(torch.equal(back[n], added.before_logits[n]) for n in OLD)


# -- 4. the trunk-feature cache -------------------------------------------------------------


def test_features_come_from_the_cache_and_a_damaged_cache_is_recomputed(
    added: Added, added_copy: Path, monkeypatch: Any, capsys: Any
) -> None:
    assert not added.result.features_cached  # the fixture's add computed them
    files = sorted(cache_dir(ContentStore.open(added_copy)).iterdir())
    assert [f.suffix for f in files] == [".safetensors"], files
    cache = files[0]
    good_bytes = cache.read_bytes()
    original = added.after["branches"]["sms"]
    add = ["branch", "add", "demo", "--data", str(SMS), "--epochs", "3", "--json", "--strategy", "lora"]

    # Same data to a new branch name: from the cache; same features and seed -> same head
    # weights (the bank differs only in the branch name it records, issue 10 #6).
    report = json.loads(cli_ok(added_copy, monkeypatch, capsys, *add[:3], "sms2", *add[3:]))
    assert report["features_cached"] is True
    store = ContentStore.open(added_copy)
    entry = store.get_manifest(store.resolve("demo"))["branches"]["sms2"]
    assert same_tensors(store, entry["head_bank"], original["head_bank"])

    # After `branch remove`, the same name again: from the cache, and the very same banks.
    cli_ok(added_copy, monkeypatch, capsys, "branch", "remove", "demo", "sms")
    report = json.loads(cli_ok(added_copy, monkeypatch, capsys, *add[:3], "sms", *add[3:]))
    assert report["features_cached"] is True
    entry = store.get_manifest(store.resolve("demo"))["branches"]["sms"]
    assert (entry["adapter_bank"], entry["head_bank"]) == (original["adapter_bank"], original["head_bank"])

    # One flipped bit in the stored features: recomputed, not trusted; the cache is rewritten.
    damaged = bytearray(good_bytes)
    damaged[-3] ^= 0x01
    cache.write_bytes(bytes(damaged))
    report = json.loads(cli_ok(added_copy, monkeypatch, capsys, *add[:3], "sms3", *add[3:]))
    assert report["features_cached"] is False
    entry = store.get_manifest(store.resolve("demo"))["branches"]["sms3"]
    assert same_tensors(store, entry["head_bank"], original["head_bank"])  # trained on the true features
    assert cache.read_bytes() == good_bytes  # recomputed bit for bit


def same_tensors(store: ContentStore, a: str, b: str) -> bool:
    from scaler_wizard.modeling.tensor_banks import load_bank_tensors

    ta, tb = (load_bank_tensors(store.verified_path(h)) for h in (a, b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# -- 5. determinism -------------------------------------------------------------------------


def test_same_add_on_another_copy_gives_the_same_banks(
    added: Added, store_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """The CLI on a fresh copy of the store, after other work in this process, gives the banks
    the library gave in the fixture (the trunk features are taken from the fixture's cache)."""
    src = cache_dir(ContentStore.open(added.root))
    dst = cache_dir(ContentStore.open(store_path))
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(12345)  # whatever the process's RNG state, --seed decides
    torch.rand(7)
    out = cli_ok(
        store_path,
        monkeypatch,
        capsys,
        "branch",
        "add",
        "demo",
        "sms",
        "--data",
        str(SMS),
        "--epochs",
        "3",
        "--json",
        "--strategy",  # (issue 12) the CLI default is attn-mlp; the fixture's branch is lora
        "lora",
    )
    assert json.loads(out)["features_cached"] is True
    store = ContentStore.open(store_path)
    manifest = store.get_manifest(store.resolve("demo"))
    entry, original = manifest["branches"]["sms"], added.after["branches"]["sms"]
    assert (entry["adapter_bank"], entry["head_bank"]) == (original["adapter_bank"], original["head_bank"])
    assert without_timing(entry) == without_timing(original)  # metrics, fingerprint, provenance...
    assert {n: manifest["branches"][n] for n in OLD} == {n: added.before["branches"][n] for n in OLD}


def without_timing(entry: dict[str, Any]) -> dict[str, Any]:
    training = {k: v for k, v in entry["provenance"]["training"].items() if k != "seconds"}
    return {**entry, "provenance": {**entry["provenance"], "training": training}}


# -- 6. it learns (slow) ---------------------------------------------------------------------


def stratified_slices(path: Path, train_rows: int, eval_rows: int, folder: Path) -> tuple[Path, Path]:
    """The first rows of each class (in file order, class shares kept) for training, the next
    ones for evaluation: two disjoint, stratified files."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    shares = frame["label"].value_counts(normalize=True)
    train, evaluation = [], []
    for label, share in shares.items():
        rows = frame[frame["label"] == label]
        n_train, n_eval = max(1, round(train_rows * share)), max(1, round(eval_rows * share))
        train.append(rows.iloc[:n_train])
        evaluation.append(rows.iloc[n_train : n_train + n_eval])
    out = folder / f"{path.stem}-train.csv", folder / f"{path.stem}-eval.csv"
    pd.concat(train).sort_index().to_csv(out[0], index=False)
    pd.concat(evaluation).sort_index().to_csv(out[1], index=False)
    return out


# The full sets take ~6 min each here (trunk features for 5.5k rows on 2 busy CPUs), so these
# tests use stratified subsets: the first 1,000 rows (class shares kept) to train, the next 250
# (disjoint) to evaluate, default recipe (up to 20 epochs, early stopping), seed 0.
# Measured on the full sets (~5k train / ~550 held out):
#   SMS spam accuracy 0.982 (macro-F1 0.961); TREC coarse accuracy 0.868 (macro-F1 0.847).
# Measured on 1,600 train / 400 eval: SMS 0.985 (0.968), TREC 0.780 (0.789).
# Measured on these subsets: SMS 0.968 (0.928), TREC 0.755 (0.702); thresholds leave a margin.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("dataset", "labels", "min_accuracy", "min_macro_f1"),
    [
        # majority class ("ham") is 0.866 accurate, 0.46 macro-F1
        ("sms_spam.csv", ["ham", "spam"], 0.95, 0.85),
        # majority class ("ENTY") is 0.23 accurate
        ("trec.csv", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"], 0.70, 0.62),
    ],
)
def test_branch_learns_real_data(
    dataset: str,
    labels: list[str],
    min_accuracy: float,
    min_macro_f1: float,
    empty_store: ContentStore,
    tmp_path: Path,
) -> None:
    train, evaluation = stratified_slices(DATA / dataset, 1000, 250, tmp_path)
    init_model(empty_store, "q")
    result = add_branch(empty_store, "q", "b", DataSpec(train, eval_path=evaluation))
    print(f"{dataset}: {result.metrics['accuracy']:.3f} accuracy, {result.metrics['macro_f1']:.3f} macro-F1")
    assert result.labels == labels
    assert result.metrics["support"] == len(pd.read_csv(evaluation)) == pytest.approx(250, abs=3)
    assert result.metrics["accuracy"] >= min_accuracy
    assert result.metrics["macro_f1"] >= min_macro_f1
    # 250 eval rows are enough data: the loss was smoothed and the schedule's last epoch kept
    # (issue 12); the record says so
    entry = empty_store.get_manifest(empty_store.resolve("q"))["branches"]["b"]
    assert entry["provenance"]["training"]["label_smoothing"] == 0.1
    assert entry["provenance"]["training"]["kept"] == "last"
