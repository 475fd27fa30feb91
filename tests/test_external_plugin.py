"""Third-party plugins end to end, through the real ``scaler`` binary.

* The example distribution ``examples/plugins/scaler-wizard-extras`` is pip-installed into
  this venv (and uninstalled at teardown): ``scaler plugins`` lists it, a model using its
  gating, strategy and head trains, saves and composes again in a new process, and once it
  is uninstalled loading that model names the distribution to install.
* Throwaway distributions (a module and a ``.dist-info`` folder on PYTHONPATH, no pip):
  one that raises on import, one that registers a taken name, one with a config that no
  manifest can hold; each gives its one-line message, and ``--strict`` makes a load
  failure an error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DATA, REPO, run_scaler
from filelock import FileLock

from scaler_wizard.banks import ContentStore

EXTRAS_SRC = REPO / "examples" / "plugins" / "scaler-wizard-extras"
EXTRAS_DIST, EXTRAS_VERSION, EXTRAS_EP = "scaler-wizard-extras", "0.2.0", "extras"
SPAM = DATA / "samples" / "sms_spam_small.csv"


def _env(tmp: Path, plugins: str, **extra: str) -> dict[str, str]:
    """The environment of a ``scaler`` run that loads exactly the entry points ``plugins``."""
    env = {k: v for k, v in os.environ.items() if k not in ("SCALER_DEBUG", "SCALER_STRICT_PLUGINS")}
    env.update(
        SCALER_PLUGINS=plugins,
        SCALER_HOME=str(tmp / "store"),
        HF_HUB_OFFLINE="1",
        PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="200",  # tables unwrapped
    )
    env.update(extra)
    return env


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- throwaway distributions -------------------------------------------------------------


def make_distribution(site: Path, dist: str, module: str, source: str, *, version: str = "0.1.0") -> None:
    """Make ``dist`` importable from ``site`` with a ``scaler_wizard`` entry point named ``module``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[scaler_wizard]\n{module} = {module}\n")


