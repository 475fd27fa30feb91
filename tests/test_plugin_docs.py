"""The plugin author's guide and the public-API boundary.

* every hook spec has a section in docs/plugins.md with an example, is named in a test, and
  the guide's examples run as written;
* the built-in plugins and the example distribution import only the public API, so anything
  a built-in does a third party can do.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from conftest import REPO
from typer.testing import CliRunner

import scaler_wizard
from scaler_wizard import hookspecs
from scaler_wizard.banks import ContentStore
from scaler_wizard.branch import BranchAdapter, Head, TrunkOutput
from scaler_wizard.moe import Gating, Routing
from scaler_wizard.plugin_config import build_config

DOC = REPO / "docs" / "plugins.md"
EXTRAS = REPO / "examples" / "plugins" / "scaler-wizard-extras"
PUBLIC_API = {
    "scaler_wizard",
    "scaler_wizard.moe",
    "scaler_wizard.branch",
    "scaler_wizard.banks",
    "scaler_wizard.hookspecs",
    "scaler_wizard.plugin_config",
    "scaler_wizard.encoder_host",  # issue 11 item 6: what in-encoder strategies see of the base
    "scaler_wizard.errors",
}
SOURCE_FOLDERS = {"core", "plugins", "banks", "manifests", "cli"}  # never imported by path


def hook_names() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, marker))


def doc_sections() -> dict[str, str]:
    """``### `register_x(...)``` heading -> the text up to the next heading of that level or higher."""
    text = DOC.read_text()
    sections: dict[str, str] = {}
    for match in re.finditer(r"^### `(\w+)\((.*?)\)`\n(.*?)(?=^#{1,3} )", text, re.S | re.M):
        sections[match[1]] = match[3]
    return sections


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_the_hook_specs_are_the_five_of_the_design() -> None:
    assert hook_names() == [
        "register_branch_strategies",
        "register_commands",
        "register_gating",
        "register_heads",
        "register_stores",
    ]


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented_with_its_arguments_and_an_example(hook: str) -> None:
    sections = doc_sections()
    assert hook in sections, f"docs/plugins.md has no '### `{hook}(...)`' section"
    blocks = python_blocks(sections[hook])
    assert any(f"def {hook}(" in block for block in blocks), f"no example implementing {hook}"
    argument = "cli" if hook == "register_commands" else "register"
    assert re.search(rf"^### `{hook}\({argument}\)`", DOC.read_text(), re.M)
    if hook != "register_commands":
        assert "factory" in sections[hook], f"{hook}: the factory signature is not documented"


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_exercised_by_a_test(hook: str) -> None:
    test_files = [*(REPO / "tests").rglob("*.py"), *(REPO / "examples" / "plugins").glob("*/tests/*.py")]
    users = [p for p in test_files if p != Path(__file__) and hook in p.read_text()]
    assert users, f"no test mentions {hook}"


def test_the_guide_covers_loading_compatibility_and_the_public_api() -> None:
    text = DOC.read_text()
    for needle in (
        "[project.entry-points.scaler_wizard]",
        "SCALER_PLUGINS",
        "--strict",
        "SCALER_STRICT_PLUGINS",
        'scaler_wizard_api = ">=1,<2"',
        f"**{hookspecs.HOOKSPEC_VERSION}**",
        "install `scaler-wizard-extras>=0.2.0`",
        "factory(config, *, hidden_size: int, num_experts: int)",
        "factory(config, *, in_features: int, labels: list[str])",
        "factory(config, *, hidden_size: int)",
        "factory(location: str",
    ):
        assert needle in text, f"docs/plugins.md does not mention {needle}"
    documented = set(re.findall(r"^\| `(scaler_wizard[\w.]*)` \|", text, re.M))
    assert documented == PUBLIC_API
    pyproject = (EXTRAS / "pyproject.toml").read_text()
    assert '[project.entry-points.scaler_wizard]\nextras = "scaler_wizard_extras"\n' in pyproject


class _Recorder:
    def __init__(self) -> None:
        self.registered: list[tuple[str, Any, Any]] = []

    def __call__(self, name: str, factory: Any, *, config: Any = None, description: str = "") -> None:
        self.registered.append((name, factory, config))


