"""``scaler train --train-new-base-layers``: the base blocks ``scaler expand add-base-layer``
inserted train with the trunk; every other base weight stays frozen.

The states below the lowest inserted block never change, so they are what the run caches (the
base-state cache with enough layers below the last to hold that block's input, bound to the
base bank like any cache); each step runs that block and every block above it
(``modeling.base_blocks.run_blocks_from``, checked against the full pass before the first
step). The trained blocks are submodules of the run's module (shared with the base, not
copied), so they are in the optimizer, the checkpoints and a resume like the trunk; only they
are, never the frozen rest. The run saves the whole base as a new base bank; its config,
tokenizer, inspection and growth record stay the base's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ScalerError
from scaler_wizard.manifests.model import BaseEntry
from scaler_wizard.modeling.bank_checks import base_meta
from scaler_wizard.modeling.base_blocks import check_blocks_from, run_blocks_from, the_stack
from scaler_wizard.modeling.base_encoder import BaseEncoder
from scaler_wizard.modeling.tensor_banks import encode_bank

#: the option that asks for it (named in errors)
OPTION = "--train-new-base-layers"


def inserted_layers(entry: BaseEntry, model: str) -> list[int]:
    """The base blocks the run trains; a base that was never grown has none, and is refused."""
    inserted = entry.inserted_layers()
    if not inserted:
        raise ScalerError(
            f"{OPTION}: model {model!r} has no inserted base layers (add one with "
            f"`scaler expand add-base-layer {model}`)"
        )
    return inserted


class BaseBlocks(nn.Module):
    """The inserted base blocks (trained) and the frozen blocks above them, run each step.

    Input: the cached states, ``lower`` + 1 layers (B, T, lower + 1, d), bottom to top, which
    hold the input of the lowest inserted block. Output: what the trunk takes, the last state
    (B, T, d), or with ``branch_lower`` the layers below it too (B, T, branch_lower + 1, d).
    """

    def __init__(self, base: BaseEncoder, inserted: Sequence[int], branch_lower: int) -> None:
        super().__init__()
        _, stack = the_stack(base.model)
        self.depth = len(stack)
        self.inserted = sorted(inserted)
        if not self.inserted or self.inserted[0] < 0 or self.inserted[-1] >= self.depth:
            raise ScalerError(
                f"{OPTION}: inserted layers {self.inserted} are not blocks of a {self.depth}-block base"
            )
        self.lowest = self.inserted[0]
        #: shared with the base (not copied): the optimizer and checkpoints see these, nothing else
        self.blocks = nn.ModuleList([stack[i] for i in self.inserted])
        self.blocks.requires_grad_(True)
        self._base = (base,)  # a tuple: not a submodule, so its frozen weights stay out of state_dict
        self.branch_lower = branch_lower
        #: base layers below the last the cached states carry (the lowest block's input among them)
        self.lower = max(branch_lower, self.depth - self.lowest)

    @property
    def base(self) -> BaseEncoder:
        return self._base[0]

    def check(self, texts: Sequence[str]) -> float:
        """The cut run equals the full pass on ``texts`` (refused otherwise, see base_blocks)."""
        batch = self.base.tokenize(list(texts), self.base.device)
        return check_blocks_from(self.base.model, self.lowest, batch)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        assert states.dim() == 4 and states.shape[2] == self.lower + 1, states.shape
        at = self.lower - (self.depth - self.lowest)  # the lowest inserted block's input
        layers = states.unbind(2)
        hidden = layers[at]
        _, above = run_blocks_from(self.base.model, self.lowest, hidden, mask.long())
        full = [*layers[: at + 1], *above]  # hidden_states[depth - lower:], the last one last
        if not self.branch_lower:
            return full[-1]
        return torch.stack(full[-(self.branch_lower + 1) :], dim=2)

    def trained_names(self) -> frozenset[str]:
        """The names, in the base's state dict, of the trained blocks' tensors."""
        mine = {id(t) for t in (*self.blocks.parameters(), *self.blocks.buffers())}
        return frozenset(n for n, t in self.base.model.state_dict(keep_vars=True).items() if id(t) in mine)


def base_entry_after(store: ContentStore, entry: BaseEntry, base: BaseEncoder) -> BaseEntry:
    """The run's base as a new base bank (the whole base's tensors: the frozen ones unchanged)."""
    base.model.requires_grad_(False)
    bank = encode_bank(
        {k: v.detach().cpu().contiguous() for k, v in base.model.state_dict().items()},
        kind="base",
        metadata=base_meta(entry.to_dict()),
    )
    return dataclasses.replace(entry, bank=str(store.put_bytes(bank.data)))


__all__ = ["OPTION", "BaseBlocks", "base_entry_after", "inserted_layers"]
