"""Scaler Wizard: grow one frozen encoder into many tasks.

Public API (what plugins and users may import)::

    from scaler_wizard import hookimpl, compose, save_version, init_model, ContentStore
    from scaler_wizard.moe import Gating, Routing          # gating plugins
    from scaler_wizard.branch import BranchAdapter, Head   # strategy and head plugins

The root is thin: ``import scaler_wizard`` loads only the hook markers (pluggy). Everything
else (the version, torch, the store, the plugin manager) is imported on first use of its name
(PEP 562), so ``scaler --help`` and the byte store never pay for the runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from scaler_wizard.hookspecs import HOOKSPEC_VERSION, hookimpl, hookspec

if TYPE_CHECKING:
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, new_trunk_layer, save_version
    from scaler_wizard.modeling.tensor_banks import encode_bank, load_bank_tensors
    from scaler_wizard.plugin_manager import get_plugin_manager, get_registry
    from scaler_wizard.remote import HubRepo
    from scaler_wizard.version import __version__

#: public name -> the module that defines it (imported when the name is first used)
_LAZY: dict[str, str] = {
    "__version__": "scaler_wizard.version",  # importlib.metadata: not free either
    "compose": "scaler_wizard.modeling.compose",
    "init_model": "scaler_wizard.modeling.compose",
    "new_branch": "scaler_wizard.modeling.compose",
    "new_trunk_layer": "scaler_wizard.modeling.compose",
    "save_version": "scaler_wizard.modeling.compose",
    "encode_bank": "scaler_wizard.modeling.tensor_banks",
    "load_bank_tensors": "scaler_wizard.modeling.tensor_banks",
    "ContentStore": "scaler_wizard.banks",
    "HubRepo": "scaler_wizard.remote",
    "get_plugin_manager": "scaler_wizard.plugin_manager",
    "get_registry": "scaler_wizard.plugin_manager",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'scaler_wizard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "HOOKSPEC_VERSION",
    "ContentStore",
    "HubRepo",
    "__version__",
    "compose",
    "encode_bank",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "hookspec",
    "init_model",
    "load_bank_tensors",
    "new_branch",
    "new_trunk_layer",
    "save_version",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