@pytest.mark.parametrize("hook", hook_names())
def test_the_examples_in_the_guide_run(hook: str, tmp_path: Path) -> None:
    (block,) = [b for b in python_blocks(doc_sections()[hook]) if f"def {hook}(" in b]
    namespace: dict[str, Any] = {"__name__": f"doc_example_{hook}"}
    exec(compile(block, f"docs/plugins.md ({hook})", "exec", dont_inherit=True), namespace)
    impl = namespace[hook]
    assert hasattr(impl, f"{hookspecs.PROJECT}_impl"), f"the {hook} example lacks @hookimpl"
    if hook == "register_commands":
        app = typer.Typer()

        @app.callback()
        def root(store: Path | None = typer.Option(None, "--store")) -> None:
            """A stand-in for the `scaler` root app and its global options."""

        impl(cli=app)
        (command,) = app.registered_commands
        ContentStore.open(tmp_path / "store", create=True)
        result = CliRunner().invoke(app, ["--store", str(tmp_path / "store"), command.name or ""])
        assert result.exit_code == 0, result.output
        return
    record = _Recorder()
    impl(register=record)
    (name, factory, config) = record.registered[0]
    cfg, _ = build_config(config, {}, where="example")
    if hook == "register_gating":
        gate = factory(cfg, hidden_size=8, num_experts=4)
        routing = gate(torch.randn(5, 8))
        assert isinstance(gate, Gating) and isinstance(routing, Routing)
        assert routing.combine.shape == (5, 4)
    elif hook == "register_heads":
        head = factory(cfg, in_features=8, labels=["a", "b", "c"])
        assert isinstance(head, Head) and head(torch.randn(2, 8)).shape == (2, 3)
    elif hook == "register_branch_strategies":
        adapter = factory(cfg, hidden_size=8)
        pooled = torch.randn(2, 8)
        trunk = TrunkOutput(pooled, pooled[:, None], torch.ones(2, 1, dtype=torch.bool), pooled.new_zeros(()))
        assert isinstance(adapter, BranchAdapter) and adapter(trunk).shape == (2, adapter.out_features)
    else:
        assert hook == "register_stores" and callable(factory) and name.isidentifier()


# -- the public-API boundary -----------------------------------------------------------------

PLUGIN_SOURCES = sorted((REPO / "plugins").glob("*.py")) + sorted(
    p for p in EXTRAS.rglob("*.py") if "build" not in p.relative_to(EXTRAS).parts
)


def _imports(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) for every import in a file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: relative import"
            found.append((node.lineno, node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names)
    return found


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_import_only_the_public_api(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for line, module, names in _imports(tree):
        where = f"{path.relative_to(REPO)}:{line}"
        assert module.split(".")[0] not in SOURCE_FOLDERS, f"{where}: imports the source folder {module}"
        if module.split(".")[0] != "scaler_wizard":
            continue
        # a built-in's own implementation module is a sibling in plugins/, itself checked here
        own = (
            module.startswith("scaler_wizard.plugins.")
            and (REPO / "plugins" / (module.rsplit(".", 1)[1] + ".py")).is_file()
        )
        assert module in PUBLIC_API or own, f"{where}: {module} is not public API"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{where}: imports private {private} from {module}"
        if module == "scaler_wizard":
            assert set(names) <= set(scaler_wizard.__all__), f"{where}: {names} not in scaler_wizard.__all__"
    for node in ast.walk(tree):  # `import scaler_wizard; scaler_wizard.x`
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "scaler_wizard"
        ):
            assert node.attr in scaler_wizard.__all__, f"{path.name}:{node.lineno}: scaler_wizard.{node.attr}"


def test_the_boundary_scan_sees_the_example_package() -> None:
    scanned = {str(p.relative_to(EXTRAS)) for p in PLUGIN_SOURCES if p.is_relative_to(EXTRAS)}
    assert "src/scaler_wizard_extras/__init__.py" in scanned and "tests/test_extras.py" in scanned
