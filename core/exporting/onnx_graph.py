"""Export-only torch modules: a composed ``ScalerModel`` as one traceable function for ONNX.

``torch.onnx.export`` (the TorchScript tracer, ``dynamo=False``) records the ops one call
runs. ``MoELayer.forward`` does not trace into the same function: it lists the active experts
with ``.tolist()`` (the tracer freezes that Python list, so an expert idle in the example
batch would be missing from the graph) and moves real tokens with boolean-mask indexing.
``ExportMoE`` computes the same function with a *static* loop over every expert and
data-dependent index tensors that ONNX has ops for:

* real tokens: ``NonZero(mask)`` -> ``Gather`` (padding is never normalised, routed or changed,
  as in torch);
* a gating with a fixed number ``k`` of experts per token (``Gating.experts_per_token``: top-k,
  switch): ``TopK(combine, k)`` -> per expert ``e``: ``NonZero(slot == e)`` -> ``Gather`` of its
  tokens -> the expert FFN; the outputs concatenated, put back in (token, slot) order by one
  ``Gather`` (the inverse permutation, an argsort) and summed over the ``k`` slots with their
  weights. No scatter: onnxruntime's ``ScatterElements`` with ``add`` was the slowest op of the
  old graph (E + 1 of them a layer);
* any other gating: per expert ``NonZero(combine[:, e] > 0)`` -> ``Gather`` -> FFN -> weighted
  -> ``index_add`` (``ScatterElements``, reduction ``add``);
* the layer's output ``hidden + delta`` with ``delta`` gathered onto the real tokens (padding
  reads a zero row).

Cost: the same expert FLOPs as the torch path (each token runs only its top-k experts; an
expert with no token runs on an empty tensor). The weighted sum runs in slot order, not expert
order, so the last bits can differ from torch (checked: ``<= 1e-4``, typically ~1e-7). No dense "every expert on every token" fallback is needed. The torch path
(``scaler_wizard.moe``) is untouched: these modules wrap its layers and share their weights.

``ExportGraph`` is the whole model: the base encoder (every in-encoder adapter off), the trunk
(``ExportMoE`` layers + pooling) and each chosen branch's tail on it; a branch whose strategy
adapts inside the encoder (``needs_base_pass``, e.g. ``peft-lora``) gets its own base + trunk
pass with its adapter on, as ``ScalerModel.forward`` does. Its LoRA weights stay unmerged and
the base weights are shared by every pass (one copy in the file). Outputs: one logits tensor per
branch, in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scaler_wizard.branch import Branch, TrunkOutput, shared_base_layers
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.moe import MoELayer


class ExportMoE(nn.Module):
    """``MoELayer`` as a traceable function: same output as ``layer(hidden, mask)[0]``."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer
        k = layer.gating.experts_per_token()
        self.k = int(k) if k is not None and 0 < int(k) <= layer.num_experts else None

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden (B, T, d), mask (B, T) bool -> (B, T, d)."""
        layer = self.layer
        b, t, d = hidden.shape
        flat = hidden.reshape(b * t, d)
        keep = mask.reshape(b * t)
        real = keep.nonzero().flatten()  # (N,) real tokens only
        x = flat.index_select(0, real)
        xn = layer.norm(x)
        combine = layer.gating(xn).combine  # (N, E)
        y = self._gathered(xn, combine) if self.k is not None else self._scattered(xn, combine)
        # back onto the real tokens by a gather: row 0 of ``padded`` is the zero row padding reads
        rank = torch.cumsum(keep.to(torch.int64), 0) * keep.to(torch.int64)  # (B*T,) 1..N, 0 = pad
        padded = torch.cat([y.new_zeros(1, d), y], 0)
        return hidden + padded.index_select(0, rank).reshape(b, t, d)

    def _gathered(self, xn: Tensor, combine: Tensor) -> Tensor:
        """Every token sent to at most ``k`` experts: its ``k`` largest weights (a zero weight
        adds 0), each expert on its tokens, the outputs put back in (token, slot) order by one
        gather and summed over the slots. No scatter (onnxruntime's is slow)."""
        layer, k = self.layer, int(self.k or 1)
        n = xn.shape[0]
        weight, chosen = combine.topk(k, dim=-1)  # (N, k)
        slots = chosen.reshape(-1)  # (N*k,) slot s = token s // k
        outs, where = [], []
        for e in range(layer.num_experts):  # static: every expert is in the graph
            pos = (slots == e).nonzero().flatten()  # (n_e,) slots sent to e
            outs.append(layer.expert(e, xn.index_select(0, torch.div(pos, k, rounding_mode="floor"))))
            where.append(pos)
        order = torch.argsort(torch.cat(where))  # inverse permutation: slot -> row of ``outs``
        out = torch.cat(outs, 0).index_select(0, order).reshape(n, k, -1)
        return (out * weight.unsqueeze(-1)).sum(1)

    def _scattered(self, xn: Tensor, combine: Tensor) -> Tensor:
        """Any gating: each expert's tokens scattered back with ``index_add`` (E scatters)."""
        layer = self.layer
        y = torch.zeros_like(xn)
        for e in range(layer.num_experts):  # static: every expert is in the graph
            idx = combine[:, e].nonzero().flatten()  # (n_e,)
            out = layer.expert(e, xn.index_select(0, idx))
            y = y.index_add(0, idx, out * combine.index_select(0, idx)[:, e : e + 1])
        return y


class ExportTrunk(nn.Module):
    """The trunk's MoE layers (as ``ExportMoE``) and its pooling -> a ``TrunkOutput``."""

    def __init__(self, model: ScalerModel) -> None:
        super().__init__()
        layers = list(model.trunk.layers)
        bad = [type(m).__name__ for m in layers if not isinstance(m, MoELayer)]
        if bad:
            raise TypeError(f"trunk layers must be MoELayer, not {bad[0]}")
        self.layers = nn.ModuleList([ExportMoE(m) for m in layers if isinstance(m, MoELayer)])
        self.pooling = model.trunk.pooling

    def forward(self, hidden: Tensor, mask: Tensor) -> TrunkOutput:
        for layer in self.layers:
            hidden = layer(hidden, mask)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return TrunkOutput(pooled=pooled, hidden=hidden, mask=mask, aux_loss=hidden.new_zeros(()))


class ExportGraph(nn.Module):
    """Base + trunk + the chosen branches' tails: ``(input_ids, attention_mask[, token_type_ids])``
    -> one logits tensor per branch (``branches`` order)."""

    def __init__(self, model: ScalerModel, branches: Sequence[str], *, token_type_ids: bool) -> None:
        super().__init__()
        self.base = model.base
        self.trunk = ExportTrunk(model)
        self.names = list(branches)
        self.tails = nn.ModuleList([model.branch(n) for n in self.names])
        self.token_type_ids = token_type_ids

    def _encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        extra: dict[str, Tensor],
        adapter: str | None,
        lower: int,
    ) -> TrunkOutput:
        """Base (``adapter`` on, or none) then trunk; ``lower``: base layers below the last to carry."""
        hidden, layers = self.base.forward_layers(
            input_ids, attention_mask, lower, adapter=adapter, grad=False, **extra
        )
        out = self.trunk(hidden, attention_mask.bool())
        if layers:
            out.base_layers = layers
        return out

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        tails = [t for t in self.tails if isinstance(t, Branch)]
        lower = shared_base_layers(t for t in tails if not t.adapter.needs_base_pass)
        shared: TrunkOutput | None = None
        outputs = []
        for name, tail in zip(self.names, tails, strict=True):
            if tail.adapter.needs_base_pass:
                own = self._encode(input_ids, attention_mask, extra, name, int(tail.adapter.base_layers))
                outputs.append(tail(own))
            else:
                if shared is None:
                    shared = self._encode(input_ids, attention_mask, extra, None, lower)
                outputs.append(tail(shared))
        return tuple(outputs)


class ExportPooled(nn.Module):
    """The shared pass alone (base, every in-encoder adapter off, then trunk) -> pooled (B, d):
    exported only to tell a trunk that does not export from a branch that does not."""

    def __init__(self, model: ScalerModel) -> None:
        super().__init__()
        self.base = model.base
        self.trunk = ExportTrunk(model)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.base(input_ids, attention_mask, **extra)
        return self.trunk(hidden, attention_mask.bool()).pooled


class ExportTail(nn.Module):
    """One after-encoder branch alone on given trunk states (to find a branch that cannot export)."""

    def __init__(self, branch: Branch, pooling: str) -> None:
        super().__init__()
        self.branch = branch
        self.pooling = pooling

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = hidden[:, 0] if self.pooling == "cls" else (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        lower = tuple(hidden * (i + 2) for i in range(int(self.branch.adapter.base_layers)))
        trunk = TrunkOutput(
            pooled=pooled, hidden=hidden, mask=mask.bool(), aux_loss=hidden.new_zeros(()), base_layers=lower
        )
        out: Tensor = self.branch(trunk)
        return out


__all__ = ["ExportGraph", "ExportMoE", "ExportPooled", "ExportTail", "ExportTrunk"]
