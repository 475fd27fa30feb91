"""Small data (issue 12 item 2): early-stopping flags, no early stopping on an eval split too
small to decide on, a class-balanced loss on skewed classes, live lines that agree with what
is saved, and the README's quick path on the bundled sample beating the majority class.

CLI checks run the real ``scaler`` in a subprocess on the session store's ``demo``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import DATA, run_scaler

from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.compose import new_branch
from scaler_wizard.training.branch_fit import (
    MIN_EVAL_ROWS,
    BranchTrainingConfig,
    balanced_loss,
    early_stop_note,
    kept_epoch,
)

SMS = DATA / "samples" / "sms_spam_small.csv"  # 200 rows: ham 175, spam 25 (majority 0.875-0.90)
EPOCH = re.compile(
    r"training: epoch (\d+)/(\d+): loss [\d.]+ eval acc ([\d.]+) macro-F1 ([\d.]+)(?: \((.*)\))?$"
)


def add(env: dict[str, str], name: str, *extra: str) -> tuple[dict, list[re.Match[str]], str]:
    proc = run_scaler("branch", "add", "demo", name, "--data", str(SMS), "--json", *extra, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr + proc.stdout
    epochs = [m for line in proc.stderr.splitlines() if (m := EPOCH.match(line))]
    return json.loads(proc.stdout), epochs, proc.stderr


# -- unit: the decisions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "rows", "off", "kept"),
    [
        (BranchTrainingConfig(keep="best"), MIN_EVAL_ROWS, False, "best"),
        (BranchTrainingConfig(patience=3), MIN_EVAL_ROWS, False, "best"),  # a patience asks for it
        (BranchTrainingConfig(keep="best"), MIN_EVAL_ROWS - 1, True, "last"),
        (BranchTrainingConfig(patience=3), 20, True, "last"),
        (BranchTrainingConfig(keep="best", early_stop=False), 1000, True, "best"),
        (BranchTrainingConfig(), 1000, True, "last"),  # the default: the schedule's last epoch
    ],
)
def test_early_stopping_is_off_when_asked_or_the_eval_split_is_too_small(
    config: BranchTrainingConfig, rows: int, off: bool, kept: str
) -> None:
    note = early_stop_note(config, rows)
    assert bool(note) is off
    assert kept_epoch(config, rows) == kept
    if rows < MIN_EVAL_ROWS:
        assert f"{rows} eval rows are too few" in note
    elif config.keep is None and config.patience is None:
        assert "its last epoch is kept" in note


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": "latest"}, "keep must be one of last, best"),
        ({"keep": "last", "patience": 2}, "cannot go with keep 'last'"),
        ({"keep": "last", "early_stop": True}, "cannot go with keep 'last'"),
    ],
)
def test_a_keep_that_contradicts_early_stopping_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ScalerError, match=message):
        BranchTrainingConfig(**kwargs)


@pytest.mark.parametrize(
    ("counts", "balance", "weighted"),
    [
        ([90, 10], None, True),  # skewed: balanced by default
        ([60, 40], None, False),  # not skewed
        ([60, 40], True, True),  # asked for
        ([90, 10], False, False),  # refused
    ],
)
def test_class_balanced_loss_on_skewed_classes(
    counts: list[int], balance: bool | None, weighted: bool
) -> None:
    branch = new_branch(hidden_size=8, labels=["a", "b"])
    y = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    loss, weights = balanced_loss(branch, y, 2, balance)
    assert (weights is not None) is weighted
    logits = torch.zeros(len(y), 2)
    logits[:, 0] = 1.0  # predicts the first class everywhere
    plain = torch.nn.functional.cross_entropy(logits, y)
    if weighted:
        assert weights is not None and weights[1] / weights[0] == pytest.approx(
            counts[0] / counts[1], rel=1e-3
        )
        assert loss(logits, y) > plain  # the rare class's errors weigh more
    else:
        assert torch.equal(loss(logits, y), plain)


def test_the_balanced_loss_is_the_heads_own_loss_weighted() -> None:
    """Through the head's ``loss`` (a plugin's loss is respected), equal to cross-entropy's
    ``weight=`` for the default head; multi-label targets are left alone."""
    branch = new_branch(hidden_size=8, labels=["a", "b", "c"])
    y = torch.tensor([0] * 12 + [1] * 3 + [2])
    logits = torch.randn(len(y), 3, generator=torch.Generator().manual_seed(0))
    loss, weights = balanced_loss(branch, y, 3, None)
    assert weights is not None
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor(weights))
    torch.testing.assert_close(loss(logits, y), expected, rtol=1e-4, atol=1e-6)  # weights shown rounded
    multi = new_branch(hidden_size=8, labels=["a", "b"], head="multilabel")
    targets = torch.tensor([[1.0, 0.0]] * 9 + [[0.0, 1.0]])
    loss, weights = balanced_loss(multi, targets, 2, None)
    assert weights is None and loss == multi.head.loss


# -- CLI -------------------------------------------------------------------------------------


def test_tiny_eval_split_runs_every_epoch_keeps_the_last_and_says_so(scaler_env: dict[str, str]) -> None:
    """20 eval rows: early stopping off (said live and in the summary), all epochs, last kept;
    the saved accuracy is the last live line's."""
    report, epochs, err = add(scaler_env, "sms", "--epochs", "6", "--patience", "1", "--strategy", "lora")
    assert "20 eval rows are too few to decide on" in err
    assert report["epochs"] == 6 and report["kept"] == "last" and not report["stopped_early"]
    assert [int(m[1]) for m in epochs] == [1, 2, 3, 4, 5, 6]
    assert all(m[5] == "the last epoch is saved" for m in epochs)
    assert float(epochs[-1][3]) == pytest.approx(report["accuracy"], abs=5e-4)


