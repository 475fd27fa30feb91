"""A third party can write an in-encoder strategy with the public API alone (issue 11, item 6).

``EmbedShift`` below changes what the base encoder computes (a learnt shift of the word
embeddings, on in its branch's own pass only), as ``peft-lora`` does with LoRA. Its plugin
uses only ``scaler_wizard``, ``scaler_wizard.branch``, ``scaler_wizard.encoder_host`` and
``scaler_wizard.errors``: the host protocol (the wrapped model, its width and device, and an
adapter switch) is all it needs to be added, trained, saved as a folder bank, composed again,
verified and predicted, next to a ``peft-lora`` branch on the same base.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scaler_wizard import ContentStore, compose, get_plugin_manager, hookimpl, new_branch, save_version
from scaler_wizard.branch import BranchAdapter, TrunkOutput
from scaler_wizard.encoder_host import AdapterSwitch, EncoderHost
from scaler_wizard.errors import IntegrityError

TEXTS = ["Free entry in a weekly competition, text WIN now", "Who wrote Hamlet?", "see you at 5"]
KEY = "test-embed-shift"
WEIGHTS = "shift.safetensors"


# -- the third party's plugin: public imports only -----------------------------------------------


class ShiftSwitch:
    """Adds the active branch's shift to the word embeddings, for that branch's pass only."""

    def __init__(self, host: EncoderHost) -> None:
        self.adapters: dict[str, EmbedShift] = {}
        self.on: str | None = None
        host.model.get_input_embeddings().register_forward_hook(self._shift)

    def _shift(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        return None if self.on is None else output + self.adapters[self.on].shift

    def holds(self, branch: str) -> bool:
        return branch in self.adapters

    @contextlib.contextmanager
    def active(self, branch: str | None) -> Iterator[None]:
        self.on = branch
        try:
            yield
        finally:
            self.on = None


def _switch(host: EncoderHost) -> ShiftSwitch:
    switch = host.adapter_switch(KEY)
    if switch is None:
        switch = ShiftSwitch(host)
        host.add_adapter_switch(KEY, switch)
    assert isinstance(switch, ShiftSwitch)
    return switch


class EmbedShift(BranchAdapter):
    """A learnt shift of the encoder's word embeddings (in-encoder, its own pass)."""

    needs_base_pass = True
    bank_format = "folder"
    bank_layout = "embed-shift"

    def __init__(self, config: None, *, hidden_size: int) -> None:
        super().__init__()
        self.out_features = hidden_size
        self.shift = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, trunk: TrunkOutput) -> Tensor:
        return trunk.pooled

    def attach(self, base: EncoderHost, branch: str) -> None:
        assert base.hidden_size == self.out_features
        _switch(base).adapters[branch] = self.to(base.device)

    def detach(self, base: EncoderHost, branch: str) -> None:
        _switch(base).adapters.pop(branch, None)

    def export_folder(self, base: EncoderHost, branch: str, dest: Path, *, base_name: str) -> Path:
        folder = dest / "shift"
        folder.mkdir()
        save_file({"shift": self.shift.detach().cpu().contiguous()}, str(folder / WEIGHTS))
        return folder

    def check_folder(self, files: Mapping[str, Path], *, where: str) -> None:
        if set(files) != {WEIGHTS}:
            raise IntegrityError(f"{where}: an embed-shift folder holds {WEIGHTS} only, not {sorted(files)}")
        tensors = load_file(str(files[WEIGHTS]))
        if set(tensors) != {"shift"} or tensors["shift"].shape != (self.out_features,):
            raise IntegrityError(f"{where}: {WEIGHTS} is not one shift of width {self.out_features}")

    def import_folder(self, base: EncoderHost, branch: str, folder: Path) -> None:
        files = {p.name: p for p in folder.iterdir()}
        self.check_folder(files, where=f"branches.{branch}.adapter_bank")
        with torch.no_grad():
            self.shift.copy_(load_file(str(files[WEIGHTS]))["shift"])
        self.attach(base, branch)

    def trainable_parameters(self, base: EncoderHost, branch: str) -> list[nn.Parameter]:
        return [self.shift]


class EmbedShiftPlugin:
    @hookimpl
    def register_branch_strategies(self, register: Any) -> None:
        register("embed-shift", EmbedShift)


# -- tests --------------------------------------------------------------------------------------


