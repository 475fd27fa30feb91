"""Built-in branch strategy plugins ``attn-mlp`` (attention pooling over the trunk's token
states plus an MLP) and ``attn-mix`` (the same over a learned mix of the encoder's last layers),
trained on cached token states (issue 12).

Registration only: the adapter lives in :mod:`scaler_wizard.plugins.attn_mlp` and is imported
when the hook is called, so loading the plugin costs nothing.
"""

from __future__ import annotations

from typing import Any

from scaler_wizard import hookimpl


@hookimpl
def register_branch_strategies(register: Any) -> None:
    from scaler_wizard.plugins.attn_mlp import AttentionMix, AttentionMLP, AttnMixConfig, AttnMLPConfig

    register("attn-mlp", AttentionMLP, config=AttnMLPConfig)
    register("attn-mix", AttentionMix, config=AttnMixConfig)
