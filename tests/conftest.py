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


# -- the machine the pinned numbers were made on --------------------------------------------
LEGACY = Path(__file__).parent / "fixtures" / "legacy_store"


def restore_legacy_store(root: Path) -> Path:
    """``tests/fixtures/legacy_store``'s store under ``root``, its base bank put back by
    ``scaler init`` (the same bytes, so the same object)."""
    shutil.copytree(LEGACY / "store", root)
    for path in root.rglob("*"):  # git checkouts drop the read-only bits
        if path.is_file():
            path.chmod(0o444 if "objects" in path.parts else 0o644)
    env = dict(os.environ, SCALER_HOME=str(root), HF_HUB_OFFLINE="1")
    proc = run_scaler(
        "init", "restore-base", "--experts", "2", "--moe-layers", "1", "--expert-hidden", "8", env=env
    )
    assert proc.returncode == 0, proc.stderr
    return root


@torch.inference_mode()
def legacy_forward(root: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(the legacy model's output on the fixture's texts, one thread, the fixture's expected tensors)."""
    import json

    from safetensors.torch import load_file

    from scaler_wizard.modeling.compose import compose

    model = compose(ContentStore.open(root), "legacy")
    texts = json.loads((LEGACY / "texts.json").read_text())
    batch = model.base.tokenize(texts, model.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was computed with OMP_NUM_THREADS=1: same reduction order
    try:
        out = model(batch["input_ids"], batch["attention_mask"])
    finally:
        torch.set_num_threads(threads)
    return out, load_file(LEGACY / "expected.safetensors")


@pytest.fixture(scope="session")
def reference_kernels(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether this CPU computes float32 exactly as the machine the pinned numbers came from.

    torch picks its float kernels by instruction set (AMX / AVX-512 FP16 machines round some
    sums differently even for the same code and one thread), so bit-exact pins hold only on a
    CPU like the one they were made on. The canary: the legacy fixture's trunk output,
    recomputed here, is the same bits as recorded there."""
    out, expected = legacy_forward(restore_legacy_store(tmp_path_factory.mktemp("canary") / "store"))
    return bool(torch.equal(out.trunk.pooled, expected["trunk.pooled"]))  # type: ignore[attr-defined]
