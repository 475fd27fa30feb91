"""The helpers ``branch add`` and ``scaler train`` share (issue 11 item 4): targets, pad and
mask, the learning-rate schedule, the provenance fragment, the clock; and the run's records."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from scaler_wizard.caches.base_states import TokenStates
from scaler_wizard.caches.token_features import TokenRows, TokenShard, pad_and_mask
from scaler_wizard.errors import DataError
from scaler_wizard.training.branch_fit import BranchTrainingConfig, TrainingResult
from scaler_wizard.training.clock import utc_now_iso, utc_stamp
from scaler_wizard.training.config import BranchSpec, TrainConfig
from scaler_wizard.training.data import LabelledData
from scaler_wizard.training.plan import RunPlan, check_data_unchanged
from scaler_wizard.training.provenance import (
    STALE_REASON,
    branch_metrics,
    branch_provenance,
    fit_record,
    mark_stale,
    train_run_record,
)
from scaler_wizard.training.records import eval_record, per_branch, start_record, step_record
from scaler_wizard.training.result import branch_summary
from scaler_wizard.training.schedule import warmup_linear_decay, warmup_linear_schedule
from scaler_wizard.training.targets import label_targets
from scaler_wizard.version import __version__


def data(labels: list[str]) -> LabelledData:
    return LabelledData(
        [f"text {i}" for i in range(len(labels))], labels, {"path": "x.csv", "rows": len(labels)}
    )


# -- targets ---------------------------------------------------------------------------------
def test_label_targets_index_the_labels_and_name_unknown_ones() -> None:
    y = label_targets(data(["b", "a", "b", "c"]), ["a", "b", "c"], "f.csv", known_as="in the training labels")
    assert y.dtype == torch.long and y.tolist() == [1, 0, 1, 2]
    assert label_targets(data([]), ["a"], "f.csv", known_as="x").tolist() == []
    with pytest.raises(DataError) as info:
        label_targets(data(list("zyxwvua")), ["a"], "e.csv", known_as="among the branch's labels")
    # sorted, at most five, the file named, the label list named as the caller says
    assert (
        str(info.value) == "e.csv: labels ['u', 'v', 'w', 'x', 'y'] are not among the branch's labels ['a']"
    )


# -- pad and mask ----------------------------------------------------------------------------
def old_collate_padding(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``scaler train``'s batches did before the shared helper (pad_sequence + arange)."""
    states = torch.nn.utils.rnn.pad_sequence([r.float() for r in rows], batch_first=True)
    lengths = torch.tensor([r.shape[0] for r in rows])
    mask = torch.arange(states.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return states, mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_pad_and_mask_pads_after_each_example_exactly(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 5, generator=gen).to(dtype) for n in (3, 1, 7, 7, 2)]
    states, mask = pad_and_mask(rows)
    assert states.dtype == torch.float32 and states.shape == (5, 7, 5) and mask.dtype == torch.bool
    old_states, old_mask = old_collate_padding(rows)
    assert torch.equal(states, old_states) and torch.equal(mask, old_mask)
    assert mask.sum(1).tolist() == [3, 1, 7, 7, 2]
    assert not states[~mask].any()  # zeros after each example
    # the same through the base-state cache's rows (what the batches read)
    flat = torch.cat(rows)
    offsets = torch.tensor([0, 3, 4, 11, 18, 20])
    cached = TokenStates(flat, offsets)
    assert all(torch.equal(a, b) for a, b in zip(cached.batch(range(5)), (states, mask), strict=True))


def test_pad_and_mask_of_no_rows_is_one_padded_column() -> None:
    states, mask = pad_and_mask([], 4)
    assert states.shape == (0, 1, 4) and mask.shape == (0, 1)


def test_token_rows_batch_pads_with_the_shared_helper() -> None:
    states = torch.arange(24, dtype=torch.float16).reshape(6, 4)
    shard = TokenShard(states, torch.tensor([0, 2, 3, 6]), torch.ones(3, 4))
    out = TokenRows([shard]).batch(torch.tensor([2, 0, 1]))
    assert out.hidden.shape == (3, 3, 4) and out.hidden.dtype == torch.float32
    assert out.mask.tolist() == [[True] * 3, [True, True, False], [True, False, False]]
    assert torch.equal(out.hidden[0], states[3:6].float()) and not out.hidden[2, 1:].any()


