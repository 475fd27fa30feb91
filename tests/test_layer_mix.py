"""Strategy ``attn-mix`` (issue 12): attention pooling + MLP over a learned mix of the encoder's
last layers (the trunk's output on top, the base's layers below it), trained on cached float16
states of those layers, sharing the one trunk pass with every other branch.

Real model (the session store's ``demo``: branches ``spam`` and ``topic`` of strategy ``lora``),
real cache files, real training on a few rows of the bundled sample, a real ``scaler train``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DATA
from torch import Tensor
from train_helpers import SMS as TRAIN_SMS
from train_helpers import TREC, copy_store, one_thread, tiny_template  # noqa: F401  (fixture)

from scaler_wizard.banks import ContentStore
from scaler_wizard.caches.features import feature_kind
from scaler_wizard.caches.token_features import cached_tokens
from scaler_wizard.errors import ScalerError
from scaler_wizard.modeling.compose import compose, new_branch, trunk_id
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.plugins.attn_mlp import AttentionMix, AttnMixConfig
from scaler_wizard.training.branch_add import DataSpec, add_branch
from scaler_wizard.training.branch_fit import BranchTrainingConfig
from scaler_wizard.training.config import BranchSpec, TrainConfig
from scaler_wizard.training.loop import make_accelerator, plan_run, start_run, train_run

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
def logits_of(model: ScalerModel, branches: list[str], texts: list[str] = TEXTS) -> dict[str, Tensor]:
    model.eval()
    batch = model.base.tokenize(texts, model.device)
    return {k: v.clone() for k, v in model(**batch, branches=branches).logits.items()}


def test_attn_mix_is_registered_reads_tokens_and_base_layers() -> None:
    branch = new_branch(hidden_size=384, labels=["a", "b"], strategy="attn-mix")
    assert branch.entry["strategy"]["config"]["layers"] == 3
    assert feature_kind(branch.adapter) == "tokens" and branch.adapter.base_layers == 2
    assert not branch.adapter.needs_base_pass  # it shares the one trunk pass
    one = new_branch(hidden_size=384, labels=["a", "b"], strategy="attn-mix", strategy_config={"layers": 1})
    assert one.adapter.base_layers == 0


@torch.inference_mode()
def test_asking_for_base_layers_leaves_the_last_layer_bit_identical(store: ContentStore) -> None:
    model = compose(store, "demo").eval()
    batch = model.base.tokenize(TEXTS, model.device)
    plain = model.encode_batch(batch)
    mixed = model.encode_batch(batch, base_layers=3)
    assert plain.base_layers == () and len(mixed.base_layers) == 3
    assert torch.equal(plain.hidden, mixed.hidden) and torch.equal(plain.pooled, mixed.pooled)
    # bottom to top: the last of them is the layer right below the base's last
    states = model.base.model(**batch, output_hidden_states=True).hidden_states
    for got, want in zip(mixed.base_layers, states[-4:-1], strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ScalerError, match="has only 6"):
        model.encode_batch(batch, base_layers=7)


def test_old_branches_are_bit_identical_when_an_attn_mix_branch_is_added(store: ContentStore) -> None:
    before_hash = store.resolve("demo")
    before = store.get_manifest(before_hash)
    before_logits = logits_of(compose(store, "demo"), OLD)
    result = add_branch(store, "demo", "mix", DataSpec(SMS), strategy="attn-mix", training=FAST)
    add_branch(
        store,
        "demo",
        "mix2",
        DataSpec(SMS),
        strategy="attn-mix",
        strategy_config={"layers": 2},
        training=FAST,
    )
    after = store.get_manifest(store.resolve("demo"))
    assert store.get_manifest(result.manifest)["branches"]["mix"]["strategy"]["plugin"] == "attn-mix"
    for name in OLD:
        assert after["branches"][name] == before["branches"][name]
    everything = logits_of(compose(store, "demo"), OLD + ["mix", "mix2"])
    for name in OLD:
        assert torch.equal(everything[name], before_logits[name]), name
    # each attn-mix branch gives the same bits alone, with the other, or with every branch
    for name in ("mix", "mix2"):
        alone = logits_of(compose(store, "demo"), [name])[name]
        assert torch.equal(alone, everything[name]), name
    # per-row routing (serve, predict files) agrees with the whole-batch pass, row by row
    model = compose(store, "demo").eval()
    batch = model.base.tokenize(TEXTS, model.device)
    with torch.inference_mode():
        rows = model(**batch, row_branches=["mix", "mix2", ["mix", "spam"], "mix2"])
    torch.testing.assert_close(rows.logits["mix"], everything["mix"][[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.logits["mix2"], everything["mix2"][[1, 3]], rtol=1e-5, atol=1e-6)


def test_the_mix_cache_holds_the_layers_and_matches_the_live_pass(store: ContentStore) -> None:
    model = compose(store, "demo")
    tid = trunk_id(model.origin.manifest)
    rows, cached = cached_tokens(store, model, tid, TEXTS, base_layers=2)
    assert not cached
    plain, _ = cached_tokens(store, model, tid, TEXTS)  # another file: its own key
    assert len(list(store.cache_dir("tokens").iterdir())) == 2
    with torch.inference_mode():
        live = model.eval().encode_batch(model.base.tokenize(TEXTS, model.device), base_layers=2)
    got = rows.batch(torch.arange(len(TEXTS)))
    assert torch.equal(got.mask, live.mask) and len(got.base_layers) == 2
    m = live.mask.unsqueeze(-1)
    for a, b in zip((*got.base_layers, got.hidden), (*live.base_layers, live.hidden), strict=True):
        torch.testing.assert_close(a * m, b.float() * m, rtol=2e-3, atol=2e-3)  # float16
    assert torch.equal(plain.batch(torch.arange(len(TEXTS))).hidden, got.hidden)
    again, cached = cached_tokens(store, model, tid, TEXTS, base_layers=2)
    assert cached
    # an attn-mix forward over the cached rows equals it over the live pass (up to float16)
    torch.manual_seed(0)
    adapter = AttentionMix(AttnMixConfig(), hidden_size=384).eval()
    torch.nn.init.normal_(adapter.mix, std=1.0)
    torch.nn.init.normal_(adapter.proj.weight, std=0.05)
    with torch.inference_mode():
        torch.testing.assert_close(adapter(again.batch(torch.arange(4))), adapter(live), rtol=1e-2, atol=1e-2)


def test_too_many_layers_is_one_clear_error_before_training(store: ContentStore) -> None:
    with pytest.raises(ScalerError, match="has only 6") as info:
        add_branch(
            store,
            "demo",
            "deep",
            DataSpec(SMS),
            strategy="attn-mix",
            strategy_config={"layers": 9},
            training=FAST,
        )
    assert "\n" not in str(info.value)
    assert "deep" not in store.get_manifest(store.resolve("demo"))["branches"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_scaler_train_trains_the_trunk_under_an_attn_mix_branch(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The run's base-state cache carries the layers the branch reads; its eval agrees with
    the composed model's predictions."""
    root = tmp_path / "store"
    copy_store(tiny_template(tmp_path_factory), root)
    store = ContentStore.open(root)
    specs = [BranchSpec("spam", TRAIN_SMS, strategy="attn-mix"), BranchSpec("trec", TREC)]
    config = TrainConfig(steps=6, batch_size=16, eval_every=3, checkpoint_every=3, check_window=3)
    plan = plan_run(store, "tiny", specs, config)
    acc = make_accelerator()
    result = train_run(
        store, start_run(store, plan, run_dir=tmp_path / "run", accelerator=acc), accelerator=acc
    )
    m = store.get_manifest(result.manifest)
    assert m["branches"]["spam"]["strategy"]["plugin"] == "attn-mix"
    assert m["branches"]["spam"]["trunk"] == trunk_id(m)
    assert any(f.name for f in store.cache_dir("base-states").iterdir())
    model = compose(store, "tiny")
    out = model.predict(["WIN a FREE prize now", "Who wrote Hamlet?"], branches=["spam", "trec"])
    assert set(out) == {"spam", "trec"}
