"""Built-in gating plugin: registers ``topk`` (noisy top-k) and ``switch`` (top-1).

Registration only: the torch modules live in :mod:`scaler_wizard.plugins.topk_gating` and are
imported when the hook is called, so loading the plugin (``scaler --help`` does) costs nothing.
"""

from __future__ import annotations

from typing import Any

from scaler_wizard import hookimpl


@hookimpl
def register_gating(register: Any) -> None:
    from scaler_wizard.plugins.topk_gating import SwitchConfig, SwitchGating, TopKConfig, TopKGating

    register("topk", TopKGating, config=TopKConfig)
    register("switch", SwitchGating, config=SwitchConfig)
