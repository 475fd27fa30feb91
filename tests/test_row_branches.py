"""Per-row branches: one trunk pass for a batch whose rows ask for different branches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import BranchNotFoundError, ScalerError
from scaler_wizard.modeling.compose import compose
from scaler_wizard.modeling.model import RowsOutput, ScalerModel
from scaler_wizard.modeling.row_routing import select_rows

TEXTS = [
    "win a free cruise now",
    "what is the capital of france",
    "meeting moved to 3pm",
    "how many legs does a spider have",
    "cheap pills online",
]
ROW_BRANCHES = ["spam", "topic", "spam", "topic", "topic"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """CPU matmuls can differ in the last bit with the thread split: compare on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def model(store: ContentStore) -> ScalerModel:
    m = compose(store, "demo")
    m.eval()
    return m


def test_row_logits_match_the_full_batch_forward(model: ScalerModel, one_thread: None) -> None:
    """What is bit-equal: the shared trunk output of a mixed batch is the plain forward's, and
    each branch's logits are exactly its tail applied to its rows of that output. A CPU matmul
    over 2 rows can differ in the last bit from the same rows inside a 5-row matmul, so against
    the plain forward's logits of the whole batch the rows are equal to 1e-6 (same labels)."""
    batch = model.base.tokenize(TEXTS, model.device)
    with torch.inference_mode():
        routed = model(batch["input_ids"], batch["attention_mask"], row_branches=ROW_BRANCHES)
        full = model(batch["input_ids"], batch["attention_mask"], branches=["spam", "topic"])
    assert isinstance(routed, RowsOutput)
    assert torch.equal(routed.trunk.pooled, full.trunk.pooled)
    assert routed.rows["spam"].tolist() == [0, 2]
    assert routed.rows["topic"].tolist() == [1, 3, 4]
    for name in ("spam", "topic"):
        idx = routed.rows[name]
        with torch.inference_mode():
            alone = model.branch(name)(select_rows(full.trunk, idx))
        assert torch.equal(routed.logits[name], alone)
        expected = full.logits[name].index_select(0, idx)
        torch.testing.assert_close(routed.logits[name], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(routed.logits[name].argmax(-1), expected.argmax(-1))


def test_one_branch_for_every_row_is_bit_equal(model: ScalerModel) -> None:
    """A branch that covers every row gets exactly the plain forward's logits."""
    batch = model.base.tokenize(TEXTS, model.device)
    with torch.inference_mode():
        routed = model(batch["input_ids"], batch["attention_mask"], row_branches=[["spam", "topic"]] * 5)
        full = model(batch["input_ids"], batch["attention_mask"], branches=["spam", "topic"])
    for name in ("spam", "topic"):
        assert torch.equal(routed.logits[name], full.logits[name])


def test_predict_rows_agrees_with_predict(model: ScalerModel) -> None:
    """Per text, the label of ``predict`` for its branch; a one-branch batch: the same
    Predictions exactly."""
    rows = model.predict_rows(TEXTS, ROW_BRANCHES, batch_size=32)
    both = model.predict(TEXTS, ["spam", "topic"], batch_size=32)
    for i, b in enumerate(ROW_BRANCHES):
        assert rows[i].label == both[b][i].label
        assert rows[i].scores == pytest.approx(both[b][i].scores, rel=1e-5)
    assert (
        model.predict_rows(TEXTS, ["topic"] * 5, batch_size=2)
        == model.predict(TEXTS, "topic", batch_size=2)["topic"]
    )


def test_mixed_batch_runs_the_trunk_once(model: ScalerModel) -> None:
    calls: list[int] = []
    handle = model.trunk.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        model.predict_rows(TEXTS, ROW_BRANCHES, batch_size=32)
    finally:
        handle.remove()
    assert calls == [len(TEXTS)]


def test_unknown_branch_is_refused(model: ScalerModel) -> None:
    with pytest.raises(BranchNotFoundError, match="nope"):
        model.predict_rows(TEXTS[:2], ["spam", "nope"])
    batch = model.base.tokenize(TEXTS[:2], model.device)
    with pytest.raises(BranchNotFoundError):
        model(batch["input_ids"], batch["attention_mask"], row_branches=["spam", "nope"])


def test_length_mismatch_is_one_line(model: ScalerModel) -> None:
    with pytest.raises(ScalerError) as err:
        model.predict_rows(TEXTS, ["spam"])
    assert "\n" not in str(err.value)
    assert "1 entries for 5 rows" in str(err.value)
    batch = model.base.tokenize(TEXTS, model.device)
    with pytest.raises(ValueError, match="entries for 5 rows"):
        model(batch["input_ids"], batch["attention_mask"], row_branches=["spam", "topic"])


def test_in_encoder_branch_runs_its_own_pass_on_its_rows_only(model: ScalerModel) -> None:
    """A ``needs_base_pass`` branch (peft-lora) runs base + trunk once more, on its rows only;
    its logits are exactly a plain forward of those rows (same padding) through it."""
    from scaler_wizard.modeling.compose import new_branch

    model.add_branch("intent", new_branch(hidden_size=384, labels=["a", "b", "c"], strategy="peft-lora"))
    assert model.branch("intent").adapter.needs_base_pass
    torch.manual_seed(1)
    with torch.no_grad():
        for pname, p in model.base.model.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.05)
    model.eval()
    per_row = ["spam", "intent", "topic", "intent", "spam"]
    batch = model.base.tokenize(TEXTS, model.device)
    calls: list[int] = []
    handle = model.trunk.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            routed = model(batch["input_ids"], batch["attention_mask"], row_branches=per_row)
    finally:
        handle.remove()
    assert calls == [5, 2]  # the shared pass on every row, intent's own pass on its 2 rows
    idx = routed.rows["intent"]
    assert idx.tolist() == [1, 3]
    sub = {k: v.index_select(0, idx) for k, v in batch.items()}
    with torch.inference_mode():
        alone = model(sub["input_ids"], sub["attention_mask"], branches="intent").logits["intent"]
        full = model(batch["input_ids"], batch["attention_mask"], branches="intent").logits["intent"]
    assert torch.equal(routed.logits["intent"], alone)
    torch.testing.assert_close(routed.logits["intent"], full.index_select(0, idx), rtol=1e-5, atol=1e-6)
    preds = model.predict_rows(TEXTS, per_row)
    assert [p.label in ("a", "b", "c") for p in preds] == [False, True, False, True, False]
