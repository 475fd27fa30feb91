"""Facts read from an instantiated transformers module: blocks, norms, projections, probes.

Nothing here knows a model by name. Modules are recognised by what they are made of:

* a *block stack* is the longest ``nn.ModuleList`` whose items share one class and hold weights;
* a *norm* is a leaf module whose every parameter is a vector of the hidden size;
* a *projection* is a leaf module with a 2-D weight that is not an embedding (``nn.Linear``,
  GPT-2's ``Conv1D``).

Behavioural probes run on small, real (CPU) modules: a norm copied off the ``meta`` device,
or a materialised model with at most two blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from scaler_wizard.modeling.base_blocks import is_projection


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection (``Conv1D`` stores its weight transposed)."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    nf = getattr(module, "nf", None)
    if isinstance(nf, int):  # Conv1D: weight is (in, out)
        return int(weight.shape[0]), nf
    return int(weight.shape[1]), int(weight.shape[0])


def is_norm(module: nn.Module, hidden: int) -> bool:
    """A leaf whose parameters are all vectors of the hidden size (weight, maybe bias)."""
    if any(True for _ in module.children()):
        return False
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.dim() == 1 and p.shape[0] == hidden for p in params)


def norms_in(module: nn.Module, hidden: int) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if is_norm(m, hidden)]


def real_copy(module: nn.Module, seed: int = 0) -> nn.Module:
    """A CPU copy of a (possibly ``meta``) leaf with weights drawn in [0.5, 1.5] and biases in ±0.5."""
    clone = copy.deepcopy(module)
    clone = clone.to_empty(device="cpu") if _on_meta(clone) else clone.to("cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            values = torch.rand(p.shape, generator=gen)
            p.copy_(values + 0.5 if "bias" not in name else values - 0.5)
    return clone.float().eval()


def subtracts_mean(norm: nn.Module, hidden: int) -> bool:
    """Behaviour: LayerNorm is blind to a constant added to every feature, RMSNorm is not."""
    probe = real_copy(norm)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, hidden, generator=gen)
    with torch.no_grad():
        a = probe(x)
        b = probe(x + 3.0)
    return bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in _tensors(module))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def call_order(model: nn.Module, block: nn.Module, hidden: int, run: Any) -> list[str]:
    """Run ``run()`` with hooks on ``block``'s leaves: 'norm' / 'proj' in the order they are called."""
    order: list[str] = []
    handles = []
    for sub in block.modules():
        if is_norm(sub, hidden):
            handles.append(sub.register_forward_pre_hook(lambda *_: order.append("norm")))
        elif is_projection(sub):
            handles.append(sub.register_forward_pre_hook(lambda *_: order.append("proj")))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order


def stack_norm_after_blocks(module: nn.Module, stack_name: str, hidden: int) -> bool:
    """Static: a norm beside the block stack (not inside a block or the embeddings) -> a final norm."""
    parent_name = stack_name.rpartition(".")[0]
    parent = module.get_submodule(parent_name) if parent_name else module
    for name, child in parent.named_children():
        if is_norm(child, hidden) and name != stack_name.rpartition(".")[2]:
            return True
    return False
