"""Built-in branch strategy plugin ``attn-mlp``: attention pooling over the trunk's token states
plus an MLP, trained on cached token states (issue 12).

Registration only: the adapter lives in :mod:`scaler_wizard.plugins.attn_mlp` and is imported
when the hook is called, so loading the plugin costs nothing.
"""

from __future__ import annotations

from typing import Any

from scaler_wizard import hookimpl


@hookimpl
def register_branch_strategies(register: Any) -> None:
    from scaler_wizard.plugins.attn_mlp import AttentionMLP, AttnMLPConfig

    register("attn-mlp", AttentionMLP, config=AttnMLPConfig)
