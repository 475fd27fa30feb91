"""Derived caches are bound to their inputs, and nothing non-finite is ever saved as a version.

The trunk-feature cache (``branch add``) and the base-state cache (``scaler train``) are named
by a hash of their inputs. A file under such a name is only *claimed* to hold those inputs'
outputs: each attack below puts a file there that does not (another dataset's cache, NaN
features with a checksum that matches them, a flipped byte, a truncated file, another dtype,
another row count). Each must be a miss: recomputed, and the branch or trunk trained from it
equal to the one trained from a clean cache. Non-finite features, losses or weights are
refused with a one-line error and the model's ref unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA, _copy_store, run_scaler
from train_helpers import SMS as TRAIN_SMS
from train_helpers import TREC, copy_store, one_thread, tiny_template  # noqa: F401

from scaler_wizard.banks import ContentStore
from scaler_wizard.caches.base_states import KIND as STATES_KIND
from scaler_wizard.caches.base_states import cache_dir as states_dir
from scaler_wizard.caches.base_states import cached_states
from scaler_wizard.caches.bound_cache import write_bound
from scaler_wizard.caches.features import KIND as FEATURE_KIND
from scaler_wizard.caches.features import cache_dir as features_dir
from scaler_wizard.caches.features import feature_key
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.compose import compose, trunk_id
from scaler_wizard.modeling.tensor_banks import load_bank_tensors
from scaler_wizard.training.branch_add import DataSpec, add_branch
from scaler_wizard.training.branch_fit import BranchTrainingConfig

SMS = DATA / "samples" / "sms_spam_small.csv"
FAST = BranchTrainingConfig(epochs=3)
BANKS = ("adapter_bank", "head_bank")


@dataclass
class Clean:
    cache: Path  # the clean feature-cache file
    data: bytes
    entry: dict[str, Any]  # the branch trained from it
    meta: dict[str, Any]  # what the file is for: its key, trunk, rows, dtype, max_length


@pytest.fixture(scope="module")
def clean(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Clean:
    """``branch add demo sms`` on a clean store: its cache file and its branch."""
    root = tmp_path_factory.mktemp("clean-cache") / "store"
    _copy_store(session_store, root)
    store = ContentStore.open(root)
    result = add_branch(store, "demo", "sms", DataSpec(SMS), training=FAST)
    assert not result.features_cached
    [cache] = sorted(features_dir(store).iterdir())
    manifest = store.get_manifest(store.resolve("demo"))
    meta = {
        "key": cache.stem,
        "trunk": trunk_id(manifest),
        "rows": int(load_bank_tensors(cache)["pooled"].shape[0]),
        "dtype": "float32",
        "max_length": compose(store, "demo").base.max_length,
    }
    return Clean(cache, cache.read_bytes(), manifest["branches"]["sms"], meta)


def _bound(meta: dict[str, Any], **changes: Any) -> dict[str, Any]:
    bound = {k: meta[k] for k in ("trunk", "rows", "dtype", "max_length")}
    bound.update(changes)
    return bound


# -- the trunk-feature cache: each attack is recomputed, and the branch is the clean one -------


def swapped_from_other_inputs(path: Path, clean: Clean) -> None:
    """Dataset A's cache file (same trunk, same row count) copied over dataset B's name."""
    meta = clean.meta
    feats = load_bank_tensors(clean.cache)["pooled"].flip(0).clone()
    other = feature_key(meta["trunk"], ["another dataset"] * int(meta["rows"]), int(meta["max_length"]))
    other_path = path.parent / f"{other}.safetensors"
    write_bound(other_path, {"pooled": feats}, kind=FEATURE_KIND, key=other, bound=_bound(meta))
    path.write_bytes(other_path.read_bytes())


def nan_with_matching_checksum(path: Path, clean: Clean) -> None:
    meta = clean.meta
    feats = torch.full_like(load_bank_tensors(clean.cache)["pooled"], float("nan"))
    write_bound(path, {"pooled": feats}, kind=FEATURE_KIND, key=meta["key"], bound=_bound(meta))


def flipped_byte(path: Path, clean: Clean) -> None:
    data = bytearray(clean.data)
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def truncated(path: Path, clean: Clean) -> None:
    path.write_bytes(clean.data[: len(clean.data) // 2])


def wrong_dtype(path: Path, clean: Clean) -> None:
    """The right numbers, checksummed, but float64 (metadata otherwise untouched)."""
    meta = clean.meta
    feats = load_bank_tensors(clean.cache)["pooled"].double()
    write_bound(path, {"pooled": feats}, kind=FEATURE_KIND, key=meta["key"], bound=_bound(meta))


def wrong_row_count(path: Path, clean: Clean) -> None:
    """One row short, and the file says so consistently (rows, shape, checksum)."""
    meta = clean.meta
    feats = load_bank_tensors(clean.cache)["pooled"][:-1].clone()
    rows = int(meta["rows"]) - 1
    write_bound(path, {"pooled": feats}, kind=FEATURE_KIND, key=meta["key"], bound=_bound(meta, rows=rows))


def wrong_trunk(path: Path, clean: Clean) -> None:
    meta = clean.meta
    feats = load_bank_tensors(clean.cache)["pooled"].clone()
    write_bound(
        path,
        {"pooled": feats},
        kind=FEATURE_KIND,
        key=meta["key"],
        bound=_bound(meta, trunk="sha256:" + "0" * 64),
    )


FEATURE_ATTACKS: list[Callable[[Path, Clean], None]] = [
    swapped_from_other_inputs,
    nan_with_matching_checksum,
    flipped_byte,
    truncated,
    wrong_dtype,
    wrong_row_count,
    wrong_trunk,
]


@pytest.mark.parametrize("attack", FEATURE_ATTACKS, ids=lambda f: f.__name__)
def test_feature_cache_attack_is_recomputed_and_trains_the_clean_branch(
    attack: Callable[[Path, Clean], None], clean: Clean, store: ContentStore
) -> None:
    path = features_dir(store) / clean.cache.name
    path.parent.mkdir(parents=True, exist_ok=True)
    attack(path, clean)
    assert path.read_bytes() != clean.data
    result = add_branch(store, "demo", "sms", DataSpec(SMS), training=FAST)
    assert result.features_cached is False
    entry = store.get_manifest(store.resolve("demo"))["branches"]["sms"]
    assert {b: entry[b] for b in BANKS} == {b: clean.entry[b] for b in BANKS}
    assert entry["fingerprint"] == clean.entry["fingerprint"]
    assert entry["metrics"] == clean.entry["metrics"]
    assert path.read_bytes() == clean.data  # the cache is rewritten with the true features


def test_clean_feature_cache_is_used(clean: Clean, store: ContentStore) -> None:
    """The control: the same clean file is a hit and gives the same branch."""
    path = features_dir(store) / clean.cache.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(clean.data)
    result = add_branch(store, "demo", "sms", DataSpec(SMS), training=FAST)
    assert result.features_cached is True
    entry = store.get_manifest(store.resolve("demo"))["branches"]["sms"]
    assert {b: entry[b] for b in BANKS} == {b: clean.entry[b] for b in BANKS}


def test_cli_branch_add_does_not_train_on_another_datasets_cache(
    clean: Clean, store: ContentStore, scaler_env: dict[str, str]
) -> None:
    path = features_dir(store) / clean.cache.name
    path.parent.mkdir(parents=True, exist_ok=True)
    swapped_from_other_inputs(path, clean)
    res = run_scaler(
        "branch",
        "add",
        "demo",
        "sms",
        "--data",
        str(SMS),
        "--epochs",
        "3",
        "--json",
        "--strategy",
        "lora",
        env=scaler_env,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["features_cached"] is False
    assert "internal error" not in res.stderr
    entry = store.get_manifest(store.resolve("demo"))["branches"]["sms"]
    assert {b: entry[b] for b in BANKS} == {b: clean.entry[b] for b in BANKS}


# -- the base-state cache (scaler train) -------------------------------------------------------

TEXTS = ["Free entry! Text WIN now", "ok", "Who wrote Hamlet and when was it first performed?"]


def _data_range(path: Path, name: str) -> tuple[int, int]:
    """Byte range of tensor ``name``'s data in a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _flip_in_states(path: Path, *, every_example: bool = False) -> None:
    """Flip one exponent bit of one float in the states (or one in each example's states)."""
    start, end = _data_range(path, "states")
    tensors = load_bank_tensors(path)
    row_bytes = tensors["states"].shape[1] * 4
    if every_example:
        rows = tensors["offsets"][:-1].tolist()
    else:
        rows = [int(tensors["offsets"][-1]) // 2]
    del tensors
    data = bytearray(path.read_bytes())
    for row in rows:
        data[start + row * row_bytes + 3] ^= 0x40  # the high byte of a little-endian float32
    assert start + max(rows) * row_bytes + 3 < end
    path.unlink()  # the template's cache files are hard links: never write into one
    path.write_bytes(bytes(data))


def _states_bound(meta: dict[str, Any], **changes: Any) -> dict[str, Any]:
    bound = {k: meta[k] for k in ("base", "rows", "dtype", "max_length", "hidden")}
    bound.update(changes)
    return bound


def states_swapped(path: Path, clean: bytes, meta: dict[str, Any]) -> None:
    """The cache of three other texts (same base, same row count) under these texts' name."""
    t = load_bank_tensors(path)
    flat = torch.randn(int(t["offsets"][-1]) + 5, t["states"].shape[1])
    offsets = t["offsets"].clone()
    offsets[1:] += torch.tensor([1, 3, 5])
    write_bound(
        path, {"states": flat, "offsets": offsets}, kind=STATES_KIND, key="0" * 64, bound=_states_bound(meta)
    )


def states_nan_with_matching_checksum(path: Path, clean: bytes, meta: dict[str, Any]) -> None:
    t = load_bank_tensors(path)
    flat = torch.full_like(t["states"], float("nan"))
    write_bound(
        path,
        {"states": flat, "offsets": t["offsets"].clone()},
        kind=STATES_KIND,
        key=meta["key"],
        bound=_states_bound(meta),
    )


def states_flipped_byte(path: Path, clean: bytes, meta: dict[str, Any]) -> None:
    _flip_in_states(path)


def states_truncated(path: Path, clean: bytes, meta: dict[str, Any]) -> None:
    path.write_bytes(clean[: len(clean) - 100])


def states_wrong_dtype(path: Path, clean: bytes, meta: dict[str, Any]) -> None:
    """float16 states (checksummed) under the float32 key."""
    t = load_bank_tensors(path)
    tensors = {"states": t["states"].half(), "offsets": t["offsets"].clone()}
    write_bound(path, tensors, kind=STATES_KIND, key=meta["key"], bound=_states_bound(meta))


def states_wrong_row_count(path: Path, clean: bytes, meta: dict[str, Any]) -> None:
    t = load_bank_tensors(path)
    offsets = t["offsets"][:-1].clone()
    tensors = {"states": t["states"][: int(offsets[-1])].clone(), "offsets": offsets}
    write_bound(path, tensors, kind=STATES_KIND, key=meta["key"], bound=_states_bound(meta, rows=2))


STATE_ATTACKS: list[Callable[[Path, bytes, dict[str, Any]], None]] = [
    states_swapped,
    states_nan_with_matching_checksum,
    states_flipped_byte,
    states_truncated,
    states_wrong_dtype,
    states_wrong_row_count,
]


@pytest.fixture
def tiny(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> ContentStore:
    dst = tmp_path / "tiny"
    copy_store(tiny_template(tmp_path_factory), dst)
    return ContentStore.open(dst)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("attack", STATE_ATTACKS, ids=lambda f: f.__name__)
def test_base_state_cache_attack_is_recomputed(
    attack: Callable[[Path, bytes, dict[str, Any]], None], tiny: ContentStore
) -> None:
    model = compose(tiny, "tiny")
    assert model.origin is not None
    before = set(states_dir(tiny).iterdir())
    states, hit = cached_states(tiny, model.base, model.origin.base_entry, TEXTS)
    assert not hit
    [path] = set(states_dir(tiny).iterdir()) - before
    clean = path.read_bytes()
    flat, offsets = states.flat.clone(), states.offsets.clone()  # states map the file's memory
    meta = {
        "key": path.stem,
        "base": model.origin.base_entry["bank"],
        "rows": len(TEXTS),
        "dtype": "float32",
        "max_length": model.base.max_length,
        "hidden": model.base.hidden_size,
    }
    attack(path, clean, meta)
    assert path.read_bytes() != clean
    again, hit = cached_states(tiny, model.base, model.origin.base_entry, TEXTS)
    assert hit is False
    assert torch.equal(again.flat, flat) and torch.equal(again.offsets, offsets)
    assert path.read_bytes() == clean  # rewritten with the true states


SMALL = {"steps": 2, "batch_size": 16, "eval_every": 2, "checkpoint_every": 2, "check_window": 2}


def _train(store: ContentStore, run_dir: Path, **cfg: Any) -> Any:
    from scaler_wizard.training.config import BranchSpec, TrainConfig
    from scaler_wizard.training.loop import make_accelerator, plan_run, start_run, train_run

    config = TrainConfig(**{**SMALL, **cfg})
    plan = plan_run(store, "tiny", [BranchSpec("spam", TRAIN_SMS), BranchSpec("trec", TREC)], config)
    acc = make_accelerator()
    path = start_run(store, plan, run_dir=run_dir, accelerator=acc)
    return train_run(store, path, accelerator=acc)


def _trunk_banks(store: ContentStore) -> list[str]:
    return [layer["bank"] for layer in store.get_manifest(store.resolve("tiny"))["trunk"]["layers"]]


@pytest.mark.usefixtures("one_thread")
def test_flipped_bytes_in_base_state_cache_train_the_same_trunk(
    tiny: ContentStore, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    clean_root = tmp_path / "clean"
    copy_store(tiny_template(tmp_path_factory), clean_root)
    clean = ContentStore.open(clean_root)
    _train(clean, tmp_path / "run-clean")
    files = sorted(states_dir(tiny).iterdir())
    assert len(files) == 2  # the template's: SMS and TREC
    for f in files:  # one flipped byte per example: whichever the sampler draws, it is damaged
        _flip_in_states(f, every_example=True)
    _train(tiny, tmp_path / "run-flipped")
    assert _trunk_banks(tiny) == _trunk_banks(clean)
    parent = tiny.get_manifest(tiny.get_manifest(tiny.resolve("tiny"))["parent"])
    assert _trunk_banks(tiny) != [layer["bank"] for layer in parent["trunk"]["layers"]]  # it did train


# -- nothing non-finite becomes a version ------------------------------------------------------


def _nan_features(monkeypatch: pytest.MonkeyPatch) -> None:
    import scaler_wizard.caches.features as features

    real = features.compute_pooled

    def nan(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        return torch.full_like(out, float("nan"))

    monkeypatch.setattr(features, "compute_pooled", nan)


def _nan_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from scaler_wizard.branch import Head

    real = Head.loss
    monkeypatch.setattr(Head, "loss", lambda self, logits, y: real(self, logits, y) * float("nan"))


def _inf_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head weight that the loss never sees is infinite (the loss stays finite)."""
    import scaler_wizard.training.branch_add as branch_add

    real = branch_add.new_branch

    def poisoned(**kwargs: Any) -> Any:
        branch = real(**kwargs)
        branch.head.register_parameter("unused", torch.nn.Parameter(torch.tensor([float("inf")])))
        return branch

    monkeypatch.setattr(branch_add, "new_branch", poisoned)


@pytest.mark.parametrize("poison", [_nan_features, _nan_loss, _inf_weight], ids=lambda f: f.__name__[1:])
def test_branch_add_refuses_non_finite_and_saves_nothing(
    poison: Callable[[pytest.MonkeyPatch], None], store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = store.resolve("demo")
    manifests = set(store.iter_manifests())
    poison(monkeypatch)
    with pytest.raises(ScalerError, match="not finite|diverged") as info:
        add_branch(store, "demo", "sms", DataSpec(SMS), training=FAST)
    assert "\n" not in str(info.value)
    assert store.resolve("demo") == head
    assert set(store.iter_manifests()) == manifests
    assert not list(features_dir(store).glob("*.safetensors")) or poison is not _nan_features


def _train_nan_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from scaler_wizard.training.loop import MultiTaskModule

    real = MultiTaskModule.forward

    def forward(self: Any, *args: Any) -> dict[str, torch.Tensor]:
        out = real(self, *args)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(MultiTaskModule, "forward", forward)


def _train_inf_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the last step (at the final evaluation) one trunk weight becomes infinite."""
    import scaler_wizard.training.loop as tt

    real = tt.evaluate
    calls: list[int] = []

    def evaluate(module: Any, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # step 0, then the final one (eval_every == steps)
            with torch.no_grad():
                next(module.trunk.parameters()).view(-1)[0] = float("inf")
        return real(module, *args)

    monkeypatch.setattr(tt, "evaluate", evaluate)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("poison", [_train_nan_loss, _train_inf_weight], ids=lambda f: f.__name__[1:])
def test_scaler_train_refuses_non_finite_and_saves_nothing(
    poison: Callable[[pytest.MonkeyPatch], None],
    tiny: ContentStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    head = tiny.resolve("tiny")
    manifests = set(tiny.iter_manifests())
    poison(monkeypatch)
    with pytest.raises(ScalerError, match="not finite|diverged") as info:
        _train(tiny, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert tiny.resolve("tiny") == head
    assert set(tiny.iter_manifests()) == manifests
    assert not (tmp_path / "run" / "result.json").exists()
