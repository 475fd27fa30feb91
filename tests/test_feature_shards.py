"""Large data: trunk features computed and cached in shards of bounded size, each shard its
own bound cache file, read back as one matrix without concatenating them."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import DATA

import scaler_wizard.caches.features as features
from scaler_wizard.banks import ContentStore
from scaler_wizard.caches.feature_shards import ShardedRows, rows_tensor
from scaler_wizard.caches.features import cache_dir as features_dir
from scaler_wizard.modeling.compose import compose, trunk_id
from scaler_wizard.training.branch_add import DataSpec, add_branch
from scaler_wizard.training.branch_fit import BranchTrainingConfig

SMS = DATA / "samples" / "sms_spam_small.csv"
FAST = BranchTrainingConfig(epochs=3)


def test_sharded_rows_read_like_one_matrix() -> None:
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 4, generator=gen) for n in (5, 1, 7, 3)]
    whole = torch.cat(parts)
    rows = ShardedRows(parts)
    assert len(rows) == 16 and rows.shape == (16, 4)
    idx = torch.randint(0, 16, (40,), generator=gen)
    assert torch.equal(rows[idx], whole[idx])
    for lo, hi in ((0, 16), (3, 9), (5, 6), (6, 13), (13, 16), (4, 4)):
        view = rows[lo:hi]
        assert len(view) == hi - lo
        assert torch.equal(view.tensor(), whole[lo:hi])
        assert torch.equal(rows_tensor(view, 1, 3), whole[lo:hi][1:3])
        if hi > lo:
            sub = torch.randint(0, hi - lo, (9,), generator=gen)
            assert torch.equal(view[sub], whole[lo:hi][sub])
    with pytest.raises(IndexError):
        rows[torch.tensor([16])]


def test_large_data_is_featurised_in_shards_each_bound_and_reused(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(features, "SHARD_ROWS", 64)
    model = compose(store, "demo")
    assert model.origin is not None
    tid = trunk_id(model.origin.manifest)
    texts = [str(t) for t in pd.read_csv(SMS)["text"]][:150]
    ticks: list[int] = []
    feats, cached = features.cached_pooled(store, model, tid, texts, batch_size=16, progress=ticks.append)
    assert not cached and isinstance(feats, ShardedRows) and len(feats) == 150
    assert sum(ticks) == 150 and max(ticks) <= 16  # progress per batch, from the first one
    files = sorted(features_dir(store).iterdir())
    assert len(files) == 3  # 64 + 64 + 22 rows, one bound file each
    whole = feats.tensor()
    alone = features.compute_pooled(model, texts)
    assert torch.allclose(whole, alone, atol=1e-5)

    again, cached = features.cached_pooled(store, model, tid, texts)
    assert cached and torch.equal(again.tensor(), whole)  # type: ignore[union-attr]

    # one damaged shard: only it is recomputed, the others are reused as they are
    good = {f: f.read_bytes() for f in files}
    data = bytearray(good[files[1]])
    data[-7] ^= 0x01
    files[1].write_bytes(bytes(data))
    third, cached = features.cached_pooled(store, model, tid, texts, batch_size=16)
    assert not cached and torch.equal(third.tensor(), whole)  # type: ignore[union-attr]
    assert {f: f.read_bytes() for f in files} == good


def test_branch_add_on_sharded_features(store: ContentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "SHARD_ROWS", 64)
    first = add_branch(store, "demo", "sms", DataSpec(SMS), training=FAST)
    assert not first.features_cached and len(list(features_dir(store).iterdir())) > 1
    second = add_branch(store, "demo", "sms2", DataSpec(SMS), training=FAST)
    assert second.features_cached
    branches = store.get_manifest(store.resolve("demo"))["branches"]
    # same features, same seed: the same weights (the banks' bytes also record the branch name)
    assert branches["sms2"]["fingerprint"] == branches["sms"]["fingerprint"]
    assert branches["sms2"]["metrics"] == branches["sms"]["metrics"]
    assert 0.5 <= branches["sms"]["metrics"]["accuracy"] <= 1.0
