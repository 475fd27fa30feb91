"""Shared fixtures: a real store with a real model (all-MiniLM-L6-v2 base), built once per session.

``store`` gives each test its own copy. Objects in the copy are *hard links* to the session's
(objects are immutable, so this is safe and fast): to tamper with one, use ``tamper_object``,
which breaks the link first — never write into an object file in place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["SCALER_PLUGINS"] = ""  # no third-party entry points in the core suite

import torch

from scaler_wizard.banks import ContentStore

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
SCALER = Path(sys.executable).parent / "scaler"


def _copy_store(src: Path, dst: Path) -> None:
    def link_or_copy(s: str, d: str) -> None:
        if f"{os.sep}objects{os.sep}" in s:
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)


@pytest.fixture(scope="session")
def session_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding model ``demo``: v1 = fresh trunk, v2 = + branches ``spam`` and ``topic``.

    The branches have random (non-zero) weights so their logits are distinct and non-trivial.
    """
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    root = tmp_path_factory.mktemp("session") / "store"
    store = ContentStore.open(root, create=True)
    torch.manual_seed(0)
    init_model(store, "demo", seed=0)
    model = compose(store, "demo")
    _perturb(model.trunk)
    for name, labels in (("spam", ["ham", "spam"]), ("topic", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])):
        branch = new_branch(hidden_size=384, labels=labels)
        _perturb(branch)
        model.add_branch(name, branch)
    save_version(store, model, message="add spam and topic")
    return root


def _perturb(module: torch.nn.Module) -> None:
    """Give zero-initialised weights (LoRA B, expert outputs) some value so outputs move."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 0 and torch.count_nonzero(p) == 0:
                p.normal_(std=0.02)


@pytest.fixture
def store_path(session_store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    _copy_store(session_store, dst)
    return dst


@pytest.fixture
def store(store_path: Path) -> ContentStore:
    return ContentStore.open(store_path)


@pytest.fixture
def empty_store(tmp_path: Path) -> ContentStore:
    return ContentStore.open(tmp_path / "empty-store", create=True)


def tamper_object(path: Path, offset: int = -1) -> None:
    """Flip one byte of a store object without touching other hard links to it."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.unlink()
    path.write_bytes(bytes(data))


@pytest.fixture
def scaler_env(store_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SCALER_HOME"] = str(store_path)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("SCALER_DEBUG", None)
    return env


def run_scaler(
    *args: str, env: dict[str, str], input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real ``scaler`` console script."""
    return subprocess.run(
        [str(SCALER), *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
