"""Scaler Wizard: grow one frozen encoder into many tasks.

Public API (what plugins and users may import)::

    from scaler_wizard import hookimpl, compose, save_version, init_model, ContentStore
    from scaler_wizard.moe import Gating, Routing          # gating plugins
    from scaler_wizard.branch import BranchAdapter, Head   # strategy and head plugins
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaler_wizard.hookspecs import HOOKSPEC_VERSION, hookimpl, hookspec

# Imported eagerly: a lazy ``compose`` would be shadowed by the submodule of the same name
# as soon as anything imported ``scaler_wizard.modeling.compose``.
from scaler_wizard.modeling.compose import compose, init_model, new_branch, new_trunk_layer, save_version
from scaler_wizard.version import __version__

if TYPE_CHECKING:
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.plugin_manager import get_plugin_manager, get_registry

_LAZY = {
    "ContentStore": "scaler_wizard.banks",
    "get_plugin_manager": "scaler_wizard.plugin_manager",
    "get_registry": "scaler_wizard.plugin_manager",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scaler_wizard' has no attribute {name!r}")


__all__ = [
    "HOOKSPEC_VERSION",
    "ContentStore",
    "__version__",
    "compose",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "hookspec",
    "init_model",
    "new_branch",
    "new_trunk_layer",
    "save_version",
]
