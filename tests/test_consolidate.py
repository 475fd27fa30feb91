"""``scaler consolidate`` (issue 13 item 4): a ``scaler train`` run's last checkpoints (a model
trained 8 steps on the SMS + TREC samples, checkpoints at steps 4 and 8) averaged into banks, one
version under the store lock; the parent must be the run's start or result; a SIGKILL at any
moment of the commit leaves the store at its previous version."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import run_scaler
from safetensors.torch import load_file
from test_prune import trained_template
from train_helpers import copy_store, one_thread, subprocess_env  # noqa: F401

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import GrowthError
from scaler_wizard.growth.consolidate import consolidate, list_checkpoints
from scaler_wizard.manifests.facts import trunk_id
from scaler_wizard.modeling.compose import compose
from scaler_wizard.modeling.verify import verify_fingerprints, verify_version
from scaler_wizard.versions.history import rollback


@pytest.fixture
def trained(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, one_thread: None) -> ContentStore:  # noqa: F811
    dst = tmp_path / "store"
    copy_store(trained_template(tmp_path_factory), dst)
    return ContentStore.open(dst)


def run_of(store: ContentStore) -> Path:
    return store.root / "runs" / "tiny" / "train-test"


def checkpoint_weights(store: ContentStore) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(p / "model.safetensors")) for _, p in list_checkpoints(run_of(store))]


def trunk_and_branches(store: ContentStore, spec: str) -> dict[str, torch.Tensor]:
    """The version's weights under the checkpoints' names (``trunk.*``, ``branches.NAME.*``)."""
    model = compose(store, spec)
    model.load_all_branches()
    out = {f"trunk.{k}": v for k, v in model.trunk.state_dict().items()}
    for name in ("spam", "trec"):
        out.update({f"branches.{name}.{k}": v for k, v in model.branch(name).state_dict().items()})
    return out


@pytest.mark.slow
def test_consolidate_mean_then_ema_with_sizes_provenance_and_parent_rules(trained: ContentStore) -> None:
    h2 = str(trained.resolve("tiny"))
    v2 = trained.get_manifest(h2)
    ckpts = checkpoint_weights(trained)
    assert len(ckpts) == 2  # steps 4 and 8 (keep_checkpoints 2)

    result = consolidate(trained, "tiny", run_of(trained))
    h3 = str(trained.resolve("tiny"))
    m = trained.get_manifest(h3)
    assert result.manifest == h3 and m["version"] == 3 and m["parent"] == h2
    assert result.parent_is == "result" and result.steps == [4, 8] and result.method == "mean"
    stored = trunk_and_branches(trained, h3)
    assert set(stored) == set(ckpts[0])
    for key, value in stored.items():
        mean = ((ckpts[0][key].double() + ckpts[1][key].double()) / 2).to(value.dtype)
        assert torch.equal(value, mean), key
    # sizes: the optimizer state is gone
    optimizer = sum(
        (p / "optimizer.safetensors").stat().st_size for _, p in list_checkpoints(run_of(trained))
    )
    assert result.checkpoint_bytes - result.checkpoint_model_bytes >= optimizer
    assert result.bank_bytes < result.checkpoint_bytes - optimizer
    # branches: on the new trunk, consolidation recorded, evaluated, fingerprints re-made
    tid = trunk_id(m)
    for name in ("spam", "trec"):
        entry = m["branches"][name]
        assert entry["trunk"] == tid and "stale" not in entry["provenance"]
        c = entry["provenance"]["consolidation"]
        assert c["steps"] == [4, 8] and c["method"] == "mean" and c["since_version"] == 3
        assert c["optimizer_state"] == "dropped" and c["start_manifest"] == v2["parent"]
        assert entry["provenance"]["training"] == v2["branches"][name]["provenance"]["training"]
        assert entry["metrics"]["accuracy"] == pytest.approx(result.eval[name]["accuracy"])
        assert 0.0 <= result.eval[name]["accuracy_last"] <= 1.0
    assert not [c for c in verify_version(trained, h3) if not c.ok]
    assert not [c for c in verify_fingerprints(trained, h3) if not c.ok]

    # the head is now neither the run's start nor its result: refused, nothing stored
    with pytest.raises(GrowthError, match="another history"):
        consolidate(trained, "tiny", run_of(trained))
    with pytest.raises(GrowthError, match="keeps 2 checkpoints"):
        rollback(trained, "tiny", "2")
        consolidate(trained, "tiny", run_of(trained), last=3)

    # EMA of the last 2 through the CLI, on v2 again (rolled back)
    env = subprocess_env(trained.root)
    args = ["consolidate", "tiny", "--run", str(run_of(trained)), "--last", "2", "--ema", "0.9"]
    done = run_scaler(*args, "--no-eval", "--json", env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["parent"] == h2 and doc["version"] == 4 and doc["method"] == "ema" and doc["eval"] == {}
    stored = trunk_and_branches(trained, doc["manifest"])
    for key, value in stored.items():
        ema = (0.9 * ckpts[0][key].double() + (1 - 0.9) * ckpts[1][key].double()).to(value.dtype)
        assert torch.allclose(value, ema, rtol=0, atol=1e-7), key
    text = run_scaler(*args[:2], "--run", "/nonexistent-run", env=env)
    assert text.returncode != 0 and len(text.stderr.strip().splitlines()) == 1
    assert "internal error" not in text.stderr


@pytest.mark.slow
def test_consolidate_onto_the_runs_start_version(trained: ContentStore) -> None:
    """Rolled back to v1 (the run's start, no branches): the run's branches are built again."""
    rollback(trained, "tiny", "1")
    h1 = str(trained.resolve("tiny"))
    result = consolidate(trained, "tiny", run_of(trained), last=1, run_eval=False)
    m = trained.get_manifest(str(trained.resolve("tiny")))
    assert result.parent_is == "start" and m["parent"] == h1 and result.steps == [8]
    assert set(m["branches"]) == {"spam", "trec"}
    last = checkpoint_weights(trained)[-1]
    stored = trunk_and_branches(trained, str(result.manifest))
    assert all(torch.equal(stored[k], last[k]) for k in last)
    assert not [c for c in verify_fingerprints(trained, str(result.manifest)) if not c.ok]


# -- SIGKILL while committing --------------------------------------------------------------

KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from scaler_wizard.banks import ContentStore
    import scaler_wizard.growth.consolidate as c

    root, at = Path(sys.argv[1]), sys.argv[2]

    def pause(tag):
        print(tag, flush=True)
        time.sleep(120)

    if at == "banks":  # the new banks are written, the manifest is not
        build = c.build_manifest
        def built(*a, **k):
            m = build(*a, **k)
            pause("READY")
            return m
        c.build_manifest = built
    else:  # the manifest is stored, the ref has not moved
        put = ContentStore.put_manifest
        def stored(self, m):
            h = put(self, m)
            pause("READY")
            return h
        ContentStore.put_manifest = stored
    store = ContentStore.open(root)
    c.consolidate(store, "tiny", root / "runs" / "tiny" / "train-test", run_eval=False)
    print("DONE", flush=True)
    """
)


def kill_at(root: Path, at: str, env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(root), at],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "READY", (line, proc.stderr.read() if proc.stderr else "")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_during_consolidation_leaves_the_previous_version(trained: ContentStore) -> None:
    h2 = str(trained.resolve("tiny"))
    before = trunk_and_branches(trained, h2)
    env = subprocess_env(trained.root)
    for at in ("banks", "manifest"):
        kill_at(trained.root, at, env)
        store = ContentStore.open(trained.root)
        assert str(store.resolve("tiny")) == h2, at
        assert not [c for c in verify_version(store, h2) if not c.ok]
        now = trunk_and_branches(store, h2)
        assert all(torch.equal(now[k], before[k]) for k in before)
    # the lock died with the killed writers: a consolidation now completes
    result = consolidate(trained, "tiny", run_of(trained), run_eval=False)
    assert result.version == 3 and str(trained.resolve("tiny")) == result.manifest
