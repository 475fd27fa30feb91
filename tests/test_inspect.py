"""`scaler inspect`: architecture detection from config and module structure (issue 13, item 1).

The oracle is the EXPECTED table below, written by hand from what each architecture is (papers
and model cards), not from the implementation: tiny random models built locally, no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import transformers as tf
from conftest import run_scaler

from scaler_wizard.errors import ScalerError
from scaler_wizard.inspection.architecture import detect
from scaler_wizard.inspection.source import check_composable, inspect_base

H, L, NH, FFN, V = 32, 2, 4, 64, 100
_ENC = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FFN, vocab_size=V)
_DEC = dict(_ENC)

CONFIGS: dict[str, Any] = {
    "bert": lambda: tf.BertConfig(**_ENC),
    "roberta": lambda: tf.RobertaConfig(**_ENC),
    "distilbert": lambda: tf.DistilBertConfig(dim=H, n_layers=L, n_heads=NH, hidden_dim=FFN, vocab_size=V),
    "distilbert-sinusoidal": lambda: tf.DistilBertConfig(
        dim=H, n_layers=L, n_heads=NH, hidden_dim=FFN, vocab_size=V, sinusoidal_pos_embds=True
    ),
    "electra": lambda: tf.ElectraConfig(embedding_size=16, **_ENC),
    "modernbert": lambda: tf.ModernBertConfig(
        **_ENC, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2
    ),
    "gpt2": lambda: tf.GPT2Config(
        n_embd=H, n_layer=L, n_head=NH, vocab_size=V, bos_token_id=0, eos_token_id=0
    ),
    "llama-gqa": lambda: tf.LlamaConfig(**_DEC, num_key_value_heads=2),
    "llama-mqa": lambda: tf.LlamaConfig(**_DEC, num_key_value_heads=1),
    "mistral": lambda: tf.MistralConfig(**_DEC, num_key_value_heads=2),
    "qwen2": lambda: tf.Qwen2Config(**_DEC, num_key_value_heads=4),
    "gemma": lambda: tf.GemmaConfig(**_DEC, num_key_value_heads=1, head_dim=8),
    "falcon": lambda: tf.FalconConfig(
        hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, vocab_size=V
    ),
    "falcon-alibi": lambda: tf.FalconConfig(
        hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, vocab_size=V, alibi=True
    ),
    "bloom": lambda: tf.BloomConfig(hidden_size=H, n_layer=L, n_head=NH, vocab_size=V),
    "t5": lambda: tf.T5Config(d_model=H, d_kv=8, d_ff=FFN, num_layers=L, num_heads=NH, vocab_size=V),
}

# family, norm, placement, attention, kv heads, positions, activation, ffn, layers, supported
EXPECTED: dict[str, tuple[str, str, str, str, int, str, str, int, int, bool]] = {
    # BERT family: post-LN (norm after each residual sum), learned absolute positions, GELU
    "bert": ("encoder", "LayerNorm", "post-LN", "MHA", 4, "learned absolute", "gelu", 64, 2, True),
    "roberta": ("encoder", "LayerNorm", "post-LN", "MHA", 4, "learned absolute", "gelu", 64, 2, True),
    "distilbert": ("encoder", "LayerNorm", "post-LN", "MHA", 4, "learned absolute", "gelu", 64, 2, True),
    "distilbert-sinusoidal": ("encoder", "LayerNorm", "post-LN", "MHA", 4, "sinusoidal", "gelu", 64, 2, True),
    "electra": ("encoder", "LayerNorm", "post-LN", "MHA", 4, "learned absolute", "gelu", 64, 2, True),
    # ModernBERT: pre-LN, bias-free LayerNorm, RoPE, GeGLU
    "modernbert": ("encoder", "LayerNorm", "pre-LN", "MHA", 4, "RoPE", "gelu", 64, 2, True),
    # GPT-2: pre-LN decoder, learned positions, tanh GELU ("gelu_new"), FFN 4 x hidden
    "gpt2": ("decoder", "LayerNorm", "pre-LN", "MHA", 4, "learned absolute", "gelu_new", 128, 2, False),
    # Llama family: RMSNorm pre-norm, RoPE, SwiGLU; GQA/MQA from num_key_value_heads
    "llama-gqa": ("decoder", "RMSNorm", "pre-LN", "GQA", 2, "RoPE", "silu", 64, 2, False),
    "llama-mqa": ("decoder", "RMSNorm", "pre-LN", "MQA", 1, "RoPE", "silu", 64, 2, False),
    "mistral": ("decoder", "RMSNorm", "pre-LN", "GQA", 2, "RoPE", "silu", 64, 2, False),
    "qwen2": ("decoder", "RMSNorm", "pre-LN", "MHA", 4, "RoPE", "silu", 64, 2, False),
    # Gemma: RMSNorm (1 + w), RoPE, GeGLU with tanh GELU
    "gemma": ("decoder", "RMSNorm", "pre-LN", "MQA", 1, "RoPE", "gelu_pytorch_tanh", 64, 2, False),
    # Falcon (7B layout): multi-query by default, parallel attn/MLP off one LayerNorm, FFN 4 x hidden
    "falcon": ("decoder", "LayerNorm", "pre-LN", "MQA", 1, "RoPE", "gelu", 128, 2, False),
    "falcon-alibi": ("decoder", "LayerNorm", "pre-LN", "MQA", 1, "ALiBi", "gelu", 128, 2, False),
    # BLOOM: ALiBi, pre-LN, tanh GELU, FFN 4 x hidden
    "bloom": ("decoder", "LayerNorm", "pre-LN", "MHA", 4, "ALiBi", "gelu_tanh", 128, 2, False),
    # T5: encoder-decoder, RMS-style "T5LayerNorm" pre-norm, relative position buckets, ReLU
    "t5": ("encoder-decoder", "RMSNorm", "pre-LN", "MHA", 4, "relative", "relu", 64, 4, False),
}


@pytest.mark.parametrize("probe", [True, False], ids=["probes", "static"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_field_of_each_family(name: str, probe: bool) -> None:
    """Both paths: behavioural probes on a materialised twin, and the static checks used for
    models too big to materialise (meta module only)."""
    config = CONFIGS[name]()
    arch = detect(config, probe=probe)
    family, norm, placement, attention, kv, positions, act, ffn, layers, supported = EXPECTED[name]
    got = arch.to_dict()
    assert (got["family"], got["norm"], got["placement"], got["attention"]) == (
        family,
        norm,
        placement,
        attention,
    )
    assert (got["heads"], got["kv_heads"]) == (NH, kv)
    assert got["positions"] == positions
    assert got["activation"] == act
    assert (got["hidden_size"], got["ffn_size"], got["layers"]) == (H, ffn, layers)
    # an independent count: transformers' own, on a real (tiny) instance
    assert got["parameters"] == tf.AutoModel.from_config(config).num_parameters()
    assert got["supported"] is supported
    assert got["reason"]
    if not supported:
        assert family in got["reason"]
    assert json.loads(json.dumps(got)) == got
    if probe:  # the answers came from the behavioural probes, not the fallbacks
        assert "forward hooks" in arch.evidence["placement"]
        assert "shift probe" in arch.evidence["norm"]
        if family != "encoder-decoder":
            assert arch.evidence["family"].startswith("causality probe")


def test_at_least_ten_families() -> None:
    assert len({CONFIGS[n]().model_type for n in EXPECTED}) >= 10


def test_packaged_minilm() -> None:
    arch, source = inspect_base(None)
    assert source["type"] == "package"
    assert (arch.family, arch.placement, arch.norm, arch.attention) == (
        "encoder",
        "post-LN",
        "LayerNorm",
        "MHA",
    )
    assert (arch.positions, arch.activation) == ("learned absolute", "gelu")
    assert (arch.hidden_size, arch.ffn_size, arch.layers, arch.heads) == (384, 1536, 6, 12)
    assert arch.parameters == 22_713_216  # all-MiniLM-L6-v2's BertModel, pooler included
    assert arch.supported


def test_store_model_inspects_its_base(store: Any) -> None:
    arch, source = inspect_base("demo", store.root)
    assert source["type"] == "model" and source["model"] == "demo"
    assert (arch.family, arch.hidden_size, arch.layers, arch.supported) == ("encoder", 384, 6, True)


def _folder(tmp_path: Path, config: Any) -> Path:
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)  # config.json only: inspect never needs weights
    return folder


@pytest.mark.slow
def test_cli_table_and_json(scaler_env: dict[str, str], tmp_path: Path) -> None:
    table = run_scaler("inspect", env=scaler_env)
    assert table.returncode == 0, table.stderr
    for text in ("encoder", "post-LN", "LayerNorm", "learned absolute", "384", "1536", "22,713,216"):
        assert text in table.stdout
    as_json = run_scaler("inspect", "--json", env=scaler_env)
    data = json.loads(as_json.stdout)
    assert data["family"] == "encoder" and data["supported"] is True and data["layers"] == 6
    model = json.loads(run_scaler("inspect", "demo", "--json", env=scaler_env).stdout)
    assert model["source"]["type"] == "model" and model["hidden_size"] == 384
    llama = json.loads(
        run_scaler("inspect", str(_folder(tmp_path, CONFIGS["llama-gqa"]())), "--json", env=scaler_env).stdout
    )
    assert (llama["family"], llama["attention"], llama["norm"], llama["supported"]) == (
        "decoder",
        "GQA",
        "RMSNorm",
        False,
    )


def _one_line_error(result: Any) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.stderr
    return str(lines[0])


@pytest.mark.slow
def test_cli_errors_are_one_line(scaler_env: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _one_line_error(run_scaler("inspect", str(empty), env=scaler_env))
    offline = _one_line_error(run_scaler("inspect", "someone/not-here", env=scaler_env))
    assert "someone/not-here" in offline
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert "config" in _one_line_error(run_scaler("inspect", str(bad), env=scaler_env))


def test_check_composable_refuses_a_decoder(tmp_path: Path) -> None:
    with pytest.raises(ScalerError, match="decoder") as info:
        check_composable(str(_folder(tmp_path, CONFIGS["gpt2"]())))
    assert "\n" not in str(info.value)
    check_composable(str(_folder(tmp_path, CONFIGS["bert"]())))  # an encoder passes


@pytest.mark.slow
def test_init_refuses_an_unsupported_base(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "SCALER_HOME": str(tmp_path / "store"), "HF_HUB_OFFLINE": "1"}
    env.pop("SCALER_DEBUG", None)
    line = _one_line_error(
        run_scaler("init", "m", "--base", str(_folder(tmp_path, CONFIGS["t5"]())), env=env)
    )
    assert "encoder-decoder" in line
    line = _one_line_error(
        run_scaler("init", "m", "--base", str(_folder(tmp_path, CONFIGS["bloom"]())), env=env)
    )
    assert "decoder" in line
    assert not (tmp_path / "store").exists()  # refused before the store is touched


# -- the inspection recorded in the manifest (base.inspection) ------------------------------


@pytest.mark.slow
def test_init_records_the_inspection_and_old_manifests_keep_their_bytes(tmp_path: Path) -> None:
    """``scaler init`` (real subprocess, inside ``restore_legacy_store``) writes
    ``base.inspection``; the legacy fixture's manifests, written before it existed, keep their
    exact bytes, still validate, and compose; ``inspect`` / ``show`` read the record."""
    import os

    from conftest import LEGACY, restore_legacy_store

    from scaler_wizard.banks import ContentStore
    from scaler_wizard.manifests.model import canonical_json, parse_manifest
    from scaler_wizard.modeling.compose import compose

    before = {p.name: p.read_bytes() for p in (LEGACY / "store" / "manifests").rglob("*") if p.is_file()}
    root = restore_legacy_store(tmp_path / "store")  # runs `scaler init restore-base`
    store = ContentStore.open(root)
    # the new model records what was detected, field by field
    fresh = store.get_manifest(store.resolve("restore-base"))
    expected = {
        "family": "encoder", "norm": "LayerNorm", "placement": "post-LN", "attention": "MHA",
        "heads": 12, "kv_heads": 12, "positions": "learned absolute", "activation": "gelu",
        "hidden_size": 384, "ffn_size": 1536, "layers": 6, "parameters": 22_713_216,
        "supported": True,
    }  # fmt: skip
    assert {k: fresh["base"]["inspection"][k] for k in expected} == expected
    assert fresh["base"]["inspection"]["reason"]
    # the legacy manifests: byte for byte as in the fixture, valid, round-trip, no inspection
    for name, data in before.items():
        stored = next(p for p in (root / "manifests").rglob(name) if p.is_file()).read_bytes()
        assert stored == data
        m = parse_manifest(data)
        assert canonical_json(m.to_dict()) == data
        if m.name == "legacy":
            assert m.base.inspection is None and "inspection" not in m.to_dict()["base"]
    compose(store, "legacy")  # still composes
    old, source = inspect_base("legacy", root)  # no record: detected from its config.json
    assert "from" not in source and old.layers == 6 and "forward hooks" in old.evidence["placement"]
    recorded, source = inspect_base("restore-base", root)
    assert source["from"] == "manifest" and recorded.record() == fresh["base"]["inspection"]
    assert recorded.evidence["placement"].startswith("recorded in the manifest")
    env = {**os.environ, "SCALER_HOME": str(root), "HF_HUB_OFFLINE": "1"}
    shown = run_scaler("show", "restore-base", env=env)
    assert shown.returncode == 0 and "encoder, post-LN LayerNorm, MHA (12 heads)" in shown.stdout
    as_json = json.loads(run_scaler("inspect", "restore-base", "--json", env=env).stdout)
    assert as_json["source"]["from"] == "manifest" and as_json["parameters"] == 22_713_216
