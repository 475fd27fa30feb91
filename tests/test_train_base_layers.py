"""``scaler train --train-new-base-layers`` (issue 13): the base blocks ``add-base-layer``
inserted train with the trunk, from cached states below them; nothing else of the base moves.

On the tiny random pre-LN encoder of ``test_expand_base`` (no downloads): the cut run the
training relies on equals the full pass on six families' tiny models; a real run trains the
inserted block (its zeroed output projections receive gradient and become non-zero), saves the
base as a new bank whose every other tensor is byte-identical, and the saved version composes to
the logits its fingerprint recorded; a run killed after a checkpoint and resumed ends with the
same bytes; a model that was never grown is refused in one line before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from conftest import run_scaler
from test_expand_base import _model_on, _pre_ln_folder
from train_helpers import SMS, subprocess_env

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ScalerError
from scaler_wizard.growth.base_grow import add_base_layer
from scaler_wizard.modeling.base_blocks import CUT_TOLERANCE, check_blocks_from, run_blocks_from
from scaler_wizard.modeling.compose import compose
from scaler_wizard.modeling.tensor_banks import load_bank_tensors
from scaler_wizard.modeling.verify import verify_version
from scaler_wizard.training import loop
from scaler_wizard.training.config import BranchSpec, TrainConfig
from scaler_wizard.training.loop import make_accelerator, plan_run, start_run, train_run

_TINY = {"num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100}
_FAMILIES: dict[str, Any] = {
    "bert (post-LN)": lambda: tf.BertConfig(hidden_size=32, num_hidden_layers=3, **_TINY),
    "roberta-prelayernorm": lambda: tf.RobertaPreLayerNormConfig(
        hidden_size=32, num_hidden_layers=3, max_position_embeddings=40, **_TINY
    ),
    "llama (GQA, RoPE)": lambda: tf.LlamaConfig(
        hidden_size=32, num_hidden_layers=3, num_key_value_heads=2, **_TINY
    ),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=32, num_hidden_layers=3, num_key_value_heads=2, **_TINY),
    "gpt2": lambda: tf.GPT2Config(
        n_embd=32, n_layer=3, n_head=4, vocab_size=100, bos_token_id=1, eos_token_id=2
    ),
    "modernbert (local/global)": lambda: tf.ModernBertConfig(
        hidden_size=32,
        num_hidden_layers=4,
        global_attn_every_n_layers=2,
        local_attention=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        **_TINY,
    ),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_running_the_base_from_a_block_equals_the_full_pass(family: str) -> None:
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(_FAMILIES[family]()).eval()
    ids = torch.randint(3, 100, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:], mask[2, 5:] = 0, 0
    batch = {"input_ids": ids, "attention_mask": mask}
    depth = model.config.num_hidden_layers
    for start in range(depth):
        assert check_blocks_from(model, start, batch) <= CUT_TOLERANCE, (family, start)
    # the check can fail: a state that is not block 1's input does not give the full pass
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
        last, above = run_blocks_from(model, 1, states[0], mask)
    assert len(above) == depth - 1
    assert float((last - states[-1]).abs().max()) > 1e-3
    # the stack is restored after every cut run
    assert len(model.get_submodule(_stack_name(model))) == depth


def _stack_name(model: torch.nn.Module) -> str:
    from scaler_wizard.modeling.base_blocks import the_stack

    return the_stack(model)[0]


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose model ``pre`` has a block inserted at 1 (3 -> 4 blocks), copied per test."""
    root = tmp_path_factory.mktemp("grown")
    store = _model_on(root / "store", _pre_ln_folder(root))
    add_base_layer(store, "pre", at=1)
    return root / "store"


def _config(**kw: Any) -> TrainConfig:
    base = {"steps": 6, "batch_size": 16, "eval_every": 3, "checkpoint_every": 3, "lr_base_layers": 1e-3}
    return TrainConfig(train_base_layers=True, **{**base, **kw})


def _train(root: Path, run_dir: Path) -> Any:
    store = ContentStore.open(root)
    plan = plan_run(store, "pre", [BranchSpec("spam", SMS)], _config(), allow_stale_branches=True)
    acc = make_accelerator()
    path = start_run(store, plan, run_dir=run_dir, accelerator=acc)
    return train_run(store, path, accelerator=acc)


