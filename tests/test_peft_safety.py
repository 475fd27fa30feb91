"""PEFT folder banks: no pickle is ever loaded, and nothing a bank says may touch the shared base.

Issue 10, items 1 and 2: a folder bank holding ``adapter_model.bin`` was stored, verified and
loaded through PEFT's ``torch.load`` fallback; an ``adapter_config.json`` asking for a PiSSA
(or OLoRA, LoftQ, ...) init, ``modules_to_save``, trainable biases... rewrote the base that
every other branch shares. Hostile banks are built here as an attacker (or a hostile Hub
repo) would write them: objects plus a tree object, bypassing ``put_tree``'s own check.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import _copy_store, run_scaler
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.store import TREE_FORMAT, canonical_json
from scaler_wizard.errors import IntegrityError
from scaler_wizard.modeling.compose import compose, new_branch, save_version
from scaler_wizard.modeling.verify import verify_version
from scaler_wizard.plugins.peft_impl import load_adapter, peft_model
from scaler_wizard.plugins.peft_safety import check_adapter_config

TEXTS = ["Free entry in a weekly competition, text WIN now", "Who wrote Hamlet?", "see you at 5"]
OTHERS = ("spam", "topic")


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_root(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo v3 = v2 (spam, topic) + ``intent``, a peft-lora branch with non-zero LoRA weights."""
    root = tmp_path_factory.mktemp("peft-safety") / "store"
    _copy_store(session_store, root)
    store = ContentStore.open(root)
    model = compose(store, "demo")
    model.add_branch("intent", new_branch(hidden_size=384, labels=["a", "b", "c"], strategy="peft-lora"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.base.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    save_version(store, model, message="add intent")
    return root


@pytest.fixture
def pstore(peft_root: Path, tmp_path: Path) -> ContentStore:
    _copy_store(peft_root, tmp_path / "store")
    return ContentStore.open(tmp_path / "store")


def intent_files(store: ContentStore) -> dict[str, bytes]:
    """The legitimate intent bank's members, by name."""
    bank = store.get_manifest(store.resolve("demo"))["branches"]["intent"]["adapter_bank"]
    return {rel: store.read_bytes(h) for rel, h in store.tree_members(bank).items()}


def install_tree(store: ContentStore, files: dict[str, bytes]) -> str:
    """A folder bank written as an attacker would: member objects + a tree object (no checks)."""
    listing = {rel: str(store.put_bytes(data)) for rel, data in files.items()}
    tree = {"format": TREE_FORMAT, "kind": "adapter", "layout": "peft", "files": listing}
    return str(store.put_bytes(canonical_json(tree)))


def version_with_intent_bank(store: ContentStore, bank: str, **strategy_config: Any) -> str:
    """A new (unreferenced) version of demo whose ``intent`` branch uses ``bank``."""
    head = store.resolve("demo")
    manifest = copy.deepcopy(store.get_manifest(head))
    entry = manifest["branches"]["intent"]
    entry["adapter_bank"] = bank
    entry["strategy"].setdefault("config", {}).update(strategy_config)
    manifest["parent"] = str(head)
    manifest["version"] = int(manifest["version"]) + 1
    return str(store.put_manifest(manifest))


def hostile_config(store: ContentStore, **changes: Any) -> str:
    files = intent_files(store)
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    files["adapter_config.json"] = json.dumps(config, indent=2).encode()
    return version_with_intent_bank(store, install_tree(store, files))


def base_weights(model: Any) -> dict[str, torch.Tensor]:
    """Every weight of the shared base, by its plain name (PEFT's wrappers and LoRA parts left out)."""
    out = {}
    for name, p in model.base.model.named_parameters():
        if "lora_" not in name:
            out[name.replace(".base_layer.", ".")] = p.detach().clone()
    return out


def other_logits(model: Any) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dict(model(**model.base.tokenize(TEXTS), branches=list(OTHERS)).logits)


def assert_unchanged(model: Any, logits: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    after = base_weights(model)
    assert after.keys() == weights.keys()
    changed = [k for k in weights if not torch.equal(weights[k], after[k])]
    assert not changed, f"base weights changed: {changed[:3]}"
    now = other_logits(model)
    for name in OTHERS:
        assert torch.equal(now[name], logits[name]), name


def failed_checks(store: ContentStore, h: str) -> list[Any]:
    return [c for c in verify_version(store, h) if not c.ok]


def one_error_line(proc: Any, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- item 1: folder-bank members are allow-listed (creation, read = pull + verify, load) -----------

HOSTILE_MEMBERS = [
    "adapter_model.bin",  # PEFT's torch.load fallback
    "pytorch_model.bin",
    "adapter_model.pt",
    "training_args.pkl",
    "modeling_evil.py",  # code a trust_remote_code loader would run
    "README.md",
    "sub/adapter_model.bin",
    ".safetensors",
]


@pytest.mark.parametrize("member", HOSTILE_MEMBERS)
def test_put_tree_refuses_a_member_off_the_allow_list(
    pstore: ContentStore, tmp_path: Path, member: str
) -> None:
    folder = tmp_path / "adapter"
    for rel, data in {**intent_files(pstore), member: b"\x80\x04K\x01."}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    before = sorted(pstore.iter_objects())
    with pytest.raises(IntegrityError, match=f"member '{member}' is not allowed") as info:
        pstore.put_tree(folder, kind="adapter", layout="peft")
    assert "\n" not in str(info.value)
    assert sorted(pstore.iter_objects()) == before  # nothing stored


@pytest.mark.parametrize("member", HOSTILE_MEMBERS)
def test_a_stored_tree_with_a_member_off_the_allow_list_is_refused_by_read_verify_and_load(
    pstore: ContentStore, member: str
) -> None:
    bank = install_tree(pstore, {**intent_files(pstore), member: b"\x80\x04K\x01."})
    with pytest.raises(IntegrityError, match=f"member '{member}' is not allowed"):
        pstore.tree_members(bank)  # what pull and publish walk
    h = version_with_intent_bank(pstore, bank)
    bad = failed_checks(pstore, h)
    assert [c.what for c in bad] == ["branches.intent.adapter_bank"] and member in bad[0].detail
    model = compose(pstore, h)
    with pytest.raises(IntegrityError, match="not allowed"):
        model.branch("intent")


def _pickled_state(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    torch.save(load_safetensors(files["adapter_model.safetensors"]), buf)
    return buf.getvalue()


def test_a_pickle_adapter_is_never_unpickled(pstore: ContentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """adapter_config.json + adapter_model.bin (a real torch.save of the weights): refused, and
    torch.load is never called."""
    files = intent_files(pstore)
    bank = install_tree(
        pstore,
        {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": _pickled_state(files)},
    )
    h = version_with_intent_bank(pstore, bank)
    model = compose(pstore, h)
    logits, weights = other_logits(model), base_weights(model)

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load was called on a bank")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(IntegrityError, match="adapter_model.bin"):
        model.branch("intent")
    assert_unchanged(model, logits, weights)


def test_a_folder_bank_without_safetensors_is_refused_at_load(pstore: ContentStore, tmp_path: Path) -> None:
    """Even if a folder reached the loader some other way, it must hold exactly the two files."""
    model = compose(pstore, "demo")
    folder = tmp_path / "adapter"
    folder.mkdir()
    files = intent_files(pstore)
    (folder / "adapter_config.json").write_bytes(files["adapter_config.json"])
    (folder / "adapter_model.bin").write_bytes(_pickled_state(files))
    with pytest.raises(IntegrityError, match="'adapter_model.bin' is not allowed"):
        load_adapter(model.base, "intent", folder)
    assert peft_model(model.base) is None
    assert not any("lora_" in name for name, _ in model.base.model.named_parameters())


def test_cli_refuses_a_pickle_adapter_in_verify_and_predict(pstore: ContentStore) -> None:
    files = intent_files(pstore)
    bank = install_tree(
        pstore,
        {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": _pickled_state(files)},
    )
    h = version_with_intent_bank(pstore, bank)
    env = {"SCALER_HOME": str(pstore.root), "HF_HUB_OFFLINE": "1"}
    import os

    env = {**os.environ, **env}
    env.pop("SCALER_DEBUG", None)
    predicted = run_scaler("predict", h, "--branch", "intent", "hello", env=env)
    one_error_line(predicted, "adapter_model.bin", "not allowed")
    verified = run_scaler("verify", h, env=env)
    assert verified.returncode != 0, verified.stdout
    assert "adapter_model.bin" in verified.stdout + verified.stderr
    assert "internal error" not in verified.stdout + verified.stderr


def test_pull_refuses_a_tree_with_a_pickle_member_and_stores_nothing(
    pstore: ContentStore, tmp_path: Path
) -> None:
    """The pull path (hub._fetch_objects) reads each downloaded tree through read_tree."""
    from scaler_wizard.remote import sync as hub

    remote_root = tmp_path / "remote"
    _copy_store(pstore.root, remote_root)
    remote = ContentStore.open(remote_root)
    files = intent_files(remote)
    bank = install_tree(
        remote,
        {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": _pickled_state(files)},
    )
    target = remote.get_manifest(version_with_intent_bank(remote, bank))
    listing = {hub.bank_file(h, remote.object_path(h)): remote.object_path(h) for h in remote.iter_objects()}
    source = hub._Remote(
        "hostile/repo@main",
        {p: SimpleNamespace(size=path.stat().st_size, lfs=None) for p, path in listing.items()},
        lambda paths: {p: listing[p] for p in paths},
    )
    stage = ContentStore.open(tmp_path / "stage", create=True)
    result = hub.PullResult("hostile/repo", "main", "0" * 40, "demo", "sha256:" + "0" * 64, 4, ["intent"])
    before = sorted(pstore.iter_objects())
    with pytest.raises(IntegrityError, match="'adapter_model.bin' is not allowed"):
        hub._fetch_objects(pstore, stage, target, source, result, lambda _m: None)
    assert sorted(pstore.iter_objects()) == before
    assert BankHash(bank) not in set(pstore.iter_objects())


def test_a_tree_listing_a_file_and_a_folder_of_the_same_name_is_refused(pstore: ContentStore) -> None:
    files = intent_files(pstore)
    bank = install_tree(
        pstore, {**files, "adapter_model.safetensors/x.safetensors": files["adapter_model.safetensors"]}
    )
    with pytest.raises(IntegrityError, match="lists both 'adapter_model.safetensors' and") as info:
        pstore.tree_members(bank)
    assert "\n" not in str(info.value)
    h = version_with_intent_bank(pstore, bank)
    assert [c.what for c in failed_checks(pstore, h)] == ["branches.intent.adapter_bank"]
    with pytest.raises(IntegrityError, match="lists both"):
        compose(pstore, h).branch("intent")


# -- item 2: adapter_config.json is allow-listed: nothing that could touch the base -----------------

HOSTILE_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("init_lora_weights", {"init_lora_weights": "pissa"}),
    ("init_lora_weights", {"init_lora_weights": "pissa_niter_4"}),
    ("init_lora_weights", {"init_lora_weights": "olora"}),
    ("init_lora_weights", {"init_lora_weights": "loftq"}),
    ("init_lora_weights", {"init_lora_weights": "eva"}),
    ("init_lora_weights", {"init_lora_weights": "corda"}),
    ("init_lora_weights", {"init_lora_weights": "lora_ga"}),
    ("modules_to_save", {"modules_to_save": ["pooler"]}),
    ("layers_to_transform", {"layers_to_transform": [0]}),
    ("layers_pattern", {"layers_pattern": "layer"}),
    ("layer_replication", {"layer_replication": [[0, 6], [0, 6]]}),
    ("trainable_token_indices", {"trainable_token_indices": [101, 102]}),
    ("use_dora", {"use_dora": True}),
    ("peft_type", {"peft_type": "IA3"}),
    ("target_parameters", {"target_parameters": ["encoder.layer.0.attention.self.query.weight"]}),
    ("bias", {"bias": "all"}),
    ("bias", {"bias": "lora_only"}),
    ("lora_bias", {"lora_bias": True}),
    ("alora_invocation_tokens", {"alora_invocation_tokens": [101]}),
    ("rank_pattern", {"rank_pattern": {"query": 4}}),
    ("target_modules", {"target_modules": ".*query"}),
    ("target_modules", {"target_modules": []}),
    ("megatron_core", {"megatron_core": "os"}),
    ("megatron_config", {"megatron_config": {"tensor_model_parallel_size": 1}}),
    ("use_rslora", {"use_rslora": True}),
    ("fan_in_fan_out", {"fan_in_fan_out": True}),
    ("task_type", {"task_type": "SEQ_CLS"}),
    ("loftq_config", {"loftq_config": {"loftq_bits": 4}}),
    ("r", {"r": 0}),
    ("r", {"r": True}),
    ("lora_alpha", {"lora_alpha": "16"}),
    ("lora_dropout", {"lora_dropout": 1.5}),
    ("auto_mapping", {"auto_mapping": {"parent_library": "os", "base_model_class": "x", "code": "y"}}),
    ("evil_option", {"evil_option": 1}),
]


def _legit_config(peft_root: Path) -> dict[str, Any]:
    store = ContentStore.open(peft_root)
    config: dict[str, Any] = json.loads(intent_files(store)["adapter_config.json"])
    return config


def test_the_config_peft_writes_is_accepted_and_every_field_it_can_write_is_known(peft_root: Path) -> None:
    from peft import LoraConfig

    from scaler_wizard.plugins import peft_safety

    args = check_adapter_config(_legit_config(peft_root), where="x")
    assert args["r"] == 8 and sorted(args["target_modules"]) == ["query", "value"]
    # A PEFT upgrade that writes a new field makes this fail, not users' loads.
    unknown = set(LoraConfig().to_dict()) - set(peft_safety._FIXED) - set(peft_safety._VARIABLE)
    assert not unknown


@pytest.mark.parametrize(
    ("field", "change"), HOSTILE_CONFIGS, ids=[f"{f}={v[f]!r}"[:40] for f, v in HOSTILE_CONFIGS]
)
def test_hostile_adapter_config_is_refused_naming_the_field(
    peft_root: Path, field: str, change: dict[str, Any]
) -> None:
    config = {**_legit_config(peft_root), **change}
    with pytest.raises(IntegrityError, match=f"field '{field}'") as info:
        check_adapter_config(config, where="branches.intent.adapter_bank")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("missing", ["r", "target_modules", "peft_type"])
def test_adapter_config_without_an_essential_field_is_refused(peft_root: Path, missing: str) -> None:
    config = _legit_config(peft_root)
    del config[missing]
    with pytest.raises(IntegrityError, match=f"field '{missing}' is missing"):
        check_adapter_config(config, where="x")


def _base_weight_in_safetensors(files: dict[str, bytes]) -> dict[str, bytes]:
    tensors = load_safetensors(files["adapter_model.safetensors"])
    tensors["base_model.model.encoder.layer.0.attention.self.query.base_layer.weight"] = torch.zeros(384, 384)
    return {**files, "adapter_model.safetensors": save_safetensors(tensors)}


def _missing_tensor(files: dict[str, bytes]) -> dict[str, bytes]:
    tensors = load_safetensors(files["adapter_model.safetensors"])
    del tensors[sorted(k for k in tensors if "lora_B" in k)[0]]
    return {**files, "adapter_model.safetensors": save_safetensors(tensors)}


def _wrong_shape(files: dict[str, bytes]) -> dict[str, bytes]:
    tensors = load_safetensors(files["adapter_model.safetensors"])
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = torch.zeros(4, 384)
    return {**files, "adapter_model.safetensors": save_safetensors(tensors)}


def _with_config(**changes: Any) -> Any:
    def mutate(files: dict[str, bytes]) -> dict[str, bytes]:
        config = {**json.loads(files["adapter_config.json"]), **changes}
        return {**files, "adapter_config.json": json.dumps(config).encode()}

    return mutate


LOAD_ATTACKS = [
    ("pissa", _with_config(init_lora_weights="pissa"), "init_lora_weights", True),
    ("olora", _with_config(init_lora_weights="olora"), "init_lora_weights", True),
    ("modules_to_save", _with_config(modules_to_save=["pooler"]), "modules_to_save", True),
    ("bias-all", _with_config(bias="all"), "'bias'", True),
    ("layer_replication", _with_config(layer_replication=[[0, 6], [0, 6]]), "layer_replication", True),
    ("base-weight-tensor", _base_weight_in_safetensors, "not one of this adapter's LoRA weights", False),
    ("missing-tensor", _missing_tensor, "lacks tensor", False),
    ("wrong-shape", _wrong_shape, "the adapter needs", False),
]


@pytest.mark.parametrize(
    ("mutate", "needle", "verify_sees_it"), [a[1:] for a in LOAD_ATTACKS], ids=[a[0] for a in LOAD_ATTACKS]
)
def test_loading_a_hostile_peft_bank_is_refused_and_leaves_the_base_and_other_branches_unchanged(
    pstore: ContentStore, mutate: Any, needle: str, verify_sees_it: bool
) -> None:
    h = version_with_intent_bank(pstore, install_tree(pstore, mutate(intent_files(pstore))))
    model = compose(pstore, h)
    logits, weights = other_logits(model), base_weights(model)
    with pytest.raises(IntegrityError, match=needle) as info:
        model.branch("intent")
    assert "\n" not in str(info.value) and "branches.intent.adapter_bank" in str(info.value)
    assert_unchanged(model, logits, weights)
    assert not model.is_loaded("intent")
    if verify_sees_it:
        bad = failed_checks(pstore, h)
        assert [c.what for c in bad] == ["branches.intent.adapter_bank"] and needle.strip("'") in bad[
            0
        ].detail


def test_a_bank_whose_lora_settings_differ_from_the_manifest_is_refused(pstore: ContentStore) -> None:
    """The manifest's strategy config (rank 4) must be what the folder's config says (r 8)."""
    bank = pstore.get_manifest(pstore.resolve("demo"))["branches"]["intent"]["adapter_bank"]
    h = version_with_intent_bank(pstore, bank, rank=4)
    with pytest.raises(IntegrityError, match="says r=8, the branch's strategy config says 4"):
        compose(pstore, h).branch("intent")


def test_cli_predict_refuses_a_pissa_bank_with_one_line(pstore: ContentStore) -> None:
    import os

    h = hostile_config(pstore, init_lora_weights="pissa")
    env = {**os.environ, "SCALER_HOME": str(pstore.root), "HF_HUB_OFFLINE": "1"}
    env.pop("SCALER_DEBUG", None)
    proc = run_scaler("predict", h, "--all-branches", "--json", "hello", env=env)
    one_error_line(proc, "init_lora_weights", "pissa")


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"alpha": float("nan")}, "LoRA setting 'lora_alpha' is NaN"),
        ({"target_modules": ["query|value"]}, "LoRA setting 'target_modules'"),
        ({"rank": 100000}, "LoRA setting 'r' is 100000"),
    ],
)
def test_peft_lora_settings_the_loader_would_refuse_are_refused_before_training(
    peft_root: Path, config: dict[str, Any], needle: str
) -> None:
    """A branch whose bank could never load back is refused when it joins a model, not after
    training (the same allow-list as the loader)."""
    from scaler_wizard.errors import PluginError

    model = compose(ContentStore.open(peft_root), "demo")
    branch = new_branch(hidden_size=384, labels=["a", "b"], strategy="peft-lora", strategy_config=config)
    with pytest.raises(PluginError, match=needle) as info:
        model.add_branch("new", branch)
    assert "\n" not in str(info.value)
    assert "new" not in model.branch_names


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "is not JSON"),
        (b"\xff\xfe{}", "is not JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "over"),
        (b"[" * 20_000 + b"]" * 20_000, "is not JSON"),
        (b"[]", "is not a JSON object"),
        (
            b'{"r": 8, "r": 8, "peft_type": "LORA", "target_modules": ["query"], "x": '
            + b" " * 70_000
            + b"1}",
            "over",
        ),
    ],
    ids=["garbage", "bad-utf8", "huge", "deep", "list", "padded"],
)
def test_a_malformed_adapter_config_is_refused_with_one_line(tmp_path: Path, raw: bytes, needle: str) -> None:
    from scaler_wizard.plugins.peft_safety import read_adapter_config

    path = tmp_path / "adapter_config.json"
    path.write_bytes(raw)
    with pytest.raises(IntegrityError, match=needle) as info:
        read_adapter_config(path, where="branches.x.adapter_bank")
    assert "\n" not in str(info.value)
