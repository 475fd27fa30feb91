"""Batch prediction on Ray Data (issue 15 item 4), on a real local Ray cluster.

One local Ray instance (``ray.init``, 2 CPUs) per module, started and shut down here: the
library tests run in this driver, the CLI test runs the real ``scaler`` console script as a
second driver joining it with ``--address``. Predictions are checked against local
prediction of the same file (labels equal, scores within 1e-5).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import DATA, _copy_store, run_scaler

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ManifestMismatchError
from scaler_wizard.inference.files import predict_file
from scaler_wizard.modeling.compose import compose, save_version

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),  # a Ray hang fails instead of stalling the suite
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),  # Ray Data's own settings
]
ray = pytest.importorskip("ray")

SAMPLE = DATA / "samples" / "sms_spam_small.csv"  # 200 rows: text, label
BRANCHES = ["spam", "topic"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One local Ray instance (2 CPUs) for the module; yields the address other drivers join."""
    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE")}
    # a test cluster on this machine only: no usage reports, no token for the CLI to find
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    ray.init(
        address="local",  # a new instance, never a cluster left running on the machine
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        object_store_memory=256 * 1024 * 1024,
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _local(store: ContentStore, dst: Path, branches: list[str]) -> pd.DataFrame:
    predict_file(compose(store, "demo"), SAMPLE, dst, branches=branches)
    return pd.read_csv(dst, dtype=str, keep_default_na=False)


def _same(got: pd.DataFrame, want: pd.DataFrame, branches: list[str]) -> None:
    assert (
        list(got.columns)
        == list(want.columns)
        == ["text", "label", *[c for b in branches for c in (b, f"{b}_score")]]
    )
    assert list(got["text"]) == list(want["text"]) and list(got["label"]) == list(want["label"])
    for b in branches:
        assert list(got[b]) == list(want[b])
        assert [float(s) for s in got[f"{b}_score"]] == pytest.approx(
            [float(s) for s in want[f"{b}_score"]], abs=1e-5
        )


def test_ray_labels_the_pinned_version_like_local_predict(
    cluster: str, store: ContentStore, tmp_path: Path
) -> None:
    from scaler_wizard.inference.ray_engine import predict_dataset_on_ray

    want = _local(store, tmp_path / "local.csv", BRANCHES)
    pinned = str(store.resolve("demo"))
    job = predict_dataset_on_ray(store, "demo", SAMPLE, "text", BRANCHES, actors=2, call_rows=40)
    assert job.manifest_hash == pinned and job.branches == BRANCHES
    # the ref moves after submit (a new version without `topic`): the job keeps the pinned one
    moved = compose(store, "demo")
    moved.remove_branch("topic")
    save_version(store, moved, message="drop topic")
    assert str(store.resolve("demo")) != pinned
    rows: list[dict[str, Any]] = [
        r for t in job.dataset.iter_batches(batch_size=None, batch_format="pyarrow") for r in t.to_pylist()
    ]
    got = pd.DataFrame(rows, columns=job.columns).astype({f"{b}_score": float for b in BRANCHES})
    _same(got.astype(str), want, BRANCHES)


def test_a_worker_store_with_another_manifest_under_the_hash_is_refused(
    cluster: str, store: ContentStore, tmp_path: Path
) -> None:
    from scaler_wizard.inference.ray_engine import predict_file_on_ray

    pinned = store.resolve("demo")
    v1 = store.get_manifest(pinned)["parent"]
    other = tmp_path / "worker-store"
    _copy_store(store.root, other)
    target = ContentStore.open(other).manifest_path(pinned)
    target.unlink()  # a copy of the file, never the shared object
    target.write_bytes(ContentStore.open(other).manifest_path(v1).read_bytes())
    with pytest.raises(ManifestMismatchError) as info:
        predict_file_on_ray(
            store, "demo", SAMPLE, tmp_path / "out.csv", branches=["spam"], worker_store=other
        )
    text = str(info.value)
    assert "\n" not in text and str(pinned) in text and v1 in text and "refusing" in text, text
    assert info.value.expected == str(pinned) and info.value.found == v1
    assert not (tmp_path / "out.csv").exists()


def test_a_worker_store_without_the_manifest_is_refused(store: ContentStore, tmp_path: Path) -> None:
    from scaler_wizard.inference.ray_engine import check_worker_manifest

    pinned = str(store.resolve("demo"))
    empty = ContentStore.open(tmp_path / "empty", create=True)
    with pytest.raises(ManifestMismatchError) as info:
        check_worker_manifest(empty, pinned, "demo")
    assert "\n" not in str(info.value) and f"has no manifest {pinned}" in str(info.value)
    assert info.value.found is None


def test_cli_engine_ray_with_address_matches_local(
    cluster: str, store_path: Path, scaler_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(scaler_env, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    local = run_scaler(
        "predict", "demo", "--data", str(SAMPLE), "-o", str(tmp_path / "local.csv"), "-b", "spam", env=env
    )
    assert local.returncode == 0, local.stderr
    proc = run_scaler(
        "predict", "demo", "--data", str(SAMPLE), "-o", str(tmp_path / "ray.csv"), "-b", "spam",
        "--engine", "ray", "--address", cluster, "--actors", "2",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 200 rows" in proc.stderr and "on Ray, 2 actors" in proc.stderr
    read = {k: pd.read_csv(tmp_path / f"{k}.csv", dtype=str, keep_default_na=False) for k in ("local", "ray")}
    _same(read["ray"], read["local"], ["spam"])


def test_cli_without_ray_names_the_extra(scaler_env: dict[str, str], tmp_path: Path) -> None:
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = dict(scaler_env, PYTHONPATH=str(fake.parent))
    args = ("predict", "demo", "--data", str(SAMPLE), "-o", str(tmp_path / "o.csv"), "-b", "spam")
    proc = run_scaler(*args, "--engine", "ray", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: the ray engine needs Ray: pip install 'scaler-wizard[ray]'"
    usage = run_scaler(*args, "--actors", "2", env=env)
    assert usage.returncode == 2 and "--address and --actors go with --engine ray" in usage.stderr
