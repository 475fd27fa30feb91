"""scripts/get_teachers.sh assembles a teacher from split wheel parts (tiny fake parts only)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "get_teachers.sh"
NAME = "all-mpnet-base-v2"


def fake_wheels(wheels: Path, members: dict[str, bytes]) -> None:
    """Five wheels whose input/NAME.zip.00N parts, concatenated, make a zip of ``members``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    blob = buf.getvalue()
    size = -(-len(blob) // 5)
    wheels.mkdir(parents=True)
    for i in range(1, 6):
        pkg = f"{NAME.replace('-', '_')}_pypi_part_{i:03d}"
        with zipfile.ZipFile(wheels / f"{pkg}-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{NAME}-pypi-part_{i:03d}/__init__.py", b"")
            wheel.writestr(
                f"{NAME}-pypi-part_{i:03d}/input/{NAME}.zip.{i:03d}", blob[(i - 1) * size : i * size]
            )


def run(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TEACHERS_DIR": str(tmp_path / "teachers"),
        "TEACHERS_WHEELS": str(tmp_path / "wheels"),
        "PYTHON": sys.executable,
    }
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def members() -> dict[str, bytes]:
    return {
        f"{NAME}/config.json": b'{"model_type": "mpnet"}',
        f"{NAME}/model.safetensors": os.urandom(3000),
        f"{NAME}/1_Pooling/config.json": b"{}",
        f"{NAME}/pytorch_model.bin": b"pickle, never kept",
        f"{NAME}/desktop.ini": b"x",
    }


def test_assembles_verifies_and_skips_when_cached(tmp_path: Path, members: dict[str, bytes]) -> None:
    fake_wheels(tmp_path / "wheels", members)
    first = run(tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "teachers" / NAME
    assert first.stdout.strip().endswith(str(out))
    assert (out / "model.safetensors").read_bytes() == members[f"{NAME}/model.safetensors"]
    assert (out / "1_Pooling" / "config.json").is_file()
    assert not (out / "pytorch_model.bin").exists() and not (out / "desktop.ini").exists()
    sums = (out / "SHA256SUMS").read_text()
    assert "model.safetensors" in sums and "config.json" in sums
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = run(tmp_path)  # cached: nothing rebuilt
    assert again.returncode == 0 and (out / "model.safetensors").stat().st_mtime_ns == stamp
    (out / "model.safetensors").write_bytes(b"damaged")  # checksum mismatch: assembled anew
    repaired = run(tmp_path)
    assert repaired.returncode == 0, repaired.stderr
    assert (out / "model.safetensors").read_bytes() == members[f"{NAME}/model.safetensors"]


def test_no_safetensors_fails(tmp_path: Path, members: dict[str, bytes]) -> None:
    del members[f"{NAME}/model.safetensors"]
    fake_wheels(tmp_path / "wheels", members)
    result = run(tmp_path)
    assert result.returncode != 0 and "no model.safetensors" in result.stderr
    assert not (tmp_path / "teachers" / NAME).exists()
