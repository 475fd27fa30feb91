"""Built-in branch strategy ``peft-lora``: LoRA inside the base encoder's attention, via PEFT.

More accurate than the pooled adapter (it changes what the encoder computes) and costs one
more base + trunk pass per branch at prediction. Its bank is a stock PEFT adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
loads on the plain base model. The base encoder loads it itself, through allow-lists (plain
LoRA only, safetensors only, nothing that touches the shared base).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from scaler_wizard import hookimpl
from scaler_wizard.branch import BranchAdapter, TrunkOutput


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


class PeftLoRA(BranchAdapter):
    needs_base_pass = True
    bank_format = "folder"
    bank_layout = "peft"

    def __init__(self, config: PeftLoRAConfig, *, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.out_features = hidden_size
        self._params: list[nn.Parameter] = []

    def lora_args(self) -> dict[str, Any]:
        """The LoraConfig arguments this branch's config stands for (and its bank must state)."""
        return {
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": list(self.config.target_modules),
        }

    def forward(self, trunk: TrunkOutput) -> Tensor:
        return trunk.pooled  # the adaptation happened inside the encoder, in this branch's own pass

    def attach(self, base: Any, branch: str) -> None:
        try:
            # plain settings, not a LoraConfig: the base checks them against the same allow-list
            # as the bank loader (refused now, not after training) and builds the config itself
            base.add_peft_adapter(branch, self.lora_args())
        except ValueError as exc:  # PEFT: target modules not found in the base model
            raise ValueError(f"peft-lora cannot adapt this base: {str(exc).splitlines()[0]}") from exc

    def detach(self, base: Any, branch: str) -> None:
        base.delete_peft_adapter(branch)

    def export_folder(self, base: Any, branch: str, dest: Path, *, base_name: str) -> Path:
        folder: Path = base.save_peft_adapter(branch, dest, base_name=base_name)
        return folder

    def import_folder(self, base: Any, branch: str, folder: Path) -> None:
        # Loaded through scaler_wizard.modeling.peft_safety's allow-lists (never PEFT's .bin fallback);
        # the folder's own LoRA settings must be the ones the manifest's strategy entry states.
        base.load_peft_adapter(branch, folder, expect=self.lora_args())

    def trainable_parameters(self, base: Any, branch: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = base.peft_parameters(branch)
        return params


@hookimpl
def register_branch_strategies(register: Any) -> None:
    register("peft-lora", PeftLoRA, config=PeftLoRAConfig)
