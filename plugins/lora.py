"""Built-in branch strategy plugin ``lora``: a low-rank adapter on the pooled trunk output.

Registration only: the adapter lives in :mod:`scaler_wizard.plugins.pooled_lora` and is
imported when the hook is called, so loading the plugin costs nothing.
"""

from __future__ import annotations

from typing import Any

from scaler_wizard import hookimpl


@hookimpl
def register_branch_strategies(register: Any) -> None:
    from scaler_wizard.plugins.pooled_lora import LoRAConfig, PooledLoRA

    register("lora", PooledLoRA, config=LoRAConfig)
