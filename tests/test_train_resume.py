"""Exact resume: N steps straight vs. a real ``scaler train`` process SIGKILLed after a checkpoint
and resumed with ``--resume``: the same loss at every step and the same final banks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SCALER
from train_helpers import SMS, TREC, copy_store, records, result_banks, subprocess_env, tiny_template

from scaler_wizard.banks import ContentStore

STEPS = 40


def train_args(run_dir: Path) -> list[str]:
    return [
        "train",
        "tiny",
        "--branch",
        f"spam={SMS}",
        "--branch",
        f"trec={TREC}",
        "--steps",
        str(STEPS),
        "--batch-size",
        "16",
        "--checkpoint-every",
        "10",
        "--eval-every",
        "10",
        "--run-dir",
        str(run_dir),
        "--json",
    ]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_uninterrupted_run(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    template = tiny_template(tmp_path_factory)
    straight_store, killed_store = tmp_path / "a", tmp_path / "b"
    copy_store(template, straight_store)
    copy_store(template, killed_store)

    straight = subprocess.run(
        [str(SCALER), *train_args(tmp_path / "run-a")],
        env=subprocess_env(straight_store),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert straight.returncode == 0, straight.stderr

    run_b = tmp_path / "run-b"
    proc = subprocess.Popen(
        [str(SCALER), *train_args(run_b)],
        env=subprocess_env(killed_store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not (run_b / "checkpoints" / "step-00000010").is_dir():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_b / "result.json").exists(), "the run finished before it could be killed"
    assert (
        ContentStore.open(killed_store).get_manifest(ContentStore.open(killed_store).resolve("tiny"))[
            "version"
        ]
        == 1
    )

    resumed = subprocess.run(
        [str(SCALER), "train", "--resume", str(run_b), "--json"],
        env=subprocess_env(killed_store),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from"] is not None and 10 <= summary["resumed_from"] < STEPS

    a, b = records(tmp_path / "run-a"), records(run_b)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    keys = ("loss", "task_loss", "aux_loss", "grad_norm", "lr", "branches", "expert_load")
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["step"]
    assert records(tmp_path / "run-a", "eval") == records(run_b, "eval")

    banks_a = result_banks(ContentStore.open(straight_store), "tiny")
    banks_b = result_banks(ContentStore.open(killed_store), "tiny")
    assert banks_a == banks_b
    assert (
        ContentStore.open(killed_store).get_manifest(ContentStore.open(killed_store).resolve("tiny"))[
            "version"
        ]
        == 2
    )

    # resuming a finished run says so and changes nothing
    again = subprocess.run(
        [str(SCALER), "train", "--resume", str(run_b), "--json"],
        env=subprocess_env(killed_store),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0 and json.loads(again.stdout)["already_finished"] is True


KILL_BEFORE_RESULT = """
import os, signal, sys
import scaler_wizard.training.loop as tt
real = tt.atomic_write_bytes
def write(path, data, *args, **kwargs):
    if path.name == tt.RESULT_FILE:  # the version is saved, the result not yet written
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data, *args, **kwargs)
tt.atomic_write_bytes = write
from scaler_wizard.cli.app import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_resume_after_kill_between_ref_move_and_result_finishes_the_run(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Killed after its version was saved but before result.json: --resume recognises the
    model's head as this run's own version and writes the result; nothing is trained or saved
    again. A head some other change moved on is still refused."""
    import sys

    root = tmp_path / "store"
    copy_store(tiny_template(tmp_path_factory), root)
    run_dir = tmp_path / "run"
    args = [*train_args(run_dir)]
    args[args.index("--steps") + 1] = "4"
    args[args.index("--checkpoint-every") + 1] = "2"
    args[args.index("--eval-every") + 1] = "2"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_RESULT, *args],
        env=subprocess_env(root),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = ContentStore.open(root)
    head = store.resolve("tiny")
    assert store.get_manifest(head)["version"] == 2  # the run's version was saved...
    assert not (run_dir / "result.json").exists()  # ...and the kill came before its result
    manifests = set(store.iter_manifests())

    resumed = subprocess.run(
        [str(SCALER), "train", "--resume", str(run_dir), "--json"],
        env=subprocess_env(root),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["manifest"] == head and summary["version"] == 2
    assert summary["already_finished"] is False and summary["resumed_from"] == 4
    assert store.resolve("tiny") == head and set(store.iter_manifests()) == manifests  # nothing new
    assert json.loads((run_dir / "result.json").read_text())["manifest"] == head
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]

    # A version this run did not make on top: the model really moved, and resume says so.
    (run_dir / "result.json").unlink()
    from scaler_wizard.modeling.compose import compose, save_version

    save_version(store, compose(store, "tiny"), message="someone else's change")
    moved = subprocess.run(
        [str(SCALER), "train", "--resume", str(run_dir), "--json"],
        env=subprocess_env(root),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert moved.returncode == 1
    assert "moved to" in moved.stderr and len(moved.stderr.strip().splitlines()) == 1
    assert "internal error" not in moved.stderr
