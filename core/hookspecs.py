"""The plugin hook specifications: the whole public surface a plugin implements.

Each ``register_*`` hook receives a ``register`` callable and calls it once per thing it
provides (the shape simonw/llm uses)::

    from scaler_wizard import hookimpl

    @hookimpl
    def register_gating(register):
        register("expert-choice", ExpertChoiceGating, config=ExpertChoiceConfig)
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "scaler_wizard"
ENTRY_POINT_GROUP = "scaler_wizard"
#: Version of this hook-spec API. A plugin may declare the range it supports with a
#: module/object attribute ``scaler_wizard_api = ">=1,<2"``; outside it, it is refused.
HOOKSPEC_VERSION = "1.0"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_gating(register: Any) -> None:
    """Register MoE gating (routing) strategies.

    ``register(name, factory, *, config=ConfigDataclass, description="")``; the factory is
    called as ``factory(config, hidden_size=..., num_experts=...)`` and returns a
    :class:`scaler_wizard.moe.Gating` module.
    """


@hookspec
def register_heads(register: Any) -> None:
    """Register task heads.

    ``factory(config, in_features=..., labels=[...])`` returns a :class:`scaler_wizard.branch.Head`.
    """


@hookspec
def register_branch_strategies(register: Any) -> None:
    """Register branch strategies (how a branch adapts the shared representation).

    ``factory(config, hidden_size=...)`` returns a :class:`scaler_wizard.branch.BranchAdapter`.
    """


@hookspec
def register_stores(register: Any) -> None:
    """Register bank-store backends by URL scheme.

    ``register(scheme, factory)``; ``factory(location: str)`` returns a store object for
    locations written ``scheme://...``. The local folder store is the built-in ``file``.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``scaler`` CLI; ``cli`` is the root ``typer.Typer`` app."""