# -- LR schedule -----------------------------------------------------------------------------
def test_warmup_then_linear_decay() -> None:
    f = warmup_linear_decay(4, 10)
    assert [f(s) for s in range(12)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        5 / 6,
        4 / 6,
        3 / 6,
        2 / 6,
        1 / 6,
        0.0,
        0.0,
    ]
    g = warmup_linear_decay(0, 4)  # no warm-up: decay from the first step
    assert [g(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_schedule_steps_every_group_and_checkpoints_as_plain_state() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    sched = warmup_linear_schedule(opt, 2, 4)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen == [[0.5, 0.05], [1.0, 0.1], [1.0, 0.1], [0.5, 0.05]]
    assert sched.state_dict()["lr_lambdas"] == [None, None]  # nothing but the step to restore


# -- provenance ------------------------------------------------------------------------------
METRICS = {"accuracy": 0.5, "macro_f1": 0.4, "per_class": {"a": {}}, "confusion_matrix": [[1]], "loss": 0.7}


def test_branch_metrics_with_and_without_the_eval_loss() -> None:
    added = branch_metrics(METRICS, 10)
    assert list(added) == ["accuracy", "macro_f1", "eval_rows", "per_class", "confusion_matrix"]
    trained = branch_metrics(METRICS, 10, loss=0.7)
    assert list(trained) == [
        "accuracy",
        "macro_f1",
        "eval_loss",
        "eval_rows",
        "per_class",
        "confusion_matrix",
    ]
    assert trained["eval_loss"] == 0.7 and trained["eval_rows"] == 10


def test_branch_provenance_is_one_fragment_for_both_commands() -> None:
    full, train, evald = data(["a", "b", "a"]), data(["a", "b"]), data(["a"])
    result = TrainingResult(steps=3, epochs_run=1, best_epoch=1, stopped_early=False, seconds=1.23456)
    add = fit_record(BranchTrainingConfig(epochs=1), result)
    assert add["steps"] == 3 and add["epochs"] == 1 and add["seconds"] == 1.235 and add["kept"] == "last"
    run = train_run_record(
        run="r",
        start_manifest="sha256:0",
        plan_sha256="sha256:1",
        config={},
        steps=8,
        seed=0,
        processes=1,
        data={"a": "sha256:2"},
        seconds=2.00049,
        tokens=12.9,
    )
    assert run["command"] == "scaler train" and run["seconds"] == 2.0 and run["tokens"] == 12
    for training in (add, run):
        prov = branch_provenance(full, train, evald, training)
        assert list(prov) == ["data", "train_rows", "eval", "label_counts", "training", "library", "torch"]
        assert prov["train_rows"] == 2 and prov["label_counts"] == {"a": 2, "b": 1}
        assert prov["training"] is training and prov["library"]["version"] == __version__
        assert prov["torch"] == torch.__version__


def test_mark_stale_copies_the_entry() -> None:
    entry = {"trunk": "sha256:t", "provenance": {"data": {}}}
    stale = mark_stale(entry, since_version=3, run="train-x", old_trunk="sha256:o")
    assert entry == {"trunk": "sha256:t", "provenance": {"data": {}}}  # not changed in place
    assert stale["provenance"]["stale"] == {
        "since_version": 3,
        "run": "train-x",
        "trained_on_trunk": "sha256:t",
        "reason": STALE_REASON,
    }
    assert mark_stale({}, since_version=3, run="r", old_trunk="sha256:o")["provenance"]["stale"][
        "trained_on_trunk"
    ] == ("sha256:o")


# -- clock -----------------------------------------------------------------------------------
def test_clock_formats() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_now_iso())
    assert re.fullmatch(r"\d{8}T\d{6}Z", utc_stamp())


# -- the run's records and checks ------------------------------------------------------------
def test_step_records_per_branch_and_expert_load() -> None:
    examples = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    assert per_branch(examples, ["a", "b", "c"]) == {
        "a": {"loss": 2.0, "accuracy": 0.5, "examples": 2},
        "b": {"loss": 2.0, "accuracy": 1.0, "examples": 1},
        "c": {
            "loss": pytest.approx(float("nan"), nan_ok=True),
            "accuracy": pytest.approx(float("nan"), nan_ok=True),
            "examples": 0,
        },
    }
    stats = {
        "loss": 1.0,
        "task_loss": 0.9,
        "aux_loss": 10.0,
        "grad_norm": 2.0,
        "lr": {"heads": 0.1},
        "tokens": 8.0,
        "load_counts": [[1.0, 3.0], [0.0, 0.0]],
        "examples": examples,
    }
    record = step_record(5, stats, 2.0, ["a", "b"], 12.5)
    assert record["event"] == "train" and record["step"] == 5 and record["tokens_per_s"] == 4.0
    assert record["expert_load"] == [[0.25, 0.75], [0.0, 0.0]] and record["peak_memory_mb"] == 12.5
    assert step_record(5, stats, 0.0, ["a", "b"], 1.0)["tokens_per_s"] == 0.0
    assert start_record({"a": 3, "b": 4}, [0.4, 0.6], 2) == {
        "event": "start",
        "step": 0,
        "branches": {"a": {"train_rows": 3, "sampling_p": 0.4}, "b": {"train_rows": 4, "sampling_p": 0.6}},
        "processes": 2,
    }
    assert eval_record(4, {"a": METRICS}) == {
        "event": "eval",
        "step": 4,
        "branches": {"a": {"accuracy": 0.5, "macro_f1": 0.4, "loss": 0.7}},
    }
    summary = branch_summary(
        METRICS, {"branches": {"a": {"loss": 1.0, "accuracy": 0.9}}}, None, name="a", new=True
    )
    assert summary == {
        "new": True,
        "train_loss": 1.0,
        "train_accuracy": 0.9,
        "eval_accuracy_start": None,
        "eval_accuracy": 0.5,
        "eval_macro_f1": 0.4,
        "eval_loss": 0.7,
    }


def test_check_data_unchanged(tmp_path: Path) -> None:
    from scaler_wizard.banks.hashing import sha256_file

    f = tmp_path / "a.csv"
    f.write_text("text,label\nx,a\n")
    plan = RunPlan(
        "m", "sha256:0", 1, [BranchSpec("a", f)], TrainConfig(), data_sha256={"a": str(sha256_file(f))}
    )
    check_data_unchanged(plan)
    f.write_text("text,label\ny,a\n")
    with pytest.raises(DataError, match="changed since the run started"):
        check_data_unchanged(plan)
    f.unlink()
    with pytest.raises(DataError, match="no such file"):
        check_data_unchanged(plan)


def test_label_smoothing_applies_to_the_built_in_cross_entropy_only() -> None:
    """(issue 12) ``branch add`` smooths the built-in cross-entropy (0.1 by default, recorded),
    class weights on top; sigmoid heads and heads with a loss of their own keep their loss."""
    import torch.nn.functional as F

    from scaler_wizard.branch import Head
    from scaler_wizard.errors import ScalerError
    from scaler_wizard.modeling.compose import new_branch
    from scaler_wizard.training.branch_fit import applied_smoothing, balanced_loss

    linear = new_branch(hidden_size=8, labels=["a", "b", "c"])
    multi = new_branch(hidden_size=8, labels=["a", "b", "c"], head="multilabel")

    class OwnLoss(Head):
        def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return logits.sum() * 0

    assert BranchTrainingConfig().label_smoothing is None  # 0.1, or 0 on small data (fit)
    assert applied_smoothing(linear.head, 0.1) == 0.1
    assert applied_smoothing(multi.head, 0.1) == 0.0 and applied_smoothing(OwnLoss(), 0.1) == 0.0
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ScalerError, match="label smoothing"):
            applied_smoothing(linear.head, bad)

    torch.manual_seed(0)
    logits, even = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, weights = balanced_loss(linear, even, 3, None, label_smoothing=0.1)
    assert weights is None
    assert torch.equal(loss(logits, even), F.cross_entropy(logits, even, label_smoothing=0.1))
    assert not torch.equal(loss(logits, even), F.cross_entropy(logits, even))
    plain, _ = balanced_loss(linear, even, 3, None)
    assert torch.equal(plain(logits, even), F.cross_entropy(logits, even))
    skewed = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2])
    loss, weights = balanced_loss(linear, skewed, 3, None, label_smoothing=0.1)
    assert weights is not None
    batch = torch.tensor([0, 0, 1, 2, 0, 1])
    w = torch.tensor(weights)
    # each class's rows get the smoothed loss, the classes weighted by weight * rows
    per_class = sum(
        float(w[c])
        * int((batch == c).sum())
        * F.cross_entropy(logits[batch == c], batch[batch == c], label_smoothing=0.1)
        for c in range(3)
    ) / sum(float(w[c]) * int((batch == c).sum()) for c in range(3))
    assert torch.allclose(loss(logits, batch), per_class)


def test_small_data_config_fills_only_what_was_not_given() -> None:
    """(issue 12) A strategy's ``small_data`` defaults apply under 50 eval rows, for the fields
    the user did not set; strategies without them (``lora``) get nothing."""
    from scaler_wizard.training.branch_add import small_data_config

    assert small_data_config("attn-mix", None, 5) == {"hidden": 8}
    assert small_data_config("attn-mlp", {"heads": 2}, 49) == {"hidden": 8}
    assert small_data_config("attn-mix", {"hidden": 64}, 5) == {}
    assert small_data_config("attn-mix", None, 50) == {}
    assert small_data_config("lora", None, 5) == {}