def test_the_plugin_above_uses_only_the_public_api() -> None:
    import ast

    tree = ast.parse(Path(__file__).read_text())  # module level: what the plugin part imports
    used = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    ours = {m for m in used if m.startswith("scaler_wizard")}
    assert ours == {
        "scaler_wizard",
        "scaler_wizard.branch",
        "scaler_wizard.encoder_host",
        "scaler_wizard.errors",
    }


@pytest.fixture
def shift_plugin() -> Iterator[None]:
    pm = get_plugin_manager()
    pm.register(EmbedShiftPlugin(), name="test-embed-shift")
    try:
        yield
    finally:
        pm.unregister(name="test-embed-shift")


def _with_shift_branch(store: ContentStore) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
    """demo + ``shifted`` (embed-shift, a non-zero shift) + ``intent`` (peft-lora, non-zero LoRA);
    returns the model, the logits of every branch before the new ones, and after."""
    model = compose(store, "demo")
    batch = model.base.tokenize(TEXTS)
    with torch.no_grad():
        before = dict(model(**batch).logits)
    model.add_branch("shifted", new_branch(hidden_size=384, labels=["x", "y"], strategy="embed-shift"))
    model.add_branch("intent", new_branch(hidden_size=384, labels=["a", "b", "c"], strategy="peft-lora"))
    torch.manual_seed(5)
    with torch.no_grad():
        model.branch("shifted").adapter.shift.normal_(std=0.5)
        for name, p in model.base.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        after = dict(model(**batch).logits)
    return model, before, after


def test_a_third_party_in_encoder_strategy_trains_saves_composes_and_predicts(
    store: ContentStore, shift_plugin: None
) -> None:
    model, before, after = _with_shift_branch(store)
    assert isinstance(model.base, EncoderHost)
    assert isinstance(model.base.adapter_switch(KEY), AdapterSwitch)
    for name in ("spam", "topic"):  # branches sharing the plain pass: untouched
        assert torch.equal(before[name], after[name]), name
    batch = model.base.tokenize(TEXTS)
    with torch.no_grad():
        plain = model.base(batch["input_ids"], batch["attention_mask"])
        shifted = model.base(batch["input_ids"], batch["attention_mask"], adapter="shifted")
        intent = model.base(batch["input_ids"], batch["attention_mask"], adapter="intent")
        again = model.base(batch["input_ids"], batch["attention_mask"])
    assert not torch.equal(plain, shifted) and not torch.equal(plain, intent)
    assert not torch.equal(shifted, intent)  # each pass has its own adapter on, the other off
    assert torch.equal(plain, again)  # and every adapter is off again afterwards
    params = model.branch("shifted").adapter.trainable_parameters(model.base, "shifted")
    assert [p.shape for p in params] == [(384,)]

    h = save_version(store, model, message="add shifted and intent")
    bank = store.get_manifest(h)["branches"]["shifted"]["adapter_bank"]
    assert set(store.tree_members(bank)) == {WEIGHTS}

    from scaler_wizard.modeling.verify import verify_version

    checks = verify_version(store, h)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]

    composed = compose(store, "demo")
    with torch.no_grad():
        got = composed(**composed.base.tokenize(TEXTS)).logits
    for name, logits in after.items():
        assert torch.equal(got[name], logits), name
    preds = composed.predict(TEXTS, ["shifted", "intent", "spam"])
    assert [p.label for p in preds["shifted"]] == [
        ["x", "y"][i] for i in after["shifted"].argmax(-1).tolist()
    ]
    composed.remove_branch("shifted")
    with torch.no_grad():
        without = composed(**composed.base.tokenize(TEXTS), branches=["intent", "spam"]).logits
    assert torch.equal(without["intent"], after["intent"]) and torch.equal(without["spam"], after["spam"])


def test_a_pass_for_a_branch_without_an_in_encoder_adapter_is_refused(store: ContentStore) -> None:
    from scaler_wizard.errors import ScalerError

    model = compose(store, "demo")
    batch = model.base.tokenize(TEXTS)
    with pytest.raises(ScalerError, match="branch 'spam' has no adapter in the base encoder"):
        model.base(batch["input_ids"], batch["attention_mask"], adapter="spam")


def _tree(store: ContentStore, files: dict[str, bytes], layout: str) -> str:
    from scaler_wizard.banks.store import TREE_FORMAT, canonical_json

    listing = {rel: str(store.put_bytes(data)) for rel, data in files.items()}
    tree = {"format": TREE_FORMAT, "kind": "adapter", "layout": layout, "files": listing}
    return str(store.put_bytes(canonical_json(tree)))