def _base_tensors(store: ContentStore, spec: str) -> dict[str, torch.Tensor]:
    m = store.manifest(store.resolve(spec))
    return load_bank_tensors(store.verified_path(m.base.bank))


def test_the_inserted_block_trains_and_nothing_else_of_the_base(grown: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "store"
    shutil.copytree(grown, root)
    store = ContentStore.open(root)
    before_manifest = store.manifest(store.resolve("pre"))
    before = _base_tensors(store, "pre")
    result = _train(root, tmp_path / "run")
    assert result.trunk["base_layers_trained"] == [1] and result.trunk["base_unchanged"] is False

    after_manifest = store.manifest(store.resolve("pre"))
    after = _base_tensors(store, "pre")
    assert after_manifest.base.bank != before_manifest.base.bank
    # config, tokenizer, inspection and the growth record are the base's own
    for field in ("files", "inspection", "growth", "architecture", "hidden_size"):
        assert getattr(after_manifest.base, field) == getattr(before_manifest.base, field), field
    assert after.keys() == before.keys()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert moved and all(k.startswith("encoder.layer.1.") for k in moved), moved
    # the zeroed output projections received gradient: they are no longer zero
    for name in ("encoder.layer.1.attention.output.dense.weight", "encoder.layer.1.output.dense.weight"):
        assert float(before[name].abs().max()) == 0.0 and float(after[name].abs().max()) > 0.0, name

    # the saved version composes to what was trained: deep verification replays the fingerprints
    checks = verify_version(store, str(store.resolve("pre")), load_base=True)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert "base blocks 1 trained" in (after_manifest.message or "")
    model = compose(store, "pre")
    assert model.base.model.encoder.layer[1].output.dense.weight.abs().max() > 0


def test_a_killed_run_resumes_to_the_same_base_bytes(
    grown: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(grown, a)
    shutil.copytree(grown, b)
    _train(a, tmp_path / "run-a")

    class Killed(Exception):
        pass

    real = loop.TrainRun.checkpoint_at

    def checkpoint_then_die(self: Any, at: int) -> None:
        real(self, at)
        if at == 3:
            raise Killed

    monkeypatch.setattr(loop.TrainRun, "checkpoint_at", checkpoint_then_die)
    with pytest.raises(Killed):
        _train(b, tmp_path / "run-b")
    monkeypatch.setattr(loop.TrainRun, "checkpoint_at", real)
    checkpoint = json.loads((tmp_path / "run-b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert checkpoint["event"] == "checkpoint" and checkpoint["step"] == 3
    train_run(ContentStore.open(b), tmp_path / "run-b", accelerator=make_accelerator(), resume=True)
    sa, sb = ContentStore.open(a), ContentStore.open(b)
    ma, mb = (s.manifest(s.resolve("pre")) for s in (sa, sb))
    assert ma.base.bank == mb.base.bank
    assert [layer.bank for layer in ma.trunk.layers] == [layer.bank for layer in mb.trunk.layers]


def test_cli_refuses_a_model_never_grown_then_trains_a_block_grown_on_top(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _model_on(root, _pre_ln_folder(tmp_path))
    with pytest.raises(ScalerError, match="no inserted base layers"):
        plan_run(
            ContentStore.open(root), "pre", [BranchSpec("spam", SMS)], _config(), allow_stale_branches=True
        )
    args = ("train", "pre", "--branch", f"spam={SMS}", "--allow-stale-branches", "--train-new-base-layers")
    refused = run_scaler(*args, env=subprocess_env(root))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr
    assert "no inserted base layers" in lines[0] and "add-base-layer pre" in lines[0]
    assert not (root / "runs").exists()

    grown = run_scaler("expand", "add-base-layer", "pre", env=subprocess_env(root))  # on top: block 3
    assert grown.returncode == 0, grown.stderr
    before = ContentStore.open(root).manifest(ContentStore.open(root).resolve("pre")).base.bank
    done = run_scaler(*args, "--steps", "4", "--batch-size", "16", env=subprocess_env(root))
    assert done.returncode == 0, done.stderr
    assert "base     blocks 3 trained (the rest frozen): a new base bank" in done.stdout
    store = ContentStore.open(root)
    after = store.manifest(store.resolve("pre"))
    assert after.base.bank != before and after.base.inserted_layers() == [3]
    assert "base blocks 3 trained" in (after.message or "")