RAISES_ON_IMPORT = 'raise RuntimeError("boom [at import]")\n'
WORKS = """
    from scaler_wizard import hookimpl

    @hookimpl
    def register_heads(register):
        register("constant", lambda config, *, in_features, labels: None)
"""
FAILS_TO_ADD_COMMANDS = """
    from scaler_wizard import hookimpl

    @hookimpl
    def register_commands(cli):
        raise ValueError("no commands today")
"""
NEEDS_API_2 = """
    from scaler_wizard import hookimpl

    scaler_wizard_api = ">=2,<3"

    @hookimpl
    def register_gating(register):
        register("future", object)
"""
DUPLICATE = """
    from scaler_wizard import hookimpl

    @hookimpl
    def register_gating(register):
        register("topk", object)
"""
UNSTORABLE_CONFIG = """
    from dataclasses import dataclass, field

    from scaler_wizard import hookimpl

    @dataclass
    class OddConfig:
        seen: set[int] = field(default_factory=set)

    @hookimpl
    def register_heads(register):
        register("odd", object, config=OddConfig)
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    make_distribution(site, "scaler-broken", "broken", RAISES_ON_IMPORT)
    make_distribution(site, "scaler-works", "works", WORKS)
    make_distribution(site, "scaler-nocommands", "nocommands", FAILS_TO_ADD_COMMANDS)
    make_distribution(site, "scaler-future", "future", NEEDS_API_2, version="2.0.0")
    make_distribution(site, "scaler-dupe", "dupe", DUPLICATE)
    make_distribution(site, "scaler-odd", "odd", UNSTORABLE_CONFIG)
    return site


BROKEN_LOAD = "plugin 'broken' (scaler-broken 0.1.0) failed to load"


def test_a_plugin_that_raises_on_import_is_skipped_with_one_warning(tmp_path: Path, site: Path) -> None:
    env = _env(tmp_path, "broken,works,nocommands", PYTHONPATH=str(site))
    warnings = [
        f"warning: {BROKEN_LOAD} and is skipped: RuntimeError: boom [at import]",
        "warning: plugin 'nocommands' failed to add commands: no commands today",
    ]

    r = run_scaler("--help", env=env)
    assert r.returncode == 0, r.stderr
    assert "plugins" in r.stdout and _lines(r.stderr) == warnings

    r = run_scaler("plugins", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert _lines(r.stderr) == warnings  # once each, however many times plugins are used
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["broken"] == {
        "name": "broken",
        "distribution": "scaler-broken",
        "version": "0.1.0",
        "hooks": [],
        "registers": [],
        "error": "RuntimeError: boom [at import]",
    }
    assert [reg["name"] for reg in rows["works"]["registers"]] == ["constant"]
    assert rows["works"]["distribution"] == "scaler-works"
    assert {"topk", "linear", "lora", "file"} <= {
        reg["name"] for row in rows.values() for reg in row["registers"]
    }

    r = run_scaler("plugins", env=env)
    assert r.returncode == 0, r.stderr
    assert "failed to load: RuntimeError: boom [at import]" in r.stdout  # not eaten as markup


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [
        (["--strict", "plugins"], {}),
        (["--help"], {"SCALER_STRICT_PLUGINS": "1"}),
    ],
    ids=["flag", "env"],
)
def test_strict_makes_a_load_failure_an_error(
    tmp_path: Path, site: Path, args: list[str], extra_env: dict[str, str]
) -> None:
    env = _env(tmp_path, "broken,works", PYTHONPATH=str(site), **extra_env)
    r = run_scaler(*args, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert _lines(r.stderr) == [f"error: {BROKEN_LOAD}: RuntimeError: boom [at import]"]


def test_strict_applies_even_after_plugins_were_loaded(
    site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process callers (CliRunner, notebooks) may load plugins before parsing ``--strict``."""
    from typer.testing import CliRunner

    from scaler_wizard.cli.app import app
    from scaler_wizard.errors import PluginError
    from scaler_wizard.plugin_manager import get_host, reset_plugins

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SCALER_PLUGINS", "broken")
    monkeypatch.delenv("SCALER_STRICT_PLUGINS", raising=False)
    reset_plugins()
    try:
        assert [f.plugin for f in get_host().failures] == ["broken"]
        assert "warning: plugin 'broken'" in capsys.readouterr().err
        result = CliRunner().invoke(app, ["plugins", "--json"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, ["--strict", "plugins", "--json"])
        assert isinstance(result.exception, PluginError)
        assert str(result.exception) == f"{BROKEN_LOAD}: RuntimeError: boom [at import]"
    finally:
        reset_plugins()


def test_strict_with_working_plugins_changes_nothing(tmp_path: Path, site: Path) -> None:
    r = run_scaler(
        "--strict", "--store", str(tmp_path), "plugins", env=_env(tmp_path, "works", PYTHONPATH=str(site))
    )
    assert r.returncode == 0 and r.stderr == ""
    assert "constant" in r.stdout


@pytest.mark.parametrize(
    ("plugin", "code", "message"),
    [
        (
            "future",
            0,
            "warning: plugin 'future' (scaler-future 2.0.0) failed to load and is skipped: PluginError: "
            "plugin 'future' supports hook API >=2,<3, this scaler-wizard has 1.0",
        ),
        (
            "dupe",
            1,
            "error: gating 'topk' is registered twice: by plugin 'scaler_wizard.plugins.gating' "
            "(scaler-wizard) and by plugin 'dupe' (scaler-dupe); uninstall one of them",
        ),
        (
            "odd",
            1,
            "error: plugin 'odd': head 'odd' has an invalid config: "
            "config field type set[int] cannot be expressed in a manifest",
        ),
    ],
    ids=["incompatible-api", "duplicate-name", "unstorable-config"],
)
def test_a_bad_plugin_gets_a_one_line_message(
    tmp_path: Path, site: Path, plugin: str, code: int, message: str
) -> None:
    r = run_scaler("plugins", "--json", env=_env(tmp_path, plugin, PYTHONPATH=str(site)))
    assert r.returncode == code, r.stdout + r.stderr
    assert _lines(r.stderr) == [message]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--strategy-config", "{size: 16}", "not valid JSON"),
        ("--head-config", "[1]", "must be a JSON object"),
    ],
)
def test_plugin_configs_on_the_command_line_must_be_json_objects(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    from typer.testing import CliRunner

    from scaler_wizard.cli.app import app

    args = ["branch", "add", "m", "b", "--data", str(SPAM), option, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and option in result.output


# -- the example distribution, pip-installed ----------------------------------------------


class ExtrasInstall:
    """Installs the example package (a copy, so the source tree stays clean) into this venv."""

    def __init__(self, work: Path) -> None:
        self.src = work / "scaler-wizard-extras"
        shutil.copytree(
            EXTRAS_SRC, self.src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        )
        self.installed = False

    def _pip(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"

    def ensure_installed(self) -> None:
        if not self.installed:
            # Offline and fast with the venv's setuptools; else (Python >= 3.12 venvs have
            # none) pip fetches it into an isolated build environment.
            offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
            self._pip("install", "--no-deps", *offline, str(self.src))
            self.installed = True

    def uninstall(self) -> None:
        self._pip("uninstall", "-y", EXTRAS_DIST)
        self.installed = False


@pytest.fixture(scope="module")
def extras_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtrasInstall]:
    # One test session at a time may (un)install it: the venv is shared.
    with FileLock(str(Path(sys.prefix) / ".scaler-wizard-extras-test.lock")):
        install = ExtrasInstall(tmp_path_factory.mktemp("extras"))
        try:
            yield install
        finally:
            install.uninstall()


@pytest.fixture
def extras(extras_install: ExtrasInstall) -> ExtrasInstall:
    extras_install.ensure_installed()
    return extras_install


@pytest.fixture(scope="module")
def extras_model(
    extras_install: ExtrasInstall, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """A store with model ``m``: an expert-choice trunk and a branch ``spam`` (bottleneck + cosine)."""
    extras_install.ensure_installed()
    tmp = tmp_path_factory.mktemp("extras-model")
    env = _env(tmp, EXTRAS_EP)
    r = run_scaler("init", "m", "--gating", "expert-choice", "--moe-layers", "1", "--experts", "4", env=env)
    assert r.returncode == 0, r.stderr
    r = run_scaler(
        "branch", "add", "m", "spam", "--data", str(SPAM), "--strategy", "bottleneck",
        "--strategy-config", '{"size": 16}', "--head", "cosine", "--epochs", "2", "--json",
        env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return tmp, json.loads(r.stdout)


def test_scaler_plugins_lists_the_installed_distribution(tmp_path: Path, extras: ExtrasInstall) -> None:
    r = run_scaler("plugins", "--json", env=_env(tmp_path, EXTRAS_EP))
    assert r.returncode == 0, r.stderr
    (row,) = [row for row in json.loads(r.stdout) if row["name"] == EXTRAS_EP]
    assert (row["distribution"], row["version"]) == (EXTRAS_DIST, EXTRAS_VERSION)
    assert row["hooks"] == [
        "register_branch_strategies",
        "register_commands",
        "register_gating",
        "register_heads",
        "register_stores",
    ]
    registers = {(reg["kind"], reg["name"]): reg for reg in row["registers"]}
    assert set(registers) == {
        ("gating", "expert-choice"),
        ("head", "cosine"),
        ("strategy", "bottleneck"),
        ("store", "tmp"),
    }
    assert registers[("strategy", "bottleneck")]["config_schema"]["properties"]["activation"]["enum"] == [
        "relu",
        "gelu",
        "tanh",
    ]


@pytest.mark.slow
def test_the_example_package_passes_its_own_tests(extras: ExtrasInstall, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(extras.src / "tests")],
        cwd=extras.src,
        env=_env(tmp_path, EXTRAS_EP),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.slow
def test_a_model_built_on_the_plugins_trains_saves_and_composes_in_a_new_process(
    extras: ExtrasInstall, extras_model: tuple[Path, dict]
) -> None:
    tmp, summary = extras_model
    env = _env(tmp, EXTRAS_EP)
    assert summary["version"] == 2 and summary["labels"] == ["ham", "spam"]

    store = ContentStore.open(tmp / "store")
    entry = store.get_manifest(store.resolve("m"))["branches"]["spam"]
    provider = {"distribution": EXTRAS_DIST, "version": EXTRAS_VERSION}
    assert entry["strategy"] == {
        "plugin": "bottleneck",
        "config": {"size": 16, "activation": "gelu", "dropout": 0.0},
        "provider": provider,
    }
    assert entry["head"] == {
        "plugin": "cosine",
        "config": {"scale": 10.0, "learn_scale": True, "dropout": 0.0},
        "provider": provider,
    }

    r = run_scaler("predict", "m", "-b", "spam", "--json", "WINNER! Claim your free prize now", env=env)
    assert r.returncode == 0, r.stderr
    assert "spam" in r.stdout and "ham" in r.stdout

    r = run_scaler("expert-usage", "m", "--json", "Free entry! Text WIN now", "See you at lunch", env=env)
    assert r.returncode == 0, r.stderr
    (layer,) = json.loads(r.stdout)
    assert (layer["gating"], layer["num_experts"], layer["provider"]) == ("expert-choice", 4, provider)
    assert layer["config"] == {"capacity_factor": 2.0, "entropy_weight": 0.0}
    # each of the 4 experts takes c = ceil(2 * N / 4) of the N tokens: the same share each
    assert len(set(layer["load"])) == 1 and 0 < layer["load"][0] <= 1


@pytest.mark.slow
def test_a_manifest_config_the_plugin_refuses_is_a_one_line_error(
    extras: ExtrasInstall, extras_model: tuple[Path, dict]
) -> None:
    tmp, _ = extras_model
    env = _env(tmp, EXTRAS_EP)
    # A stored manifest whose entry breaks the plugin's schema (edited by hand, say).
    store = ContentStore.open(tmp / "store")
    good = store.resolve("m")
    manifest = store.get_manifest(good)
    manifest["branches"]["spam"]["strategy"]["config"]["activation"] = "swish"
    manifest.update(parent=str(good), version=manifest["version"] + 1)
    with store.lock():
        store.set_ref("m", store.put_manifest(manifest), expected=good, reason="test: invalid config")
    try:
        r = run_scaler("predict", "m", "-b", "spam", "hello", env=env)
        assert r.returncode == 1, r.stdout + r.stderr
        (line,) = _lines(r.stderr)
        assert line.startswith("error: branches.spam.strategy.config.activation: 'swish' is not one of")
    finally:
        with store.lock():
            store.set_ref("m", good, expected=store.resolve("m"), reason="test: restore")


@pytest.mark.slow
def test_without_the_distribution_loading_the_model_says_what_to_install(
    extras: ExtrasInstall, extras_model: tuple[Path, dict]
) -> None:
    tmp, _ = extras_model
    extras.uninstall()  # later tests reinstall it through the `extras` fixture
    r = run_scaler("predict", "m", "-b", "spam", "hello", env=_env(tmp, EXTRAS_EP))
    assert r.returncode == 1, r.stdout + r.stderr
    assert _lines(r.stderr) == [
        "error: trunk.layers[0].gating.plugin: gating plugin 'expert-choice' is not installed; "
        f"install `{EXTRAS_DIST}>={EXTRAS_VERSION}`"
    ]
