"""scaler-wizard-extras: one plugin that uses every scaler-wizard hook.

Found by ``scaler`` through the ``scaler_wizard`` entry-point group (see pyproject.toml).
It registers gating ``expert-choice``, head ``cosine``, branch strategy ``bottleneck``,
store backend ``tmp`` and the command ``scaler expert-usage``.

The hooks import their implementations when called, so that loading the plugin (which
``scaler --help`` does) costs nothing.
"""

from __future__ import annotations

from typing import Any

from scaler_wizard import hookimpl

__version__ = "0.2.0"

#: The scaler-wizard hook API versions this plugin was written for. A scaler-wizard whose
#: API is outside this range refuses to load the plugin (with a message) instead of
#: letting it break at call time.
scaler_wizard_api = ">=1,<2"


@hookimpl
def register_gating(register: Any) -> None:
    from scaler_wizard_extras.expert_choice import ExpertChoiceConfig, ExpertChoiceGating

    register("expert-choice", ExpertChoiceGating, config=ExpertChoiceConfig)


@hookimpl
def register_heads(register: Any) -> None:
    from scaler_wizard_extras.cosine_head import CosineHead, CosineHeadConfig

    register("cosine", CosineHead, config=CosineHeadConfig)


@hookimpl
def register_branch_strategies(register: Any) -> None:
    from scaler_wizard_extras.bottleneck import BottleneckAdapter, BottleneckConfig

    register("bottleneck", BottleneckAdapter, config=BottleneckConfig)


@hookimpl
def register_stores(register: Any) -> None:
    from scaler_wizard_extras.tmp_store import open_tmp_store

    register("tmp", open_tmp_store)


@hookimpl
def register_commands(cli: Any) -> None:
    from scaler_wizard_extras.commands import expert_usage

    cli.command("expert-usage")(expert_usage)
