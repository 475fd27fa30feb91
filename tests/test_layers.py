"""The part rules (docs/architecture.md) are checked by import-linter, and a forbidden arrow fails them.

Each test lays the source folders out as an importable ``scaler_wizard`` package in a temporary
folder (pyproject's ``package-dir`` mapping: core/ *is* ``scaler_wizard``), copies pyproject.toml
(which holds the contracts) next to it, and runs the real ``lint-imports`` there in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - import-linter depends on tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _package_dirs() -> dict[str, str]:
    """pyproject's package-dir: import name -> source folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    return mapping


def _lay_out(dest: Path) -> Path:
    """Copy the sources into ``dest`` as the ``scaler_wizard`` package; returns the folder to run in."""
    # parents first, so that scaler_wizard/ exists before scaler_wizard/plugins/ is copied into it
    for name, folder in sorted(_package_dirs().items(), key=lambda item: item[0].count(".")):
        target = dest.joinpath(*name.split("."))
        assert not target.exists(), f"{folder}/ would overwrite {target}: two folders map onto one package"
        shutil.copytree(ROOT / folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: run `bash scripts/setup.sh` (dev extras)"
    env = dict(os.environ)
    # the copy comes first on sys.path, before the editable install of the real package
    env["PYTHONPATH"] = str(cwd)
    env.pop("PYTHONSAFEPATH", None)
    env["COLUMNS"] = "1000"  # one line per contract and per import in the report (rich wraps at 80)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _broken_contracts(output: str) -> list[str]:
    return [line[: -len(" BROKEN")].strip() for line in output.splitlines() if line.endswith(" BROKEN")]


def _add_line_after_imports(path: Path, line: str) -> None:
    """Insert ``line`` after the module's ``from __future__`` import (or at the top)."""
    text = path.read_text(encoding="utf-8")
    marker = "from __future__ import annotations\n"
    if marker in text:
        text = text.replace(marker, marker + line + "\n", 1)
    else:
        text = line + "\n" + text
    path.write_text(text, encoding="utf-8")


def test_a_forbidden_arrow_fails_lint_imports_naming_the_contract(tmp_path: Path) -> None:
    copy = _lay_out(tmp_path)
    arrow = "scaler_wizard.banks.store -> scaler_wizard.modeling.compose"
    assert arrow not in _lint_imports(copy).stdout

    # the store reaching into the runtime: the arrow issue 11 removes
    _add_line_after_imports(
        copy / "scaler_wizard" / "banks" / "store.py", "import scaler_wizard.modeling.compose"
    )
    result = _lint_imports(copy)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    broken = _broken_contracts(result.stdout)
    assert "The store and manifests never import the runtime, the CLI or torch" in broken, output
    assert any(c.startswith("Parts are layered") for c in broken), output
    # the report names the offending import (absent before the arrow was added)
    assert arrow in output, output


def test_the_cli_in_the_runtime_fails_lint_imports(tmp_path: Path) -> None:
    copy = _lay_out(tmp_path)
    _add_line_after_imports(
        copy / "scaler_wizard" / "modeling" / "compose.py", "import scaler_wizard.cli.app"
    )
    result = _lint_imports(copy)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "The runtime never imports the CLI" in _broken_contracts(result.stdout), output
    assert "scaler_wizard.modeling.compose -> scaler_wizard.cli.app" in output, output


def test_an_eager_root_fails_the_thin_root_contract(tmp_path: Path) -> None:
    copy = _lay_out(tmp_path)
    _add_line_after_imports(copy / "scaler_wizard" / "__init__.py", "import scaler_wizard.moe")
    result = _lint_imports(copy)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    broken = _broken_contracts(result.stdout)
    assert any(c.startswith("The root is thin") for c in broken), output


def test_an_undeclared_part_fails_the_layers_contract(tmp_path: Path) -> None:
    copy = _lay_out(tmp_path)
    (copy / "scaler_wizard" / "stray.py").write_text('"""A new part nobody placed."""\n', encoding="utf-8")
    result = _lint_imports(copy)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert any(c.startswith("Parts are layered") for c in _broken_contracts(result.stdout)), output
    assert "scaler_wizard.stray" in output, output


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint_imports(_lay_out(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
