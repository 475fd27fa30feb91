"""Start-up: the root, the store and the manifests import no torch; ``scaler --help`` and
``--version`` import no torch (nor the other slow libraries), yet list every command.

Each check runs in a fresh interpreter (this test process has long imported torch) and reads
``sys.modules`` at its end. Timings are measured by bench/bench_startup.py, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SCALER

#: never imported by ``import scaler_wizard`` nor by ``scaler --help`` / ``--version``
HEAVY = ("torch", "transformers", "peft", "pandas", "pyarrow", "huggingface_hub", "sklearn")


def python(code: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def loaded_after(imports: str) -> list[str]:
    proc = python(
        f"""
        import json, sys
        {imports}
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
        """
    )
    assert proc.returncode == 0, proc.stderr
    return [m for m in json.loads(proc.stdout.splitlines()[-1]) if m in HEAVY]


@pytest.mark.parametrize(
    "imports",
    [
        "import scaler_wizard",
        "import scaler_wizard.errors, scaler_wizard.names, scaler_wizard.version",
        "import scaler_wizard.banks.hashing",
        "import scaler_wizard.manifests",
        "import scaler_wizard.plugin_manager",
        "import scaler_wizard.cli.app",
        "from scaler_wizard import hookimpl, hookspec, HOOKSPEC_VERSION, __version__",
    ],
)
def test_importing_the_light_parts_imports_no_torch(imports: str) -> None:
    assert loaded_after(imports) == []


def test_the_public_names_resolve_lazily_to_the_real_objects() -> None:
    proc = python(
        """
        import sys, scaler_wizard
        assert "torch" not in sys.modules
        assert {"compose", "init_model", "new_branch", "new_trunk_layer", "save_version", "ContentStore",
                "get_plugin_manager", "get_registry", "HubRepo", "hookimpl", "__version__"} <= set(dir(scaler_wizard))
        from scaler_wizard import compose
        from scaler_wizard.modeling.compose import compose as real
        assert compose is real and scaler_wizard.compose is real and callable(compose)
        assert "torch" in sys.modules
        from scaler_wizard import ContentStore, get_registry
        from scaler_wizard.banks import ContentStore as store_class
        assert ContentStore is store_class
        assert "topk" in get_registry().names("gating")
        try:
            scaler_wizard.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


#: runs the installed console script's entry point (``scaler = scaler_wizard.cli.app:main``)
#: once per command line, then reports the slow libraries each run had imported
RUN_ENTRY = """
import json, sys
from importlib.metadata import entry_points

(script,) = entry_points(group="console_scripts", name="scaler")
main = script.load()
report = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["scaler", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    report.append([args, code, sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))])
print("\\n" + json.dumps(report), file=sys.__stderr__)
"""


def run_entry(command_lines: list[list[str]], env: dict[str, str]) -> list[tuple[list[str], int, list[str]]]:
    code = f"HEAVY = {HEAVY!r}\n" + RUN_ENTRY
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(command_lines)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.stderr.strip(), proc.stdout
    return [tuple(r) for r in json.loads(proc.stderr.strip().splitlines()[-1])]  # type: ignore[misc]


def command_names() -> list[str]:
    """Every top-level command and group of the app, as click sees it."""
    import typer.main

    from scaler_wizard.cli.app import app

    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_help_and_version_import_no_torch(tmp_path: Path) -> None:
    env = dict(os.environ, SCALER_HOME=str(tmp_path / "store"))
    lines = [["--help"], ["--version"], ["branch", "--help"], *([c, "--help"] for c in command_names())]
    for args, code, heavy in run_entry(lines, env):
        assert code == 0, args
        assert heavy == [], f"scaler {' '.join(args)} imported {heavy}"


HELLO = '''
"""A third-party plugin that adds a command; it imports torch only when the command runs."""
import typer
from scaler_wizard import hookimpl


@hookimpl
def register_commands(cli):
    @cli.command("hello-startup")
    def hello(name: str = typer.Option("world")) -> None:
        """Say hello (added by an installed plugin)."""
        import torch

        typer.echo(f"hello {name}, torch {torch.__version__ > ''}")
'''


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """An installed (unpacked) distribution whose entry point adds the command ``hello-startup``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sw_startup_hello.py").write_text(HELLO)
    info = site / "sw_startup_hello-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sw-startup-hello\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[scaler_wizard]\nhello = sw_startup_hello\n")
    env = dict(os.environ, SCALER_PLUGINS="hello", SCALER_HOME=str(tmp_path / "store"))
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_the_real_console_script_lists_every_command_and_a_plugins_command(
    plugin_env: dict[str, str],
) -> None:
    proc = subprocess.run(
        [str(SCALER), "--help"], env=plugin_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    listed = {
        line.split()[1] for line in proc.stdout.splitlines() if line.startswith("│ ") and line.split()[1:]
    }
    assert set(command_names()) | {"hello-startup"} <= listed, proc.stdout
    # the plugin's command is listed without torch, and runs (importing torch) when called
    ((_, code, heavy),) = run_entry([["--help"]], plugin_env)
    assert (code, heavy) == (0, [])
    ran = subprocess.run(
        [str(SCALER), "hello-startup", "--name", "you"],
        env=plugin_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello you, torch True\n"


def test_plugins_still_lists_the_built_ins_from_their_cheap_modules(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(SCALER), "plugins", "--json"],
        env=dict(os.environ, SCALER_HOME=str(tmp_path / "store")),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    registers = {
        (r["kind"], r["name"]): row["name"] for row in json.loads(proc.stdout) for r in row["registers"]
    }
    assert registers == {
        ("gating", "topk"): "scaler_wizard.plugins.gating",
        ("gating", "switch"): "scaler_wizard.plugins.gating",
        ("head", "linear"): "scaler_wizard.plugins.heads",
        ("head", "multilabel"): "scaler_wizard.plugins.heads",
        ("strategy", "lora"): "scaler_wizard.plugins.lora",
        ("strategy", "peft-lora"): "scaler_wizard.plugins.peft_lora",
        ("strategy", "attn-mlp"): "scaler_wizard.plugins.token_tail",
        ("strategy", "attn-mix"): "scaler_wizard.plugins.token_tail",
        ("store", "file"): "scaler_wizard.plugins.stores",
        ("store", "hf"): "scaler_wizard.plugins.stores",
    }
