"""Strategy ``attn-mlp`` (issue 12): attention pooling + MLP over the trunk's token states,
trained on cached float16 token states, sharing the one trunk pass with every other branch.

Real model (the session store's ``demo``: branches ``spam`` and ``topic`` of strategy ``lora``),
real cache files, real training on a few rows of the bundled sample.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA, run_scaler
from torch import Tensor

from scaler_wizard.banks import ContentStore
from scaler_wizard.caches.bound_cache import read_bound, write_bound
from scaler_wizard.caches.features import feature_kind
from scaler_wizard.caches.token_features import (
    KIND,
    SHARD_ROWS,
    TokenRows,
    cache_dir,
    cached_tokens,
    compute_tokens,
    token_key,
)
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.compose import compose, new_branch, trunk_id
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.modeling.tensor_banks import load_bank_tensors
from scaler_wizard.plugins.attn_mlp import AttentionMLP, AttnMLPConfig
from scaler_wizard.training.branch_add import DEFAULT_STRATEGY, DataSpec, add_branch
from scaler_wizard.training.branch_fit import BranchTrainingConfig

SMS = DATA / "samples" / "sms_spam_small.csv"
OLD = ["spam", "topic"]
TEXTS = [
    "WINNER!! Claim your free prize now, text WIN to 80082",
    "Are we still on for lunch tomorrow?",
    "How far is it from Denver to Aspen?",
    "ok",
]
FAST = BranchTrainingConfig(epochs=2)


@torch.inference_mode()
def logits_of(model: ScalerModel, branches: list[str]) -> dict[str, Tensor]:
    model.eval()
    batch = model.base.tokenize(TEXTS, model.device)
    return {k: v.clone() for k, v in model(**batch, branches=branches).logits.items()}


def test_attn_mlp_is_the_default_strategy_and_declares_token_features() -> None:
    assert DEFAULT_STRATEGY == "attn-mix"  # (tests/test_layer_mix.py); attn-mlp stays built in
    branch = new_branch(hidden_size=384, labels=["a", "b"])  # the library default is still lora
    assert branch.entry["strategy"]["plugin"] == "lora" and feature_kind(branch.adapter) == "pooled"
    tail = new_branch(hidden_size=384, labels=["a", "b"], strategy="attn-mlp")
    assert feature_kind(tail.adapter) == "tokens"
    assert not tail.adapter.needs_base_pass  # it shares the one trunk pass


def test_feature_kind_refuses_an_unknown_kind() -> None:
    class Odd:
        features = "layers"

    with pytest.raises(ScalerError, match="'layers'"):
        feature_kind(Odd())


@torch.inference_mode()
def test_a_new_attn_mlp_starts_at_the_pooled_output_and_ignores_padding(store: ContentStore) -> None:
    model = compose(store, "demo").eval()
    torch.manual_seed(0)
    adapter = AttentionMLP(AttnMLPConfig(), hidden_size=384).eval()
    batch = model.base.tokenize(TEXTS, model.device)
    trunk = model.encode(**batch)
    assert torch.equal(adapter(trunk), trunk.pooled)  # zero-initialised residuals
    torch.nn.init.normal_(adapter.proj.weight, std=0.05)
    torch.nn.init.normal_(adapter.mlp_out.weight, std=0.05)
    together = adapter(trunk)
    alone = adapter(model.encode(**model.base.tokenize(TEXTS[3:], model.device)))  # no padding
    torch.testing.assert_close(together[3:], alone, rtol=1e-4, atol=1e-5)


def test_old_branches_are_bit_identical_when_an_attn_mlp_branch_is_added(store: ContentStore) -> None:
    before_hash = store.resolve("demo")
    before = store.get_manifest(before_hash)
    before_logits = logits_of(compose(store, "demo"), OLD)
    result = add_branch(store, "demo", "tail", DataSpec(SMS), strategy="attn-mlp", training=FAST)
    after = store.get_manifest(result.manifest)
    assert after["branches"]["tail"]["strategy"]["plugin"] == "attn-mlp"
    for name in OLD:
        assert after["branches"][name] == before["branches"][name]
    model = compose(store, "demo")
    after_logits = logits_of(model, OLD + ["tail"])
    for name in OLD:
        assert torch.equal(after_logits[name], before_logits[name]), name
    # the new branch gives the same logits whether asked alone or with every other branch
    alone = logits_of(compose(store, "demo"), ["tail"])["tail"]
    assert torch.equal(alone, after_logits["tail"])


def test_token_cache_matches_the_live_trunk_pass(store: ContentStore) -> None:
    model = compose(store, "demo")
    tid = trunk_id(model.origin.manifest)
    rows, cached = cached_tokens(store, model, tid, TEXTS)
    assert not cached and len(rows) == len(TEXTS)
    with torch.inference_mode():
        live = model.eval().encode(**model.base.tokenize(TEXTS, model.device))
    got = rows.batch(torch.arange(len(TEXTS)))
    assert torch.equal(got.mask, live.mask)
    torch.testing.assert_close(got.pooled, live.pooled.float(), rtol=1e-4, atol=1e-5)
    m = live.mask.unsqueeze(-1)
    torch.testing.assert_close(got.hidden * m, live.hidden.float() * m, rtol=2e-3, atol=2e-3)  # float16
    again, cached = cached_tokens(store, model, tid, TEXTS)
    assert cached
    pair = again.batch(torch.tensor([2, 0])).hidden  # padded to the longer of the two
    assert torch.equal(pair, got.hidden[[2, 0]][:, : pair.shape[1]])


def test_large_data_is_cached_in_bounded_shards(store: ContentStore, monkeypatch: Any) -> None:
    """More texts than a shard holds: one cache file per shard, rows read across them."""
    import scaler_wizard.caches.token_features as tf

    model = compose(store, "demo")
    tid = trunk_id(model.origin.manifest)
    texts = [f"message number {i} " + "word " * (i % 7) for i in range(11)]
    monkeypatch.setattr(tf, "SHARD_ROWS", 4)
    rows, cached = tf.cached_tokens(store, model, tid, texts)
    assert not cached and len(list(cache_dir(store).iterdir())) == 3
    assert [len(s) for s in rows.shards] == [4, 4, 3]
    whole = compute_tokens(model, texts)
    view = rows[2:9]  # crosses both shard boundaries
    got = view.batch(torch.arange(7))
    for j in range(7):
        a, b = int(whole.offsets[j + 2]), int(whole.offsets[j + 3])
        # (another batch composition: equal up to float16 rounding)
        torch.testing.assert_close(got.hidden[j, : b - a], whole.states[a:b].float(), rtol=2e-3, atol=2e-3)
        assert not got.hidden[j, b - a :].any()  # padding stays zero
        assert int(got.mask[j].sum()) == b - a
    assert SHARD_ROWS >= 1024  # the real bound stays large enough to matter


def _cache_file(store: ContentStore) -> Path:
    files = sorted(cache_dir(store).iterdir())
    assert len(files) == 1, files
    return files[0]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def _swap_with_another(path: Path, store: ContentStore, model: ScalerModel, tid: str) -> None:
    """Another text list's (valid, bound) cache file copied over this one's name."""
    other, _ = cached_tokens(store, model, tid, ["something else entirely"])
    other_file = next(p for p in cache_dir(store).iterdir() if p != path)
    shutil.copyfile(other_file, path)
    del other


def _bad_offsets(path: Path, store: ContentStore, model: ScalerModel, tid: str) -> None:
    """A well-formed, checksummed file bound to the right key whose offsets are out of range."""
    key = token_key(tid, TEXTS, model.base.max_length)
    bound = {"trunk": tid, "rows": len(TEXTS), "dtype": "float16", "max_length": model.base.max_length}
    d = model.trunk_hidden_size()
    expect = {
        "states": (torch.float16, (None, d)),
        "offsets": (torch.int64, (len(TEXTS) + 1,)),
        "pooled": (torch.float32, (len(TEXTS), d)),
    }
    found = read_bound(path, kind=KIND, key=key, bound=bound, expect=expect)
    assert found is not None
    tensors = {k: v.clone() for k, v in found.items()}
    tensors["offsets"][2] = tensors["offsets"][-1] + 100
    path.unlink()
    write_bound(path, tensors, kind=KIND, key=key, bound=bound)


def _nan_states(path: Path, store: ContentStore, model: ScalerModel, tid: str) -> None:
    key = token_key(tid, TEXTS, model.base.max_length)
    bound = {"trunk": tid, "rows": len(TEXTS), "dtype": "float16", "max_length": model.base.max_length}
    from safetensors.torch import load_file

    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    tensors["states"][0, 0] = float("nan")
    path.unlink()
    write_bound(path, tensors, kind=KIND, key=key, bound=bound)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p, *_: _flip_byte(p),
        lambda p, *_: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p, *_: p.write_bytes(b""),
        _swap_with_another,
        _bad_offsets,
        _nan_states,
    ],
    ids=["flipped-byte", "truncated", "empty", "swapped", "bad-offsets", "nan"],
)
def test_a_damaged_or_swapped_token_cache_is_recomputed(store: ContentStore, damage: Any) -> None:
    model = compose(store, "demo")
    tid = trunk_id(model.origin.manifest)
    first, _ = cached_tokens(store, model, tid, TEXTS)
    reference = first.batch(torch.arange(len(TEXTS)))
    path = _cache_file(store)
    good = path.read_bytes()
    del first
    damage(path, store, model, tid)
    rows, cached = cached_tokens(store, model, tid, TEXTS)
    assert not cached  # not trusted: recomputed
    got = rows.batch(torch.arange(len(TEXTS)))
    assert torch.equal(got.hidden, reference.hidden) and torch.equal(got.pooled, reference.pooled)
    assert path.read_bytes() == good  # rewritten bit for bit


def test_branch_add_reuses_the_token_cache(store: ContentStore) -> None:
    first = add_branch(store, "demo", "t1", DataSpec(SMS), strategy="attn-mlp", training=FAST)
    assert not first.features_cached
    assert len(list(cache_dir(store).iterdir())) == 1
    second = add_branch(store, "demo", "t2", DataSpec(SMS), strategy="attn-mlp", training=FAST)
    assert second.features_cached
    m = store.get_manifest(second.manifest)
    # same cached features, seed and data: the same weights, bit for bit (the banks differ only
    # in the branch name they record)
    for bank in ("adapter_bank", "head_bank"):
        a, b = (load_bank_tensors(store.verified_path(m["branches"][n][bank])) for n in ("t1", "t2"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_token_rows_refuse_out_of_range_rows(store: ContentStore) -> None:
    model = compose(store, "demo")
    rows, _ = cached_tokens(store, model, trunk_id(model.origin.manifest), TEXTS)
    assert isinstance(rows, TokenRows)
    with pytest.raises(IndexError):
        rows[1:3].batch(torch.tensor([2]))


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ('{"heads": 5}', "heads (5) must divide the hidden size (384)"),
        ('{"heads": 0}', "heads"),
        ('{"dropout": 2}', "dropout"),
        ('{"hidden": "wide"}', "hidden"),
        ('{"width": 3}', "width"),
    ],
    ids=["heads-not-dividing", "heads-0", "dropout-2", "hidden-not-int", "unknown-key"],
)
def test_a_bad_attn_mlp_config_is_one_clear_error(
    config: str, needle: str, scaler_env: dict[str, str]
) -> None:
    proc = run_scaler(
        "branch", "add", "demo", "bad", "--data", str(SMS), "--strategy-config", config, env=scaler_env
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "internal error" not in proc.stderr
