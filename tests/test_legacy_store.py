"""A store written before the re-layering (issue 11) still composes and predicts bit-identically.

``tests/fixtures/legacy_store`` was made by ``make_fixture.sh`` at commit 4ea24b2: a model with a
trained trunk (2 MoE layers), an attn-mlp, a lora and a peft-lora branch, plus the logits that
code computed. The 90 MB base bank is not kept in git: ``scaler init`` stores the same bytes
again (content addressing makes it the same object, which the hash check proves).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from conftest import run_scaler
from safetensors.torch import load_file

from scaler_wizard.banks import ContentStore

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_store"


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SCALER_HOME"] = str(root)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _restore(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(FIXTURE / "store", root)
    for path in root.rglob("*"):  # git checkouts drop the read-only bits
        if path.is_file():
            path.chmod(0o444 if "objects" in path.parts else 0o644)
    proc = run_scaler(
        "init", "restore-base", "--experts", "2", "--moe-layers", "1", "--expert-hidden", "8", env=_env(root)
    )
    assert proc.returncode == 0, proc.stderr
    return root


def test_a_store_from_before_the_relayering_predicts_bit_identically(tmp_path: Path) -> None:
    from scaler_wizard import compose

    root = _restore(tmp_path)
    model = compose(ContentStore.open(root), "legacy")
    texts = json.loads((FIXTURE / "texts.json").read_text())
    expected = load_file(FIXTURE / "expected.safetensors")
    batch = model.base.tokenize(texts, model.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was computed with OMP_NUM_THREADS=1: same reduction order
    try:
        with torch.inference_mode():
            out = model(batch["input_ids"], batch["attention_mask"])
    finally:
        torch.set_num_threads(threads)
    assert sorted(out.logits) == sorted(k.split(".", 1)[1] for k in expected if k.startswith("logits."))
    for name, logits in out.logits.items():
        assert torch.equal(logits, expected[f"logits.{name}"]), name
    assert torch.equal(out.trunk.pooled, expected["trunk.pooled"])


def test_a_store_from_before_the_relayering_verifies(tmp_path: Path) -> None:
    root = _restore(tmp_path)
    proc = run_scaler("verify", "legacy", "--deep", env=_env(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
