"""Root ``scaler`` app: global options, sub-apps, and the one place errors become one line."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer

from scaler_wizard.cli import (
    branch_commands,
    consolidate_command,
    diff_command,
    distill_command,
    eval_command,
    expand_command,
    experts_command,
    export_command,
    hub_commands,
    inspect_command,
    model_commands,
    plugin_commands,
    predict_command,
    serve_command,
    teacher_commands,
    train_command,
)
from scaler_wizard.cli.state import STATE, err
from scaler_wizard.version import __version__

app = typer.Typer(
    name="scaler",
    help="Grow one frozen encoder into many tasks: compose, branch, predict, version.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scaler-wizard {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    store: Annotated[
        str | None,  # the raw text: typer would turn "" into Path("."), the current folder
        typer.Option(
            "--store",
            envvar="SCALER_HOME",
            help="Store folder (default ./scaler-store); may also follow the command.",
            show_default=False,
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks on errors (may also follow the command).")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="A plugin that fails to load is an error, not a warning (for plugin authors; "
            "same as SCALER_STRICT_PLUGINS=1).",
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    STATE.store = store
    STATE.debug = debug
    if strict:  # main() already applied it before loading plugins; this covers in-process callers
        from scaler_wizard.plugin_manager import set_strict

        set_strict(True)


model_commands.register(app)
diff_command.register(app)
predict_command.register(app)
eval_command.register(app)
plugin_commands.register(app)
hub_commands.register(app)
train_command.register(app)
distill_command.register(app)
serve_command.register(app)
inspect_command.register(app)
export_command.register(app)
expand_command.register(app)
experts_command.register(app)
consolidate_command.register(app)
app.add_typer(branch_commands.branch_app, name="branch")
app.add_typer(teacher_commands.teacher_app, name="teacher")

_plugins_added = False


def _add_plugin_commands() -> None:
    """Let plugins add commands (``register_commands(cli)``); a failure costs only that plugin."""
    global _plugins_added
    if _plugins_added:
        return
    _plugins_added = True
    from scaler_wizard.errors import PluginError
    from scaler_wizard.plugin_manager import get_plugin_manager, strict_mode

    pm = get_plugin_manager()
    for impl in pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=app)
        except Exception as exc:
            message = f"plugin {impl.plugin_name!r} failed to add commands: {exc}".splitlines()[0]
            if strict_mode():
                raise PluginError(message) from exc
            err.print(f"warning: {message}", markup=False)


#: root options that take a value (so the value is not mistaken for the command name)
_ROOT_OPTIONS_WITH_VALUE = ("--store",)


def _root_flag(args: list[str], flag: str) -> bool:
    """Whether a root option such as ``--strict`` comes before the command name.

    Plugins must load before the command line is parsed (they may add commands), so an
    option that changes how they load is looked for here first.
    """
    words = iter(args)
    for word in words:
        if word == flag:
            return True
        if word in _ROOT_OPTIONS_WITH_VALUE:
            next(words, None)
        elif not word.startswith("-"):
            return False
    return False


#: root options that may also be written after the command (``scaler predict demo --store S``)
_GLOBAL_FLAGS = ("--debug", "--strict")


def hoist_global_options(args: list[str], own_options: Callable[[], set[str]] | None = None) -> list[str]:
    """Move ``--store PATH`` / ``--store=PATH`` / ``--debug`` / ``--strict`` from anywhere on the
    command line to the front, where the root app reads them; nothing after ``--`` moves.

    ``own_options()`` (asked only when there is something to move) gives the option names the
    command being run declares itself: a plugin command with its own ``--store`` keeps it."""
    hoisted: list[str] = []
    rest: list[str] = []
    mine: set[str] | None = None
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            rest += args[i:]
            break
        name = word.split("=", 1)[0]
        movable = (word in _ROOT_OPTIONS_WITH_VALUE and i + 1 < len(args)) or (
            word in _GLOBAL_FLAGS or any(word.startswith(o + "=") for o in _ROOT_OPTIONS_WITH_VALUE)
        )
        if movable and any(not w.startswith("-") for w in rest):  # after the command's name
            if mine is None:
                mine = own_options() if own_options is not None else set()
            movable = name not in mine
        if not movable:
            rest.append(word)
        elif word in _ROOT_OPTIONS_WITH_VALUE:
            hoisted += args[i : i + 2]
            i += 1
        else:
            hoisted.append(word)
        i += 1
    return hoisted + rest


def command_options(group: Any, args: list[str]) -> set[str]:
    """The option names of the (sub)command ``args`` names in the click ``group`` (empty if none).
    Duck-typed: typer may bring a click of its own."""
    command: Any = group
    words = iter(args)
    for word in words:
        if not hasattr(command, "commands"):  # a leaf command
            break
        if word in _ROOT_OPTIONS_WITH_VALUE:
            next(words, None)
        elif not word.startswith("-"):
            command = command.commands.get(word)
    if command is None or hasattr(command, "commands"):
        return set()
    return _option_names(command)


def _option_names(command: Any) -> set[str]:
    """Every option name a click command declares (``--store``, ``-s``, ``--no-x``...)."""
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


#: what every command's ``--help`` ends with: the root's options, which may follow the command
GLOBAL_OPTIONS_EPILOG = (
    "Global options, before or after the command: --store PATH (default ./scaler-store or "
    "$SCALER_HOME), --debug (tracebacks), --strict (a plugin that fails to load is an error)."
)


def with_global_options_epilog(group: Any) -> None:
    """Let each command's ``--help`` name the root's options (``hoist_global_options`` accepts
    them after the command), except where the command declares an option of that name."""
    for command in getattr(group, "commands", {}).values():
        if hasattr(command, "commands"):
            with_global_options_epilog(command)
            continue
        own = _option_names(command)
        if not own & {*_ROOT_OPTIONS_WITH_VALUE, *_GLOBAL_FLAGS} and not command.epilog:
            command.epilog = GLOBAL_OPTIONS_EPILOG


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from scaler_wizard.errors import ScalerError

    given = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in given or os.environ.get("SCALER_DEBUG") not in (None, "", "0")
    try:
        if _root_flag(hoist_global_options(given), "--strict"):
            from scaler_wizard.plugin_manager import set_strict

            set_strict(True)
        _add_plugin_commands()  # before hoisting: a plugin command may own an option of that name
        command = typer.main.get_command(app)
        args = hoist_global_options(given, lambda: command_options(command, given))
        with_global_options_epilog(command)
        command(args=args, prog_name="scaler", standalone_mode=True)
    except ScalerError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"error: {exc}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err.print(
            f"error: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
            markup=False,
        )
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