def test_patience_stops_early_and_no_early_stop_runs_every_epoch(scaler_env: dict[str, str]) -> None:
    """60 eval rows (enough to decide on): --patience 1 stops early; --no-early-stop does not;
    the saved branch is the epoch the live lines marked as best, with that epoch's accuracy."""
    split = ("--eval-split", "0.3", "--strategy", "lora", "--epochs", "30")
    stopped, epochs, err = add(scaler_env, "a", *split, "--patience", "1")
    assert "too few" not in err and stopped["early_stopping"] == "on"
    assert stopped["stopped_early"] and stopped["epochs"] < 30 and len(epochs) == stopped["epochs"]
    full, epochs, _ = add(scaler_env, "b", *split, "--patience", "1", "--no-early-stop")
    assert full["epochs"] == 30 and not full["stopped_early"] and len(epochs) == 30
    assert "--no-early-stop" in full["early_stopping"] and full["kept"] == "best"
    marked = [m for m in epochs if m[5] == "best so far: saved"]
    assert marked and int(marked[-1][1]) == full["best_epoch"]
    assert float(marked[-1][3]) == pytest.approx(full["accuracy"], abs=5e-4)


def test_by_default_the_whole_schedule_runs_and_its_last_epoch_is_saved(scaler_env: dict[str, str]) -> None:
    """60 eval rows, no flags: every epoch runs (no early stopping), the last is saved, the live
    lines and the summary say so, and the saved accuracy is the last live line's. A patience
    with ``--keep last`` is refused in one line."""
    report, epochs, err = add(scaler_env, "c", "--eval-split", "0.3", "--strategy", "lora", "--epochs", "5")
    assert "note: early stopping off: the whole schedule runs and its last epoch is kept" in err
    assert report["kept"] == "last" and report["epochs"] == 5 and not report["stopped_early"]
    assert report["label_smoothing"] == 0.1  # enough eval rows: smoothed, whatever epoch is kept
    assert [int(m[1]) for m in epochs] == [1, 2, 3, 4, 5]
    assert all(m[5] == "the last epoch is saved" for m in epochs)
    assert float(epochs[-1][3]) == pytest.approx(report["accuracy"], abs=5e-4)
    proc = run_scaler(
        "branch", "add", "demo", "d", "--data", str(SMS), "--keep", "last", "--patience", "2", env=scaler_env
    )
    assert proc.returncode != 0 and "cannot go with keep 'last'" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_class_weights_are_reported_for_the_skewed_sample(scaler_env: dict[str, str]) -> None:
    report, _, _ = add(scaler_env, "sms", "--epochs", "1", "--strategy", "lora")
    weights = report["class_weights"]
    assert weights and weights[1] > 3 * weights[0]  # spam (the rare class) weighs more


@pytest.mark.slow
def test_readme_quick_path_on_the_sample_beats_the_majority_class(scaler_env: dict[str, str]) -> None:
    """``scaler branch add demo spam --data data/samples/sms_spam_small.csv`` with every default
    (strategy attn-mix): clearly better than always answering ham (18 of the 20 eval rows)."""
    report, _, _ = add(scaler_env, "sms")  # (the fixture's demo already has a `spam`)
    shown = run_scaler("branch", "show", "demo", "sms", "--json", env=scaler_env)
    assert json.loads(shown.stdout)["strategy"]["plugin"] == "attn-mix"
    assert report["accuracy"] >= 0.95 and report["macro_f1"] >= 0.85
    proc = run_scaler(
        "predict",
        "demo",
        "-b",
        "sms",
        "--json",
        "Free entry! Text WIN now to claim your prize",
        env=scaler_env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["predictions"]["sms"]["label"] == "spam"
