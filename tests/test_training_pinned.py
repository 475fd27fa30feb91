"""Training with a fixed seed gives the very weights it gave before the training package was
split into modules (issue 11 item 4): the bank hashes and probe fingerprints below were
computed with the code as it was before the split (the single ``loop.py``), on CPU.

Bank hashes are the sha256 of the saved safetensors bytes, so equal hashes mean bit-identical
weights. Float results may differ on another torch build or device, so the exact comparison
runs where the pins were made (``PINNED_TORCH``, CPU); elsewhere the test is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA
from train_helpers import SMS, TREC, copy_store, one_thread, tiny_template  # noqa: F401

from scaler_wizard.banks import ContentStore
from scaler_wizard.training.branch_add import DataSpec, add_branch
from scaler_wizard.training.branch_fit import BranchTrainingConfig
from scaler_wizard.training.config import BranchSpec, TrainConfig
from scaler_wizard.training.loop import make_accelerator, plan_run, start_run, train_run

PINNED_TORCH = "2.13.0+cpu"

pytestmark = pytest.mark.skipif(
    torch.__version__ != PINNED_TORCH or torch.cuda.is_available(),
    reason=f"pins computed with torch {PINNED_TORCH} on CPU",
)


def weights_of(store: ContentStore, model: str, branches: list[str], *, trunk: bool) -> dict[str, Any]:
    """The banks (content hashes of the weights) and probe fingerprints of a model's current version.

    A PEFT adapter bank is a tree of ``adapter_config.json`` and the weights file; the config
    lists ``target_modules`` in set order, which changes from process to process (string
    hashing is randomised), so for a tree bank only the hash of its weights file is pinned."""
    manifest = store.get_manifest(store.resolve(model))
    out: dict[str, Any] = {}
    if trunk:
        out["trunk"] = [layer["bank"] for layer in manifest["trunk"]["layers"]]
    for name in branches:
        entry = manifest["branches"][name]
        adapter = entry.get("adapter_bank")
        tree = store.read_tree(adapter) if adapter else None
        out[name] = {
            "adapter_bank": tree["files"]["adapter_model.safetensors"] if tree else adapter,
            "head_bank": entry.get("head_bank"),
            "fingerprint": entry["fingerprint"]["sha256"],
        }
    return out


TRAIN_PIN: dict[bool, dict[str, Any]] = {
    True: {
        "trunk": [
            "sha256:607de634d9d3042d0d50fe40069234347c4be1f35111f22ec6d60455625c7337",
            "sha256:a7ec1b4d061f8f50985ae605b5adf5b567e91196f42603496b971f903287888c",
        ],
        "spam": {
            "adapter_bank": "sha256:b2eccc7746331e8f68e6da9a86d91585d8ab095d9b578a6b2fa0d9e58c0f3572",
            "head_bank": "sha256:e8344a28e43b4f0b5c9fb85b77988f7687ecd40ae5e32b95d4fe4fe98713d9f9",
            "fingerprint": "sha256:94a50e441334ab226c3af4cb6b69281fe55d6f4a1b48f38da4ee52ec8f8c3a1c",
        },
        "trec": {
            "adapter_bank": "sha256:92adc58d89dd05e5456413c62cf7858e7b8a49543d579ab42a9602db51d345d9",
            "head_bank": "sha256:765c7b135a020852d0cb29e6c55820d8a0a04b410cb2a8b1a1291f7e4673961f",
            "fingerprint": "sha256:a9d715653068ac5ba075df6823833bbda236347135b59c3e5188baeca05eff06",
        },
    },
    False: {
        "trunk": [
            "sha256:8391358e14949f03bb6720b20434381e164d6bab9a3717d22fdc27defb91ee73",
            "sha256:6620dfccddc615aa252505af168afb6f3e7a6678bc1514f57539480e543336aa",
        ],
        "spam": {
            "adapter_bank": "sha256:c8c9b4ecbb57a2b70229c397796030eef949d9c12e7ef708d957d19d97ccdc25",
            "head_bank": "sha256:7d0936ef553cbb817b70bf12c5ce6f3ca6a9432ae9cfbeae48c8efe416ba2d7a",
            "fingerprint": "sha256:14273c202f81c31f4f66045d2a271a4889302ed91308a2622de501684eae88cc",
        },
        "trec": {
            "adapter_bank": "sha256:dfaa380ed6f67af83df03f7bc209ed8838c4be3cca9ee612aa82121946ff124b",
            "head_bank": "sha256:2ae245ebb2245a86ad3cb64102fc3198f045c2271f793e727376270b1ac3162a",
            "fingerprint": "sha256:82a8747a1bb1e3e921747a51c0c2c12dc4daef30fb188d3228dc716ea4f56ce9",
        },
    },
}
ADD_PIN: dict[str, dict[str, Any]] = {
    "lora": {
        "adapter_bank": "sha256:62ef2f0be926b82b2421ac2d8932d8f507cf7accc90dd3cf1fad7da26b72b2b3",
        "head_bank": "sha256:2f0e041569d7434b93391c28bf4dd5e5736d1c7001caad11eddef24b318e6952",
        "fingerprint": "sha256:0c3bac86423e9646d118561855d3074d5b55e5179daab66f1e46da243673e46d",
    },
    "attn-mlp": {
        "adapter_bank": "sha256:281276470601807b6af5a6706c72d2ce4ceb7e00ac197abad31b71bbb684917e",
        "head_bank": "sha256:692fd1a99561df1ed0e9554497f55b3b6fb82711993c58c3349700bbef02a9f3",
        "fingerprint": "sha256:531c52164bfc9d4e9d33e9fb3868458f6eff22a27ac6f2a77c0f2acfbddfcf2a",
    },
    "peft-lora": {
        "adapter_bank": "sha256:e48b81814d7b1b41f6e018faeea03d1052afc1cd75462a59ead5c50160b4106a",
        "head_bank": "sha256:36c5f221e2c21210480da39cdef77e49e6c41bf7b38393e67e4e1bfd49431b3f",
        "fingerprint": "sha256:de632b6cf4c9e2f0e1ae5bd5278fd5289f29604ec22212631d6df0e78a108b7c",
    },
}


@pytest.fixture(autouse=True)
def _pins_hold_here(reference_kernels: bool) -> None:
    if not reference_kernels:
        pytest.skip(
            "this CPU's float kernels round otherwise than the pins' machine (see conftest.reference_kernels)"
        )


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("base_cache", [True, False])
def test_train_run_gives_the_pinned_weights(
    base_cache: bool, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    copy_store(tiny_template(tmp_path_factory), root)
    store = ContentStore.open(root)
    config = TrainConfig(
        steps=6,
        batch_size=16,
        eval_every=3,
        checkpoint_every=3,
        check_window=3,
        seed=3,
        base_cache=base_cache,
    )
    plan = plan_run(store, "tiny", [BranchSpec("spam", SMS), BranchSpec("trec", TREC)], config)
    acc = make_accelerator()
    train_run(store, start_run(store, plan, run_dir=tmp_path / "run", accelerator=acc), accelerator=acc)
    got = weights_of(store, "tiny", ["spam", "trec"], trunk=True)
    assert got == TRAIN_PIN[base_cache]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("strategy", ["lora", "attn-mlp", "peft-lora"])
def test_branch_add_gives_the_pinned_weights(strategy: str, store: ContentStore) -> None:
    training = BranchTrainingConfig(epochs=2, max_steps=4, batch_size=32, seed=5, warmup_steps=2)
    data = DataSpec(DATA / "samples" / "sms_spam_small.csv", eval_split=0.2)
    add_branch(store, "demo", "sms", data, strategy=strategy, training=training)
    got = weights_of(store, "demo", ["sms"], trunk=False)
    assert got == {"sms": ADD_PIN[strategy]}
