"""Grow the base encoder in depth (LLaMA-Pro style): one more transformer block that adds 0.

A pre-LN block computes ``x + attn(norm1(x))`` then ``y + ffn(norm2(y))``: whatever the norms
and the attention do, if the last projection of each sublayer (the attention's output dense and
the FFN's output dense) has zero weights and biases, each sublayer adds exactly 0 and the block
is the identity. A copy of a neighbouring block with those projections zeroed therefore leaves
the residual stream, and everything above it, bit for bit unchanged, while every other weight
is a trained one (the zeroed projections get gradient ``act^T dL/dy``, not zero).

A post-LN block computes ``LayerNorm(x + f(x))``: with ``f = 0`` that is ``LayerNorm(x)``, not
``x``, and no zero-initialised construction is exact (the norm's gain and bias would have to
undo a per-token mean and scale): refused.

Nothing here knows a model by name (see ``inspection/structure.py``):

* the *output projections* of a block are the projections (out width = hidden) called last
  before a norm of the block runs, or before the block returns (forward hooks on a real pass);
* the new config is the old one with the layer-count field (the config integer that equals the
  number of blocks) + 1, and every per-layer list (e.g. ModernBERT's ``layer_types``) with the
  copied block's entry inserted;
* *layer-index-aware parts*: every block of the new model is compared with the block it comes
  from: module types and every plain attribute (ints, floats, strings, tuples...) other than
  the block's own index (``layer_idx``...). ModernBERT's sliding/full attention follows its
  ``layer_types`` entry (copied, so it stays right); its first block has no attention norm, so a
  block cannot move to or from index 0 (refused, naming the attribute).
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from scaler_wizard.errors import GrowthError, ScalerError
from scaler_wizard.inspection import structure as st
from scaler_wizard.inspection.architecture import Architecture, detect
from scaler_wizard.modeling.base_blocks import is_projection, the_stack

OPERATOR = "add-base-layer"
#: plain attributes that are a block's own index: they differ between positions by design
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx"})
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")
_PLAIN = (bool, int, float, str, type(None))


@dataclass
class GrownBase:
    """A base one block deeper, not yet stored."""

    model: nn.Module  # the new transformers model (float weights, eval)
    config_json: dict[str, Any]  # the new config.json (the old one, edited)
    at: int  # index of the new block
    copied_from: int  # index (before the insertion) of the block it copies
    layers_before: int
    stack: str  # the block stack's module path, e.g. "encoder.layer"
    zeroed: list[str]  # the new block's zeroed projections (module paths within the block)
    identity_delta: float  # max |state after the new block - state before it| on a probe pass
    architecture: Architecture  # the new base, detected
    details: dict[str, Any] = field(default_factory=dict)


def refuse_unless_pre_ln(arch: Architecture) -> None:
    """GrowthError (one line, with the reason) unless the base is pre-LN."""
    if arch.placement == "pre-LN":
        return
    if arch.placement == "post-LN":
        raise GrowthError(
            f"{OPERATOR}: the base ({arch.model_type}) is post-LN: each block ends in "
            "LayerNorm(x + f(x)), and with f = 0 that is LayerNorm(x) != x, so no zero-initialised "
            "block is exact; only pre-LN bases (residual stream passed through) can grow in depth",
            operator=OPERATOR,
        )
    raise GrowthError(
        f"{OPERATOR}: the base's norm placement is {arch.placement!r}, not pre-LN: "
        "a zero-output block is not known to be the identity there",
        operator=OPERATOR,
    )


def _stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    try:
        return the_stack(model)
    except ScalerError as exc:
        raise GrowthError(f"{OPERATOR}: {exc}", operator=OPERATOR) from exc


def output_projections(model: nn.Module, block: nn.Module, hidden: int, run: Any) -> list[str]:
    """The projections of ``block`` (out width ``hidden``) called last before one of its norms
    runs or before it returns, in call order, found with forward hooks on ``run()``."""
    norms = {id(m) for _, m in st.norms_in(block, hidden)}
    names = {id(m): n for n, m in block.named_modules()}
    calls: list[tuple[str, str]] = []  # (kind, name) in call order
    handles = []
    for _name, module in block.named_modules():
        if id(module) in norms:
            handles.append(
                module.register_forward_pre_hook(lambda m, a: calls.append(("norm", names[id(m)])))
            )
        elif is_projection(module):
            handles.append(
                module.register_forward_pre_hook(lambda m, a: calls.append(("proj", names[id(m)])))
            )
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise GrowthError(
            f"{OPERATOR}: the base's blocks were never called on a probe pass", operator=OPERATOR
        )
    out: list[str] = []
    for i, (kind, name) in enumerate(calls):  # a block runs once per forward pass
        nxt = calls[i + 1][0] if i + 1 < len(calls) else "end"
        if kind == "proj" and nxt in ("norm", "end"):
            module = block.get_submodule(name)
            if st.projection_shape(module)[1] == hidden and name not in out:
                out.append(name)
    if len(out) < 2:
        raise GrowthError(
            f"{OPERATOR}: found {len(out)} output projection(s) in a block ({', '.join(out) or 'none'}), "
            "expected the attention's and the FFN's",
            operator=OPERATOR,
        )
    return out


def _signature(block: nn.Module) -> dict[str, Any]:
    """Module types and plain attributes of every submodule (not parameters, not indices)."""
    sig: dict[str, Any] = {}
    for name, module in block.named_modules():
        sig[f"{name}:type"] = type(module).__name__
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training" or key in _INDEX_ATTRS:
                continue
            if isinstance(value, _PLAIN) or (
                isinstance(value, tuple | list) and all(isinstance(v, _PLAIN) for v in value)
            ):
                sig[f"{name}.{key}" if name else key] = value
    return sig


def _compare(old: nn.Module, new: nn.Module, what: str) -> None:
    a, b = _signature(old), _signature(new)
    for key in sorted(set(a) | set(b), key=lambda k: (not k.endswith(":type"), k)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            raise GrowthError(
                f"{OPERATOR}: {what} would be built differently there ({key}: "
                f"{a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}): its computation depends on "
                "its index, refused",
                operator=OPERATOR,
            )


def _new_config_json(old: Mapping[str, Any], config: Any, layers: int, at: int, src: int) -> dict[str, Any]:
    new = copy.deepcopy(dict(old))
    count = [f for f in _LAYER_COUNT_FIELDS if getattr(config, f, None) == layers]
    if not count:
        raise GrowthError(f"{OPERATOR}: no layer-count field in the base's config", operator=OPERATOR)
    new[count[0]] = layers + 1
    # per-layer lists: the config's own value (defaults filled in), the copied block's entry inserted
    for key, value in config.to_dict().items():
        if "layer" in key and isinstance(value, list) and len(value) == layers:
            grown = list(value)
            grown.insert(at, value[src])
            new[key] = grown
    return new


def grow(
    model: nn.Module,
    config_json: Mapping[str, Any],
    texts_ids: dict[str, torch.Tensor],
    *,
    at: int | None = None,
    arch: Architecture | None = None,
) -> GrownBase:
    """``model`` (a transformers encoder) with one identity block inserted at ``at`` (default:
    on top), as a new model. ``config_json``: its config.json; ``texts_ids``: a tokenised probe
    batch (``input_ids``, ``attention_mask``...) for the hook pass and the identity check."""
    from transformers import AutoConfig, AutoModel

    config: Any = model.config
    arch = arch or detect(config)
    refuse_unless_pre_ln(arch)
    stack_name, stack = _stack(model)
    layers = len(stack)
    at = layers if at is None else at
    if not 0 <= at <= layers:
        raise GrowthError(
            f"{OPERATOR}: --at {at} out of range 0..{layers} (the base has {layers} blocks)",
            operator=OPERATOR,
        )
    hidden = int(arch.hidden_size)

    accepted = set(inspect.signature(model.forward).parameters)
    if not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()
    ):
        texts_ids = {k: v for k, v in texts_ids.items() if k in accepted}

    def run() -> None:
        with torch.no_grad():
            model(**texts_ids)

    candidates = [at - 1, at] if at > 0 else [0]
    candidates = [c for c in candidates if c < layers]
    data = _new_config_json(config_json, config, layers, at, candidates[0])
    problems: list[str] = []
    for src in candidates:
        data = _new_config_json(config_json, config, layers, at, src)
        kind = data.get("model_type", getattr(config, "model_type", None))
        fields = {k: v for k, v in data.items() if k != "model_type"}
        new_config = AutoConfig.for_model(kind, **fields)
        dtype = next(model.parameters()).dtype
        torch.manual_seed(0)
        new_model: nn.Module = AutoModel.from_config(new_config).to(dtype).eval()
        _, new_stack = _stack(new_model)
        try:
            for k in range(layers):
                _compare(
                    stack[k],
                    new_stack[k if k < at else k + 1],
                    f"block {k} (new index {k if k < at else k + 1})",
                )
            _compare(stack[src], new_stack[at], f"a copy of block {src} at index {at}")
        except GrowthError as exc:
            problems.append(str(exc))
            continue
        break
    else:
        raise GrowthError(problems[-1], operator=OPERATOR)
    zeroed = output_projections(model, stack[src], hidden, run)
    state = _mapped_state(model, stack_name, layers, at, src)
    try:
        new_model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GrowthError(
            f"{OPERATOR}: the grown base does not take the old weights ({first})", operator=OPERATOR
        ) from exc
    with torch.no_grad():
        for name in zeroed:
            proj = new_stack[at].get_submodule(name)
            for p in proj.parameters(recurse=False):
                p.zero_()
    new_model.requires_grad_(False)
    identity = _identity_delta(new_model, new_stack[at], texts_ids)
    new_arch = detect(new_config)
    return GrownBase(
        model=new_model,
        config_json=data,
        at=at,
        copied_from=src,
        layers_before=layers,
        stack=stack_name,
        zeroed=zeroed,
        identity_delta=identity,
        architecture=new_arch,
        details={"at": at, "copied_from": src, "layers": [layers, layers + 1], "zeroed": zeroed},
    )


def _mapped_state(
    model: nn.Module, stack_name: str, layers: int, at: int, src: int
) -> dict[str, torch.Tensor]:
    """The old state dict with blocks >= ``at`` moved up one and block ``src`` copied to ``at``."""
    prefix = stack_name + "."
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index_text, _, rest = key[len(prefix) :].partition(".")
        k = int(index_text)
        out[f"{prefix}{k if k < at else k + 1}.{rest}"] = value
        if k == src:
            out[f"{prefix}{at}.{rest}"] = value.clone()
    return out


def _identity_delta(model: nn.Module, block: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """max |``block``'s output - its input| on ``batch`` (0.0: the block adds exactly 0)."""
    seen: dict[str, torch.Tensor] = {}

    def before(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value = args[0] if args else kwargs.get("hidden_states")
        if isinstance(value, torch.Tensor):
            seen["in"] = value.detach().clone()

    def after(_m: nn.Module, _a: Any, _k: Any, output: Any) -> None:
        value = output[0] if isinstance(output, tuple | list) else output
        if isinstance(value, torch.Tensor):
            seen["out"] = value.detach().clone()

    h1 = block.register_forward_pre_hook(before, with_kwargs=True)
    h2 = block.register_forward_hook(after, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        h1.remove()
        h2.remove()
    if "in" not in seen or "out" not in seen or seen["in"].shape != seen["out"].shape:
        return float("nan")
    return float((seen["out"].float() - seen["in"].float()).abs().max())


def config_bytes(config_json: Mapping[str, Any]) -> bytes:
    """config.json's bytes (sorted keys, two-space indent, a final newline)."""
    return (json.dumps(config_json, indent=2, sort_keys=True) + "\n").encode()


__all__ = ["OPERATOR", "GrownBase", "config_bytes", "grow", "output_projections", "refuse_unless_pre_ln"]
