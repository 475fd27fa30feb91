"""Manifest limits and the inputs of a change (issue 10 #7, #8, #9).

* #7: ``provider.distribution`` is a PEP 508 name and nothing else, in the schema and where
  the "install ..." hint is printed;
* #8: schema bounds on every size, an integer range and a depth / size limit for manifests
  read from the store or the Hub: one-line errors, never Overflow or RecursionError;
* #9: RFC 3339 ``created``, names Windows reserves, branch names with '.', labels too long,
  all refused before any training; ``branch list``, ``branch show`` and ``history`` validate
  the manifest before reading it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import run_scaler

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.store import validate_name
from scaler_wizard.errors import ManifestError, PluginError, ScalerError
from scaler_wizard.manifests import validate_manifest
from scaler_wizard.manifests import validation as validation_module
from scaler_wizard.manifests.validation import is_rfc3339, parse_manifest_bytes
from scaler_wizard.modeling.compose import compose
from scaler_wizard.plugin_manager import get_registry, install_hint

Manifest = dict[str, Any]


def head_of(store: ContentStore) -> Manifest:
    return copy.deepcopy(store.get_manifest(store.resolve("demo")))


def install(store: ContentStore, manifest: Any) -> BankHash:
    with store.lock():
        h = store.put_manifest(manifest)
        store.set_ref("demo", h, expected=store.get_ref("demo"), reason="test")
    return h


def one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert isinstance(exc, ScalerError), f"{type(exc).__name__}: {msg}"
    assert msg and "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def cli_error(proc: Any, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def in_process(argv: list[str], store: ContentStore, monkeypatch: Any, capsys: Any) -> tuple[int, str, str]:
    from scaler_wizard.cli.app import main

    monkeypatch.setenv("SCALER_HOME", str(store.root))
    monkeypatch.delenv("SCALER_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


# -- #7 the install hint -------------------------------------------------------------------------

HOSTILE_DISTRIBUTIONS = [
    "legit-plugin --index-url http://evil.example/simple",
    "legit-plugin>=1.0",
    "legit-plugin @ https://evil.example/x.whl",
    "legit-plugin; os_name == 'nt'",
    "legit-plugin[extra]",
    "-e git+https://evil.example/x",
    "legit plugin",
    "legit-plugin\n",
    "`rm -rf ~`",
]


@pytest.mark.parametrize("dist", HOSTILE_DISTRIBUTIONS)
def test_provider_distribution_must_be_a_pep508_name(store: ContentStore, dist: str) -> None:
    m = head_of(store)
    m["branches"]["spam"]["strategy"]["provider"]["distribution"] = dist
    with pytest.raises(ManifestError) as info:
        validate_manifest(m)
    msg = one_line(info.value, "branches.spam.strategy.provider.distribution", "distribution name")
    assert "install" not in msg
    assert install_hint(dist, "1.0") == "; its manifest names no valid distribution to install"


def test_a_missing_plugin_names_its_distribution(store: ContentStore, monkeypatch: Any, capsys: Any) -> None:
    m = head_of(store)
    m["branches"]["spam"]["head"] = {
        "plugin": "fancy-head",
        "config": {},
        "provider": {"distribution": "legit-plugin", "version": "1.0"},
    }
    install(store, m)
    with pytest.raises(PluginError) as info:
        compose(store, "demo")
    one_line(info.value, "branches.spam.head.plugin", "install `legit-plugin>=1.0`")
    assert install_hint("legit-plugin", "1.0 --pre") == "; install `legit-plugin`"
    code, _out, err = in_process(["show", "demo"], store, monkeypatch, capsys)
    assert code == 0, err  # show needs no plugin


def test_registry_get_prints_no_hostile_hint() -> None:
    """The check is also where the hint is printed, for a manifest that bypassed the schema."""
    provider = {"distribution": HOSTILE_DISTRIBUTIONS[0], "version": "1.0"}
    with pytest.raises(PluginError) as info:
        get_registry().get("head", "fancy-head", provider=provider, where="x")
    msg = one_line(info.value, "not installed")
    assert "index-url" not in msg and "evil" not in msg


# -- #8 sizes, integers, depth -------------------------------------------------------------------


def nested(depth: int) -> str:
    return '{"a": ' * depth + "{}" + "}" * depth


#: (path, JSON text of the value, field the error names)
OUT_OF_RANGE = [
    (("trunk", "layers", 0, "expert_hidden"), "9223372036854775808", "trunk.layers[0].expert_hidden"),
    (("trunk", "layers", 0, "expert_hidden"), str(2**21), "trunk.layers[0].expert_hidden"),
    (("trunk", "layers", 0, "num_experts"), str(2**40), "trunk.layers[0].num_experts"),
    (("trunk", "hidden_size"), str(2**31), "trunk.hidden_size"),
    (("base", "hidden_size"), str(10**7), "base.hidden_size"),
    (("version",), str(2**63), "version"),
    (("trunk", "layers", 0, "gating", "config", "k"), str(2**64), "trunk.layers[0].gating.config.k"),
    (("branches", "spam", "strategy", "config", "rank"), str(-(2**70)), "branches.spam.strategy.config.rank"),
    (("branches", "spam", "metrics"), '{"eval_rows": 1e400}', "branches.spam.metrics.eval_rows"),
    (("branches", "spam", "metrics"), '{"rows": ' + str(10**30) + "}", "branches.spam.metrics.rows"),
    (("branches", "spam", "provenance"), nested(1000), "nested deeper than 64"),
    (("branches", "spam", "provenance"), nested(100), "branches.spam.provenance.a..."),
    (("branches", "spam", "metrics"), nested(70), "branches.spam.metrics"),
    (("branches", "spam", "metrics"), '{"accuracy": NaN}', "branches.spam.metrics.accuracy"),
    (("branches", "spam", "metrics"), '{"a\\nb": 1e400}', "branches.spam.metrics.'a\\nb'"),
]


def with_value(m: Manifest, path: tuple[Any, ...], text: str) -> bytes:
    """``m`` as JSON bytes with the value at ``path`` replaced by the raw JSON ``text``."""
    obj: Any = m
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = "@@VALUE@@"
    return json.dumps(m).replace('"@@VALUE@@"', text).encode()


def set_path(m: Manifest, path: tuple[Any, ...], value: Any) -> Manifest:
    obj: Any = m
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    return m


@pytest.mark.parametrize("path,text,field", OUT_OF_RANGE, ids=[f for _, _, f in OUT_OF_RANGE])
def test_sizes_integers_and_depth_are_bounded(
    store: ContentStore, path: tuple[Any, ...], text: str, field: str
) -> None:
    raw = with_value(head_of(store), path, text)
    with pytest.raises(ManifestError) as info:
        validate_manifest(parse_manifest_bytes(raw))
    one_line(info.value, field)
    # The same manifest stored (as a hostile writer or a pull would): every reader refuses it.
    h = BankHash.of_bytes(raw)
    store.manifest_path(h).write_bytes(raw)
    install_ref(store, h)
    with pytest.raises(ScalerError) as info:
        compose(store, "demo")
    one_line(info.value)


def install_ref(store: ContentStore, h: BankHash) -> None:
    with store.lock():
        store.set_ref("demo", h, expected=store.get_ref("demo"), reason="test")


@pytest.mark.parametrize(
    "raw,needle",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b'{"a": ' * 5_000 + b"1" + b"}" * 5_000, "nested deeper"),
        (b'{"version": 1e999}', "not a JSON number"),
        (b'{"version": NaN}', "not a JSON number"),
        (b"\xff\xfe{}", "not JSON"),
    ],
    ids=["deep-list", "deep-object", "infinity", "nan", "not-utf8"],
)
def test_manifest_bytes_are_parsed_within_limits(raw: bytes, needle: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest_bytes(raw, "manifest x")
    one_line(info.value, needle)


def test_the_store_and_the_hub_parse_within_limits(store: ContentStore, monkeypatch: Any) -> None:
    from scaler_wizard.remote.sync import _parse_manifest

    raw = b"[" * 100_000 + b"]" * 100_000
    h = BankHash.of_bytes(raw)
    store.manifest_path(h).write_bytes(raw)
    with pytest.raises(ManifestError, match="nested deeper"):
        store.get_manifest(h)
    with pytest.raises(ManifestError, match="nested deeper"):
        _parse_manifest(raw, "repo@main: manifest.json")
    monkeypatch.setattr(validation_module, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ManifestError, match="larger than"):
        store.get_manifest(store.resolve("demo"))
    with pytest.raises(ManifestError, match="larger than"):
        _parse_manifest(store.manifest_path(store.resolve("demo")).read_bytes(), "repo@main: manifest.json")


@pytest.mark.slow
def test_the_cli_gives_one_line_for_oversize_values(store: ContentStore, store_path: Path) -> None:
    env = dict(os.environ, SCALER_HOME=str(store_path), HF_HUB_OFFLINE="1")
    env.pop("SCALER_DEBUG", None)
    good = head_of(store)
    install(
        store, set_path(copy.deepcopy(good), ("trunk", "layers", 0, "expert_hidden"), 9223372036854775808)
    )
    cli_error(run_scaler("predict", "demo", "-b", "spam", "hello", env=env), "trunk.layers[0].expert_hidden")
    raw = with_value(good, ("branches", "spam", "provenance"), nested(1000))
    h = BankHash.of_bytes(raw)
    store.manifest_path(h).write_bytes(raw)
    install_ref(store, h)
    for argv in (["show", "demo"], ["history", "demo"], ["branch", "list", "demo"]):
        cli_error(run_scaler(*argv, env=env), "nested deeper")


# -- #9 timestamps, names, labels --------------------------------------------------------------


@pytest.mark.parametrize(
    "created",
    [
        "2026-13-01T00:00:00Z",
        "2026-00-10T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2025-02-29T00:00:00Z",
        "2026-04-31T12:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T12:60:00Z",
        "2026-01-01T12:00:61Z",
        "2026-01-01T12:00:00+24:00",
        "2026-01-01 12:00:00Z",
    ],
)
def test_created_must_be_a_real_rfc3339_time(store: ContentStore, created: str) -> None:
    m = head_of(store)
    m["created"] = created
    with pytest.raises(ManifestError) as info:
        validate_manifest(m)
    one_line(info.value, "created", "RFC 3339")


def test_real_rfc3339_times_pass() -> None:
    for ok in ("2024-02-29T23:59:60Z", "2026-12-31T00:00:00.123456+05:30", "2026-01-01t00:00:00z"):
        assert is_rfc3339(ok), ok


RESERVED = [
    "con",
    "CON",
    "Con",
    "NUL",
    "nul",
    "aux",
    "PRN",
    "com1",
    "COM9",
    "lpt1",
    "LPT9",
    "con.txt",
    "nul.tar.gz",
]


@pytest.mark.parametrize("name", RESERVED)
def test_names_windows_reserves_are_refused(store: ContentStore, name: str) -> None:
    m = head_of(store)
    m["branches"][name] = m["branches"].pop("spam")
    with pytest.raises(ManifestError) as info:
        validate_manifest(m)
    one_line(info.value, "Windows reserves")
    m = head_of(store)
    m["name"] = name
    with pytest.raises(ManifestError, match="Windows reserves"):
        validate_manifest(m)
    for what in ("model", "branch"):
        with pytest.raises(ScalerError, match="Windows reserves"):
            validate_name(name, what=what)


@pytest.mark.parametrize("name", ["a.b", "spam.v2", "x."])
def test_branch_names_with_a_dot_are_refused(store: ContentStore, name: str) -> None:
    m = head_of(store)
    m["branches"][name] = m["branches"].pop("spam")
    with pytest.raises(ManifestError) as info:
        validate_manifest(m)
    one_line(info.value, "branches", repr(name))
    with pytest.raises(ScalerError, match="invalid branch name"):
        validate_name(name, what="branch")


def test_names_that_are_fine_still_pass() -> None:
    for name in ("console", "nullable", "com", "com10", "lpt", "a.b", "demo-2", "auxiliary"):
        assert validate_name(name) == name
    for name in ("console", "com10", "my_branch", "spam-2"):
        assert validate_name(name, what="branch") == name


def write_data(path: Path, long_label: str) -> Path:
    rows = ["text,label"]
    for i in range(12):
        rows.append(f"message number {i} is fine,ham")
        rows.append(f"WIN a prize number {i} now,{long_label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_an_invalid_branch_is_refused_before_training(
    store: ContentStore, tmp_path: Path, monkeypatch: Any
) -> None:
    """A label of 1,001 characters fails the schema: refused before features or training start."""
    import scaler_wizard.training.branch_add as branch_add

    def must_not_run(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("training started for a branch that cannot be saved")

    monkeypatch.setattr(branch_add, "train_branch", must_not_run)
    monkeypatch.setattr(branch_add, "cached_features", must_not_run)
    monkeypatch.setattr(branch_add, "compose", must_not_run)
    data = branch_add.DataSpec(write_data(tmp_path / "long.csv", "s" * 1001))
    with pytest.raises(ManifestError) as info:
        branch_add.add_branch(store, "demo", "spammy", data)
    one_line(info.value, "branches.spammy.labels", "before training")
    with pytest.raises(ManifestError) as info:
        branch_add.add_branch(
            store, "demo", "x", data, head_config={"dropout": 0.5}, strategy_config={"rank": 2**60}
        )
    one_line(info.value, "branches.x")
    for bad in ("a.b", "con", "NUL"):
        with pytest.raises(ScalerError, match="invalid branch name"):
            branch_add.add_branch(store, "demo", bad, branch_add.DataSpec(tmp_path / "long.csv"))


@pytest.mark.slow
def test_the_cli_refuses_a_bad_branch_before_training(store_path: Path, tmp_path: Path) -> None:
    env = dict(os.environ, SCALER_HOME=str(store_path), HF_HUB_OFFLINE="1")
    env.pop("SCALER_DEBUG", None)
    data = write_data(tmp_path / "long.csv", "s" * 1001)
    cli_error(run_scaler("branch", "add", "demo", "longlabel", "--data", str(data), env=env), "labels")
    ok = write_data(tmp_path / "ok.csv", "spam")
    cli_error(run_scaler("branch", "add", "demo", "a.b", "--data", str(ok), env=env), "invalid branch name")
    assert not (store_path / "runs").exists()


# -- readers validate ----------------------------------------------------------------------------

READER_MUTANTS = {
    "strategy-dropped": lambda m: m["branches"]["spam"].pop("strategy"),
    "branches-a-list": lambda m: m.update(branches=[1, 2]),
    "labels-a-string": lambda m: m["branches"]["spam"].update(labels="ham"),
    "version-a-string": lambda m: m.update(version="2"),
    "head-plugin-null": lambda m: m["branches"]["spam"]["head"].update(plugin=None),
}


@pytest.mark.parametrize("mutant", list(READER_MUTANTS))
@pytest.mark.parametrize(
    "argv",
    [
        ["branch", "list", "demo"],
        ["branch", "list", "demo", "--json"],
        ["branch", "show", "demo", "spam"],
        ["history", "demo"],
        ["history", "demo", "--json"],
    ],
    ids=["list", "list-json", "show", "history", "history-json"],
)
def test_readers_validate_the_manifest(
    store: ContentStore, mutant: str, argv: list[str], monkeypatch: Any, capsys: Any
) -> None:
    m = head_of(store)
    READER_MUTANTS[mutant](m)
    install(store, m)
    code, out, err = in_process(argv, store, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and out == "", (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: invalid manifest"), err
    assert "internal error" not in err