def _version_with(store: ContentStore, branch: str, bank: str) -> str:
    head = store.resolve("demo")
    manifest = copy.deepcopy(store.get_manifest(head))
    manifest["branches"][branch]["adapter_bank"] = bank
    manifest["parent"], manifest["version"] = str(head), int(manifest["version"]) + 1
    return str(store.put_manifest(manifest))


def test_verify_asks_the_strategy_to_check_its_folder_bank(store: ContentStore, shift_plugin: None) -> None:
    """``scaler verify`` checks a folder bank through its strategy's ``check_folder`` (no PEFT
    knowledge in verify), and refuses a folder of another strategy's layout."""
    from scaler_wizard.modeling.verify import verify_version

    model, _, _ = _with_shift_branch(store)
    h = save_version(store, model, message="add shifted and intent")
    manifest = store.get_manifest(h)
    shift_files = {
        r: store.read_bytes(m)
        for r, m in store.tree_members(manifest["branches"]["shifted"]["adapter_bank"]).items()
    }
    peft_bank = manifest["branches"]["intent"]["adapter_bank"]

    def failed(version: str) -> list[tuple[str, str]]:
        return [(c.what, c.detail) for c in verify_version(store, version) if not c.ok]

    extra = _version_with(
        store, "shifted", _tree(store, {**shift_files, "more.safetensors": b"x"}, "embed-shift")
    )
    assert failed(extra) == [
        (
            "branches.shifted.adapter_bank",
            f"an embed-shift folder holds {WEIGHTS} only, not ['more.safetensors', '{WEIGHTS}']",
        )
    ]
    swapped = _version_with(store, "shifted", peft_bank)
    assert failed(swapped) == [
        (
            "branches.shifted.adapter_bank",
            "is a 'peft' folder bank, strategy 'embed-shift' expects a 'embed-shift' folder bank",
        )
    ]
    with pytest.raises(IntegrityError, match="expected 'adapter'/'embed-shift'"):
        compose(store, swapped).branch("shifted")  # what verify predicts, compose does
    pooled = _version_with(store, "spam", peft_bank)
    assert failed(pooled)[0] == (
        "branches.spam.adapter_bank",
        "is a 'peft' folder bank, strategy 'lora' expects a safetensors bank",
    )


def test_registering_peft_lora_imports_neither_torch_nor_peft() -> None:
    """The built-in plugin's registration module is cheap: its implementation loads in the hook."""
    code = (
        "import sys, scaler_wizard.plugins.peft_lora, scaler_wizard.encoder_host\n"
        "heavy = sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "registered = []\n"
        "scaler_wizard.plugins.peft_lora.register_branch_strategies("
        "lambda name, factory, config=None: registered.append((name, factory.__module__)))\n"
        "assert registered == [('peft-lora', 'scaler_wizard.plugins.peft_impl')], registered\n"
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _guide_example() -> ModuleType:
    """The in-encoder example of docs/plugins.md, executed as written (as a plugin module)."""
    import re

    from conftest import REPO

    text = (REPO / "docs" / "plugins.md").read_text()
    section = text.split("### In-encoder strategies: the encoder host\n", 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    module = ModuleType("doc_in_encoder_example")
    exec(compile(block, "docs/plugins.md (in-encoder)", "exec", dont_inherit=True), module.__dict__)
    return module


def test_the_guides_in_encoder_example_adds_saves_composes_and_verifies(store: ContentStore) -> None:
    from scaler_wizard.modeling.verify import verify_version

    pm = get_plugin_manager()
    pm.register(_guide_example(), name="doc-shift")
    try:
        model = compose(store, "demo")
        batch = model.base.tokenize(TEXTS)
        model.add_branch("doc", new_branch(hidden_size=384, labels=["x", "y"], strategy="embed-shift"))
        torch.manual_seed(7)
        with torch.no_grad():
            model.branch("doc").adapter.shift.normal_(std=0.5)
            plain = model(**batch, branches=["doc"]).logits["doc"]
            head_only = model.branch("doc").head(model(**batch, branches=["spam"]).trunk.pooled)
        assert not torch.equal(plain, head_only)  # the shift changed what the encoder computed
        h = save_version(store, model, message="add doc")
        assert all(c.ok for c in verify_version(store, h))
        again = compose(store, "demo")
        with torch.no_grad():
            assert torch.equal(again(**batch, branches=["doc"]).logits["doc"], plain)
    finally:
        pm.unregister(name="doc-shift")
