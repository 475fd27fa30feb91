"""The README's snippets run as written (issue 10, item 13).

Every ```python block runs in a subprocess against a real store; every ```bash line runs in
one bash script, except the lines listed in ``SKIPPED`` (each with its reason), which the test
checks are still in the README so the list cannot go stale. The data files the README names
are replaced by the small samples under the same names, so the commands stay as written.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, REPO

from scaler_wizard.banks import ContentStore

README = REPO / "README.md"
BIN = Path(sys.executable).parent

#: README bash lines (comments stripped) that this test does not run, and why
SKIPPED = {
    "bash scripts/demo.sh": "creates .venv from the package index (network); the test runs its steps below",
    "bash scripts/test.sh": "creates .venv and runs the whole suite, this test included",
    "source .venv/bin/activate": "the test puts the venv's bin/ first on PATH instead",
    "scaler publish demo me/demo": "needs the Hub (network); tests/test_hub.py runs it against a local Hub server",
    "scaler pull me/demo@v3 --as demo-copy": "needs the Hub (network); see tests/test_hub.py",
    "scaler pull me/demo --branches spam --into mymodel": "needs the Hub (network); see tests/test_hub.py",
    "scaler train demo --branch spam=data/sms_spam.csv --branch trec=data/trec.csv --steps 2000": (
        "2,000 trunk steps: many CPU minutes; tests/test_train.py runs `scaler train`"
    ),
    "scaler train --resume scaler-store/runs/demo/train-TIME": "TIME is a placeholder; see tests/test_train_resume.py",
    "scaler report scaler-store/runs/demo/train-TIME": "TIME is a placeholder; see tests/test_train.py",
    "scaler serve demo --port 8080": "runs until stopped; tests/test_serve.py runs `scaler serve` as a real process",
    """curl -s 127.0.0.1:8080/v1/predict -d '{"texts": ["Free entry! Text WIN now"], "branch": "spam"}'""": (
        "needs the server above; tests/test_serve.py sends the same request with httpx"
    ),
    "accelerate launch --multi_gpu --num_processes 2 -m scaler_wizard.cli.app train demo --branch ...": (
        "several processes / GPUs; tests/test_train_accelerate.py runs accelerate"
    ),
}


def blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def command_lines() -> list[str]:
    """Every command of every bash block, trailing comments and blank lines dropped."""
    lines = []
    for block in blocks("bash"):
        for raw in block.splitlines():
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_the_readme_has_the_snippets_this_test_runs() -> None:
    assert len(blocks("python")) >= 1 and len(blocks("bash")) >= 4
    lines = command_lines()
    stale = sorted(set(SKIPPED) - set(lines))
    assert not stale, f"SKIPPED lists lines no longer in README.md: {stale}"


def _store_with_readme_branches(store_path: Path) -> None:
    """The README's Python uses branches `spam` and `trec`: add a `trec` branch to `demo`."""
    from scaler_wizard.modeling.compose import compose, new_branch, save_version

    store = ContentStore.open(store_path)
    model = compose(store, "demo")
    torch.manual_seed(1)
    branch = new_branch(hidden_size=384, labels=["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])
    model.add_branch("trec", branch)
    save_version(store, model, message="add trec")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("SCALER_HOME", "SCALER_DEBUG", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_block_runs_as_written(index: int, store_path: Path, tmp_path: Path) -> None:
    """Before the fix: `model(**batch, branches=[...])` after `model.predict(...)` raised
    "Inference tensors cannot be saved for backward"."""
    _store_with_readme_branches(store_path)
    shutil.copytree(store_path, tmp_path / "scaler-store", symlinks=True)
    code = blocks("python")[index]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"README python block {index} failed:\n{code}\n{proc.stderr[-3000:]}"


def test_predict_takes_one_text_and_one_branch_name(store: ContentStore) -> None:
    """A bare string is one text (not one per character) and one branch name (not `s`)."""
    from scaler_wizard.modeling.compose import compose

    model = compose(store, "demo")
    one = model.predict("Free entry! Text WIN now", "spam")
    assert set(one) == {"spam"} and one["spam"].label in ("ham", "spam")
    listed = model.predict(["Free entry! Text WIN now"], ["spam"])
    assert listed["spam"] == [one["spam"]]
    assert model.predict(["a", "b"], "topic")["topic"] == model.predict(["a", "b"], ["topic"])["topic"]
    with pytest.raises(TypeError, match="texts as strings"):
        model.predict([1, 2], "spam")  # type: ignore[list-item]


def test_model_forward_after_predict_keeps_autograd(store: ContentStore) -> None:
    """A branch first loaded inside predict() is an ordinary module, usable for training."""
    from scaler_wizard.modeling.compose import compose

    model = compose(store, "demo")
    model.predict(["Who wrote Hamlet?"], ["topic"])
    head = next(model.branch("topic").parameters())
    assert not head.is_inference()
    batch = model.base.tokenize(["hi there"])
    logits = model(**batch, branches="topic").logits["topic"]
    logits.sum().backward()
    assert head.grad is not None


def _small_data(folder: Path) -> None:
    """The files the README's commands name, with the small samples' rows."""
    samples = DATA / "samples"
    (folder / "data" / "samples").mkdir(parents=True)
    shutil.copy(samples / "sms_spam_small.csv", folder / "data" / "sms_spam.csv")
    shutil.copy(samples / "trec_small.csv", folder / "data" / "trec.csv")
    shutil.copy(samples / "sms_spam_small.csv", folder / "data" / "samples" / "sms_spam_small.csv")
    rows = (samples / "trec_small.csv").read_text(encoding="utf-8").splitlines()
    (folder / "my_heldout.csv").write_text("\n".join([rows[0], *rows[-40:]]) + "\n", encoding="utf-8")
    (folder / "messages.txt").write_text("WINNER! Claim your prize\nsee you at lunch\n", encoding="utf-8")


@pytest.mark.slow
def test_readme_bash_blocks_run_as_written(tmp_path: Path) -> None:
    """Every bash line of the README not in SKIPPED, in order, in one shell, as written."""
    _small_data(tmp_path)
    run = [line for line in command_lines() if line not in SKIPPED]
    assert any(line.startswith("scaler init demo") for line in run)
    script = "set -euo pipefail\n" + "\n".join(f"echo '>>> {i}' >&2\n{line}" for i, line in enumerate(run))
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    done = re.findall(r"^>>> (\d+)$", proc.stderr, flags=re.MULTILINE)
    failed = run[int(done[-1])] if done else "?"
    assert proc.returncode == 0, f"README line failed: {failed}\n{proc.stderr[-3000:]}"
    assert len(done) == len(run)
    for needle in ("added branch spam", "added branch trec", "added branch spam2", "accuracy", "ok: demo"):
        assert needle in proc.stdout, needle
    store = ContentStore.open(tmp_path / "scaler-store")
    # `scaler rollback demo 2`, then `expand` (v5, on v2) and `teacher add` (v6)
    current = store.get_manifest(store.resolve("demo"))
    expanded = store.get_manifest(current["parent"])
    assert current["version"] == 6 and "minilm" in current["teachers"]
    assert expanded["version"] == 5 and store.get_manifest(expanded["parent"])["version"] == 2
