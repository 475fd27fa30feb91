"""Built-in branch strategy ``peft-lora``: LoRA inside the base encoder's attention, via PEFT.

More accurate than the pooled adapter (it changes what the encoder computes) and costs one
more base + trunk pass per branch at prediction. Its bank is a stock PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
loads on the plain base model; this plugin loads it itself, through allow-lists (plain LoRA
only, safetensors only, nothing that touches the shared base: ``peft_safety``).

This module only registers the strategy and must stay cheap to import (no torch, no PEFT):
the implementation (``peft_impl``) works through the public encoder-host protocol
(``scaler_wizard.encoder_host``) and is imported when the hook runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scaler_wizard import hookimpl


@dataclass
class PeftLoRAConfig:
    """LoRA on the encoder's attention projections (PEFT's LoraConfig)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r", "minimum": 1})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling alpha/r)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout", "minimum": 0, "maximum": 1})
    target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={"help": "module names to adapt (BERT-style: query, key, value, dense)", "minItems": 1},
    )


@hookimpl
def register_branch_strategies(register: Any) -> None:
    from scaler_wizard.plugins.peft_impl import PeftLoRA

    register("peft-lora", PeftLoRA, config=PeftLoRAConfig)
