"""Shared by the ``scaler train`` tests: a store with a small model whose base states for the
sample data are already cached, copied per test (objects and cache files hard-linked: both
are written once, atomically, and never modified in place)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from scaler_wizard.banks import ContentStore

REPO = Path(__file__).resolve().parent.parent
SMS = REPO / "data" / "samples" / "sms_spam_small.csv"
TREC = REPO / "data" / "samples" / "trec_small.csv"
#: small trunk: 2 MoE layers x 4 experts (width 32), top-2
TINY = {"moe_layers": 2, "num_experts": 4, "top_k": 2, "expert_hidden": 32}
_TEMPLATES: dict[str, Path] = {}


def copy_store(src: Path, dst: Path) -> None:
    def link_or_copy(s: str, d: str) -> None:
        if f"{os.sep}objects{os.sep}" in s or f"{os.sep}cache{os.sep}" in s:
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)


def tiny_template(factory: pytest.TempPathFactory) -> Path:
    """Model ``tiny`` (v1, no branches) with the sample data's base states cached."""
    if "tiny" in _TEMPLATES:
        return _TEMPLATES["tiny"]
    from scaler_wizard.caches.base_states import cached_states
    from scaler_wizard.modeling.compose import compose, init_model
    from scaler_wizard.training.batches import load_branch_data
    from scaler_wizard.training.config import BranchSpec, TrainConfig

    root = factory.mktemp("train-template") / "store"
    store = ContentStore.open(root, create=True)
    init_model(store, "tiny", seed=0, **TINY)
    model = compose(store, "tiny")
    assert model.origin is not None
    cfg = TrainConfig()
    for name, path in (("spam", SMS), ("trec", TREC)):
        part = load_branch_data(BranchSpec(name, path), None, cfg)
        cached_states(store, model.base, model.origin.base_entry, part.train.texts + part.eval.texts)
    _TEMPLATES["tiny"] = root
    return root


@pytest.fixture
def one_thread() -> Any:
    """Steps of a tiny model are dominated by thread hand-offs on a shared 2-CPU machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SCALER_HOME": str(store),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "SCALER_PLUGINS": "",
        }
    )
    env.pop("SCALER_DEBUG", None)
    return env


def records(run_dir: Path, event: str = "train") -> list[dict[str, Any]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") == event:
            out.append(r)
    return out


def result_banks(store: ContentStore, model: str) -> dict[str, str]:
    """Every bank of the model's current version, by field."""
    from scaler_wizard.manifests.facts import banks_of

    m = store.get_manifest(store.resolve(model))
    return {f: h for f, h, _ in banks_of(m)}
