"""Training hands the save typed records (issue 11 item 3): ``branch add`` and ``scaler
train`` no longer edit a branch's manifest fragment or the composed model's entries in place.

``save_version(records=...)`` records a trained branch's metrics, provenance, fingerprint
(and trunk); ``save_version(entries=...)`` records given entries for branches not loaded
(``scaler train`` marks the branches it leaves behind stale so). The bytes of what ``branch
add`` and ``train`` store are pinned elsewhere (tests/test_builder.py,
tests/test_training_pinned.py); these tests pin the API.
"""

from __future__ import annotations

import copy

import pytest

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ManifestError, ScalerError
from scaler_wizard.manifests import facts
from scaler_wizard.manifests.model import thaw
from scaler_wizard.modeling.compose import compose, new_branch, save_version
from scaler_wizard.modeling.saving import TrainedRecord
from scaler_wizard.training.preflight import preflight_branch
from scaler_wizard.training.provenance import STALE_REASON, mark_stale, stale_record

RECORD = TrainedRecord(
    metrics={"accuracy": 0.5, "macro_f1": 0.5, "eval_rows": 4},
    provenance={"training": {"command": "test"}},
    fingerprint={"probe": "p", "sha256": "s"},
)


def test_save_records_a_trained_branch_without_editing_its_module(store: ContentStore) -> None:
    model = compose(store, "demo")
    branch = new_branch(hidden_size=384, labels=["x", "y"])
    model.add_branch("new", branch)
    before = copy.deepcopy(branch.entry)
    origin = model.origin
    assert origin is not None
    kept_before = origin.manifest.to_dict()

    h = save_version(store, model, message="add new", records={"new": RECORD})

    saved = store.manifest(h)
    entry = saved.branches["new"]
    assert entry.trunk == facts.trunk_id(saved)  # no trunk in the record: the new version's
    assert thaw(entry.metrics) == thaw(RECORD.metrics)
    assert thaw(entry.provenance) == thaw(RECORD.provenance)
    assert thaw(entry.fingerprint) == thaw(RECORD.fingerprint)
    assert branch.entry == before  # the branch's own record is not edited
    assert origin.manifest.to_dict() == kept_before  # nor the version it was composed from
    for name in ("spam", "topic"):  # the branches not loaded: byte for byte
        assert saved.branches[name] == origin.manifest.branches[name]


def test_a_record_can_name_the_trunk_the_branch_was_trained_on(store: ContentStore) -> None:
    model = compose(store, "demo")
    model.add_branch("new", new_branch(hidden_size=384, labels=["x", "y"]))
    other = "sha256:" + "1" * 64
    h = save_version(
        store,
        model,
        message="add new",
        records={"new": TrainedRecord(RECORD.metrics, RECORD.provenance, RECORD.fingerprint, trunk=other)},
    )
    saved = store.manifest(h)
    assert saved.branches["new"].trunk == other
    # recorded on another trunk than the version's: the builder marks it stale
    assert facts.is_stale(saved.branches["new"])


def test_a_record_for_a_branch_never_loaded_is_refused(store: ContentStore) -> None:
    model = compose(store, "demo")
    head = store.get_ref("demo")
    with pytest.raises(ScalerError, match="'spam' has a training record but was never loaded"):
        save_version(store, model, message="m", records={"spam": RECORD})
    assert store.get_ref("demo") == head  # nothing saved


def test_entries_replace_branches_not_loaded_as_train_marks_them_stale(store: ContentStore) -> None:
    """``scaler train --allow-stale-branches``: the typed mark gives the bytes the old
    in-place edit of the composed entries gave."""
    model = compose(store, "demo")
    assert model.origin is not None
    spam = model.origin.manifest.branches["spam"]
    mark = stale_record(since_version=9, run="run-x", trained_on_trunk=spam.trunk or "?")
    marked = facts.mark_stale(spam, mark)
    assert marked.to_dict() == mark_stale(spam.to_dict(), since_version=9, run="run-x", old_trunk="?")
    h = save_version(store, model, message="m", entries={"spam": marked})
    saved = store.manifest(h)
    assert saved.branches["spam"] == marked
    assert thaw(saved.branches["spam"].provenance)["stale"]["reason"] == STALE_REASON
    assert "stale" not in (thaw(saved.branches["topic"].provenance) or {})


def test_preflight_takes_the_typed_manifest_or_its_json(store: ContentStore) -> None:
    typed = store.manifest(store.resolve("demo"))
    labels = ["ok", "x" * 1001]
    errors = []
    for current in (typed, typed.to_dict()):
        with pytest.raises(ManifestError) as exc:
            preflight_branch(current, "new", strategy="lora", labels=labels)
        errors.append(str(exc.value))
    assert errors[0] == errors[1]
    assert errors[0].startswith("invalid branch 'new' (checked before training): branches.new.labels[1]")
    preflight_branch(typed, "new", strategy="lora", labels=["a", "b"])  # a fine one passes
    broken = typed.to_dict()
    broken["version"] = 0
    with pytest.raises(ManifestError, match="^invalid current manifest: version"):
        preflight_branch(broken, "new", strategy="lora", labels=["a", "b"])


def test_records_and_entries_must_name_the_right_branches(store: ContentStore) -> None:
    model = compose(store, "demo")
    assert model.origin is not None
    spam = model.origin.manifest.branches["spam"]
    model.branch("topic")  # loaded: its entry is made from its module
    head = store.get_ref("demo")
    with pytest.raises(ScalerError, match="'nope' has a training record but is not in the model"):
        save_version(store, model, message="m", records={"nope": RECORD})
    for name in ("topic", "nope"):
        with pytest.raises(ScalerError, match=f"{name!r} has an entry given, but it is loaded or not in"):
            save_version(store, model, message="m", entries={name: spam})
    assert store.get_ref("demo") == head  # nothing saved
