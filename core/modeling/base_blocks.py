"""A base encoder's stack of transformer blocks: found from the module structure, and run from
a given block on a given hidden state.

* a *block stack* is an ``nn.ModuleList`` whose items share one class and hold a projection;
* a *projection* is a leaf module with a 2-D weight that is not an embedding (``nn.Linear``,
  GPT-2's ``Conv1D``).

:func:`run_blocks_from` runs the base's own ``forward`` (its masks, positions and final norm
stay its own) with the stack cut to the blocks from ``start`` on and the first of them fed the
given state in place of what the embeddings computed. So ``scaler train`` can cache the states
below the base blocks it trains and run only the blocks above each step. Nothing here knows a
model by name; :func:`check_blocks_from` proves the cut on a real batch before it is trusted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from scaler_wizard.errors import ScalerError

#: max |difference| between a cut run and the full pass (float32) below which the cut is trusted
CUT_TOLERANCE = 1e-4


def block_stacks(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of transformer blocks (``ModuleList`` of one class with weights), in order."""
    stacks = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) == 0:
            continue
        kinds = {type(item) for item in child}
        if len(kinds) != 1:
            continue
        first = child[0]
        has_proj = any(is_projection(m) for m in first.modules())
        if has_proj:
            stacks.append((name, child))
    # a stack nested inside another stack's block (e.g. T5's ``layer`` list inside a block) is
    # part of that block, not a stack of its own
    outer = [
        (name, stack)
        for name, stack in stacks
        if not any(name != other and name.startswith(other + ".") for other, _ in stacks)
    ]
    return outer


def is_projection(module: nn.Module) -> bool:
    """A leaf with a 2-D weight that is not an embedding table (Linear, Conv1D...)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and not isinstance(module, nn.Embedding)
        and not any(True for _ in module.children())
    )


def the_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The base's one stack of blocks (an encoder with none or several is refused)."""
    stacks = block_stacks(model)
    if len(stacks) != 1:
        names = ", ".join(n for n, _ in stacks) or "none"
        raise ScalerError(f"expected one stack of blocks in the base, found {names}")
    return stacks[0]


@contextlib.contextmanager
def _cut(model: nn.Module, start: int) -> Iterator[nn.ModuleList]:
    """The model with its stack cut to the blocks from ``start`` on (restored on exit)."""
    name, stack = the_stack(model)
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    upper = nn.ModuleList(list(stack)[start:])
    setattr(owner, attr, upper)
    try:
        yield upper
    finally:
        setattr(owner, attr, stack)


def run_blocks_from(
    model: nn.Module, start: int, hidden: Tensor, attention_mask: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run blocks ``start``.. of ``model`` on ``hidden`` (B, T, d), the input of block ``start``.

    Returns (last hidden state, the states after it: ``hidden_states[start + 1:]`` of the full
    pass, whose last entry is the last hidden state), with autograd as the caller has it.
    """
    if not 0 <= start < len(the_stack(model)[1]):
        raise ScalerError(f"no block {start} in the base")

    def feed(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (hidden, *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        raise ScalerError("the base's blocks take their hidden state by no known argument")

    with _cut(model, start) as upper:
        handle = upper[0].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            out = model(inputs_embeds=hidden, attention_mask=attention_mask, output_hidden_states=True)
        finally:
            handle.remove()
    states = tuple(out.hidden_states)
    if len(states) != len(upper) + 1:
        raise ScalerError(
            f"the base reported {len(states)} hidden states for {len(upper)} blocks: cannot run it from block {start}"
        )
    return out.last_hidden_state, states[1:]


@torch.no_grad()
def check_blocks_from(model: nn.Module, start: int, batch: dict[str, Tensor]) -> float:
    """Max |difference| between the full pass and the cut run from block ``start`` on a real
    tokenised ``batch`` (float32): refused above :data:`CUT_TOLERANCE`."""
    mask = batch["attention_mask"]
    full = model(**batch, output_hidden_states=True)
    states = tuple(full.hidden_states)
    last, above = run_blocks_from(model, start, states[start].float(), mask)
    keep = mask.bool().unsqueeze(-1)
    pairs = [(last, full.last_hidden_state), *zip(above, states[start + 1 :], strict=True)]
    worst = max(float(((a.float() - b.float()) * keep).abs().max()) for a, b in pairs)
    if not worst <= CUT_TOLERANCE:  # NaN refuses too
        raise ScalerError(
            f"running the base from block {start} on cached states differs from its full pass by "
            f"{worst:.2g} (> {CUT_TOLERANCE:g}): its blocks cannot be trained from there"
        )
    return worst


__all__ = [
    "CUT_TOLERANCE",
    "block_stacks",
    "check_blocks_from",
    "is_projection",
    "run_blocks_from",
    "the_stack",
]
