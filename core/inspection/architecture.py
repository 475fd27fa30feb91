"""What a base model is, from its transformers config *and* its module structure (issue 13).

No table of model names: each field comes from generic config fields (``hidden_size``,
``num_key_value_heads``, ``alibi``...) and from the modules ``AutoModel.from_config`` builds,
found by what they are made of (see ``structure.py``). How each field was found is kept in
``Architecture.evidence``.

Methods, field by field:

* family: ``is_encoder_decoder`` with two block stacks -> encoder-decoder; otherwise a
  *causality probe* on a materialised twin (same config, at most two blocks, random weights):
  change the last token and see whether the first position's output moves (encoder) or not
  (decoder). Too big to materialise: an attention module flagged ``is_causal``, or
  transformers' auto classes pairing the config with a causal-LM head and no masked-LM head.
* norm kind: copy a norm of the last block off ``meta`` with random weights and add a constant
  to every feature: LayerNorm subtracts the mean (output unchanged), RMSNorm does not.
* placement: forward hooks on the last block of the twin: a norm called before the block's
  first projection is pre-LN, a projection first is post-LN. Too big to materialise: a final
  norm beside the block stack means pre-LN.
* attention: query heads from the config; key/value heads from the key projection's width
  (or a fused qkv projection's), else ``num_key_value_heads`` / ``num_kv_heads`` / ``multi_query``.
* positions: config ``alibi`` -> ALiBi; a module with an ``inv_freq`` buffer (or ``*_inv_freq``) -> RoPE; a
  relative-bias module or a relative ``position_embedding_type`` -> relative; a fixed
  (sinusoidal) position table -> sinusoidal; an embedding as long as the context -> learned
  absolute; an attention whose ``forward`` takes ``alibi`` -> ALiBi.
"""

from __future__ import annotations

import copy
import inspect as pyinspect
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from scaler_wizard.inspection import structure as st
from scaler_wizard.modeling.base_blocks import block_stacks, is_projection

#: A twin with more parameters than this is not materialised (the probes fall back to static checks).
TWIN_LIMIT = 60_000_000
_KEY_NAMES = {"k_proj", "key", "k", "k_lin", "wk", "key_proj"}
_FUSED_NAMES = {"query_key_value", "c_attn", "Wqkv", "qkv_proj", "qkv", "in_proj"}


@dataclass(frozen=True)
class Architecture:
    """The answer of ``scaler inspect``."""

    model_type: str
    family: str  # encoder | decoder | encoder-decoder
    norm: str  # LayerNorm | RMSNorm
    placement: str  # pre-LN | post-LN
    attention: str  # MHA | GQA | MQA
    heads: int
    kv_heads: int
    positions: str  # learned absolute | sinusoidal | RoPE | ALiBi | relative | none
    activation: str
    hidden_size: int
    ffn_size: int
    layers: int  # blocks in all stacks (an encoder-decoder counts both)
    parameters: int
    supported: bool
    reason: str
    evidence: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """The fields a manifest records as ``base.inspection`` (no evidence, no model_type)."""
        from scaler_wizard.manifests.model import BaseInspection

        values = self.to_dict()
        return {k: values[k] for k in BaseInspection.FIELDS}


def _cfg(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def build_meta(config: Any) -> nn.Module:
    """``AutoModel.from_config`` on the ``meta`` device: structure and shapes, no memory."""
    from transformers import AutoModel

    with torch.device("meta"):
        model: nn.Module = AutoModel.from_config(config)
    return model.eval()


def _twin(config: Any) -> nn.Module | None:
    """The same architecture with at most two blocks per stack, materialised on CPU (or None)."""
    from transformers import AutoModel

    twin_cfg = copy.deepcopy(config)
    for name in ("num_hidden_layers", "num_decoder_layers"):
        value = getattr(twin_cfg, name, None)
        if isinstance(value, int) and value > 2:
            setattr(twin_cfg, name, 2)
    for name in ("layer_types",):  # per-layer lists must match the new depth
        value = getattr(twin_cfg, name, None)
        if isinstance(value, list) and len(value) > 2:
            setattr(twin_cfg, name, value[:2])
    try:
        meta = build_meta(twin_cfg)
        if sum(p.numel() for p in meta.parameters()) > TWIN_LIMIT:
            return None
        torch.manual_seed(0)
        twin: nn.Module = AutoModel.from_config(twin_cfg)
    except Exception:  # a twin is an aid: without one the static checks answer
        return None
    return twin.float().eval()


def _run(model: nn.Module, config: Any, ids: torch.Tensor) -> torch.Tensor:
    kwargs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    with torch.no_grad():
        out = model(**kwargs)
    hidden = out.encoder_last_hidden_state if kwargs.get("decoder_input_ids") is not None else None
    result: torch.Tensor = hidden if hidden is not None else out.last_hidden_state
    return result


def _probe_ids(config: Any) -> torch.Tensor:
    vocab = int(_cfg(config, "vocab_size") or 100)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(min(3, vocab - 1), vocab, (1, 6), generator=gen)


def detect(config: Any, module: nn.Module | None = None, *, probe: bool = True) -> Architecture:
    """Detect the architecture of ``config`` (``module``: its ``AutoModel``, built on meta if None)."""
    module = module if module is not None else build_meta(config)
    evidence: dict[str, str] = {}
    hidden = int(_cfg(config, "hidden_size", "d_model", "n_embd", "dim"))
    heads = int(_cfg(config, "num_attention_heads", "num_heads", "n_head", "n_heads"))
    stacks = block_stacks(module)
    if not stacks:
        from scaler_wizard.errors import ScalerError

        raise ScalerError(f"no stack of transformer blocks found in {type(module).__name__}")
    layers = sum(len(stack) for _, stack in stacks)
    evidence["layers"] = "blocks in " + ", ".join(f"{n} ({len(s)})" for n, s in stacks)
    stack_name, stack = stacks[0]
    last_block = stack[len(stack) - 1]
    twin = _twin(config) if probe else None
    twin_block = None
    if twin is not None:
        twin_stacks = block_stacks(twin)
        twin_block = twin_stacks[0][1][len(twin_stacks[0][1]) - 1]

    family = _family(config, module, stacks, twin, evidence)
    norm = _norm_kind(last_block, hidden, evidence)
    placement = _placement(config, module, stack_name, twin, twin_block, hidden, evidence)
    kv_heads = _kv_heads(config, last_block, hidden, heads, evidence)
    attention = "MHA" if kv_heads == heads else ("MQA" if kv_heads == 1 else "GQA")
    positions = _positions(config, module, last_block, evidence)
    activation = _activation(config, last_block, evidence)
    ffn = _ffn_size(config, last_block, hidden, evidence)
    parameters = sum(p.numel() for p in module.parameters())
    evidence["parameters"] = "sum over the built module's parameters (a tied weight counts once)"
    supported, reason = _support(family, module)
    return Architecture(
        model_type=str(getattr(config, "model_type", "") or type(module).__name__),
        family=family,
        norm=norm,
        placement=placement,
        attention=attention,
        heads=heads,
        kv_heads=kv_heads,
        positions=positions,
        activation=activation,
        hidden_size=hidden,
        ffn_size=ffn,
        layers=layers,
        parameters=int(parameters),
        supported=supported,
        reason=reason,
        evidence=evidence,
    )


def _family(
    config: Any,
    module: nn.Module,
    stacks: list[tuple[str, nn.ModuleList]],
    twin: nn.Module | None,
    evidence: dict[str, str],
) -> str:
    if getattr(config, "is_encoder_decoder", False) and len(stacks) >= 2:
        evidence["family"] = "config is_encoder_decoder and two block stacks"
        return "encoder-decoder"
    if twin is not None:
        ids = _probe_ids(config)
        changed = ids.clone()
        changed[0, -1] = ids[0, 0] if ids[0, -1] != ids[0, 0] else ids[0, 1]
        try:
            first_a = _run(twin, config, ids)[0, 0]
            first_b = _run(twin, config, changed)[0, 0]
        except Exception as exc:  # fall through to the static check
            evidence["family"] = f"probe failed ({type(exc).__name__})"
        else:
            sees_future = not torch.allclose(first_a, first_b, atol=1e-6)
            evidence["family"] = "causality probe: the first position " + (
                "sees a later token (bidirectional)" if sees_future else "never sees a later token (causal)"
            )
            return "encoder" if sees_future else "decoder"
    causal = any(getattr(m, "is_causal", None) is True for m in module.modules())
    if causal or getattr(config, "is_decoder", False):
        evidence["family"] = "an attention module is flagged is_causal"
        return "decoder"
    if _causal_lm_only(config):
        evidence["family"] = "transformers pairs this config with a causal-LM head and no masked-LM head"
        return "decoder"
    evidence["family"] = "no causal attention module"
    return "encoder"


def _causal_lm_only(config: Any) -> bool:
    """transformers' own auto classes: a causal-LM head for this config type and no masked-LM one."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover - layout of transformers
        return False
    kind = getattr(config, "model_type", None)
    causal = getattr(auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {})
    masked = getattr(auto, "MODEL_FOR_MASKED_LM_MAPPING_NAMES", {})
    return kind in causal and kind not in masked


def _norm_kind(block: nn.Module, hidden: int, evidence: dict[str, str]) -> str:
    norms = st.norms_in(block, hidden)
    if not norms:
        evidence["norm"] = "no norm found in a block"
        return "none"
    kinds = {("LayerNorm" if st.subtracts_mean(m, hidden) else "RMSNorm") for _, m in norms}
    kind = "LayerNorm" if kinds == {"LayerNorm"} else ("RMSNorm" if kinds == {"RMSNorm"} else "mixed")
    names = ", ".join(f"{n} ({type(m).__name__})" for n, m in norms)
    evidence["norm"] = f"shift probe on {names}: " + (
        "blind to a constant shift (mean subtracted)" if kind == "LayerNorm" else "changes with a shift"
    )
    return kind


def _placement(
    config: Any,
    module: nn.Module,
    stack_name: str,
    twin: nn.Module | None,
    twin_block: nn.Module | None,
    hidden: int,
    evidence: dict[str, str],
) -> str:
    if twin is not None and twin_block is not None:
        ids = _probe_ids(config)
        try:
            order = st.call_order(twin, twin_block, hidden, lambda: _run(twin, config, ids))
        except Exception as exc:
            evidence["placement"] = f"hook probe failed ({type(exc).__name__})"
        else:
            if "norm" in order and "proj" in order:
                pre = order.index("norm") < order.index("proj")
                evidence["placement"] = (
                    "forward hooks on the last block: a norm runs before its first projection"
                    if pre
                    else "forward hooks on the last block: a projection runs before its first norm"
                )
                return "pre-LN" if pre else "post-LN"
    final = st.stack_norm_after_blocks(module, stack_name, hidden)
    evidence["placement"] = "static: " + (
        "a final norm beside the block stack" if final else "no final norm beside the block stack"
    )
    return "pre-LN" if final else "post-LN"


def _head_dim(config: Any, hidden: int, heads: int) -> int:
    value = _cfg(config, "head_dim", "d_kv", "attention_head_size")
    return int(value) if isinstance(value, int) and value > 0 else hidden // heads


def _kv_heads(config: Any, block: nn.Module, hidden: int, heads: int, evidence: dict[str, str]) -> int:
    head_dim = _head_dim(config, hidden, heads)
    for name, sub in block.named_modules():
        leaf = name.rpartition(".")[2]
        if not is_projection(sub):
            continue
        _, out_f = st.projection_shape(sub)
        if leaf in _KEY_NAMES and out_f % head_dim == 0:
            evidence["attention"] = f"key projection {name}: {out_f} = kv heads x head dim {head_dim}"
            return out_f // head_dim
        if leaf in _FUSED_NAMES and out_f % head_dim == 0 and out_f // head_dim > heads:
            kv = (out_f // head_dim - heads) // 2
            evidence["attention"] = (
                f"fused qkv projection {name}: {out_f} = (heads + 2 x kv heads) x head dim {head_dim}"
            )
            return kv
    kv = _cfg(config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv = 1
    evidence["attention"] = "config key/value head count"
    return int(kv) if isinstance(kv, int) and kv > 0 else heads


def _positions(config: Any, module: nn.Module, block: nn.Module, evidence: dict[str, str]) -> str:
    if getattr(config, "alibi", False) is True:
        evidence["positions"] = "config alibi"
        return "ALiBi"
    for name, _buf in module.named_buffers():
        if name.rpartition(".")[2].endswith("inv_freq"):
            evidence["positions"] = f"rotary frequencies {name}"
            return "RoPE"
    for name, _sub in module.named_modules():
        if "relative_attention_bias" in name.rpartition(".")[2] or "rel_embeddings" in name:
            evidence["positions"] = f"relative position bias {name}"
            return "relative"
    kind = str(getattr(config, "position_embedding_type", "") or "")
    if kind.startswith("relative"):
        evidence["positions"] = f"config position_embedding_type {kind}"
        return "relative"
    if getattr(config, "relative_attention", False) is True:
        evidence["positions"] = "config relative_attention"
        return "relative"
    context = _cfg(config, "max_position_embeddings", "n_positions", "max_seq_len")
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Embedding) and sub.num_embeddings == context:
            if getattr(config, "sinusoidal_pos_embds", False) or "sinusoid" in type(sub).__name__.lower():
                evidence["positions"] = f"{name}: a fixed sinusoidal table"
                return "sinusoidal"
            evidence["positions"] = f"{name}: a trained table of {context} positions"
            return "learned absolute"
    for name, sub in module.named_modules():
        if "sinusoid" in type(sub).__name__.lower():
            evidence["positions"] = f"{name} ({type(sub).__name__})"
            return "sinusoidal"
    for name, sub in block.named_modules():
        try:
            params = pyinspect.signature(sub.forward).parameters
        except (TypeError, ValueError):
            continue
        if "alibi" in params:
            evidence["positions"] = f"{name or 'block'}.forward takes an alibi bias, no other position source"
            return "ALiBi"
    evidence["positions"] = "no position source found"
    return "none"


#: activation module classes (not model names) -> the config-style name
_ACT_CLASSES = {
    "gelu": "gelu",
    "geluactivation": "gelu",
    "newgeluactivation": "gelu_new",
    "gelutanh": "gelu_pytorch_tanh",
    "pytorchgelutanh": "gelu_pytorch_tanh",
    "fastgeluactivation": "gelu_fast",
    "silu": "silu",
    "siluactivation": "silu",
    "relu": "relu",
    "tanh": "tanh",
}


def _activation(config: Any, block: nn.Module, evidence: dict[str, str]) -> str:
    for name in ("hidden_act", "activation_function", "hidden_activation", "activation"):
        value = getattr(config, name, None)
        if isinstance(value, str) and value:
            evidence["activation"] = f"config {name}"
            return value
    proj = getattr(config, "feed_forward_proj", None)
    if isinstance(proj, str) and proj:
        evidence["activation"] = "config feed_forward_proj"
        return proj.rpartition("-")[2]
    for name, sub in block.named_modules():
        if any(True for _ in sub.parameters(recurse=False)) or any(True for _ in sub.children()):
            continue
        cls = type(sub).__name__.lower()
        if cls in _ACT_CLASSES:
            evidence["activation"] = f"activation module {name} ({type(sub).__name__})"
            return _ACT_CLASSES[cls]
        if "gelu" in cls:  # a model's own tanh-approximated GELU (e.g. a fused jit one)
            evidence["activation"] = f"activation module {name} ({type(sub).__name__})"
            return "gelu_tanh"
    evidence["activation"] = "not found"
    return "unknown"


def _ffn_size(config: Any, block: nn.Module, hidden: int, evidence: dict[str, str]) -> int:
    value = _cfg(config, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim", "ffn_hidden_size")
    if isinstance(value, int) and value > 0:
        evidence["ffn_size"] = "config"
        return value
    widest = 0
    for name, sub in block.named_modules():
        if is_projection(sub):
            in_f, out_f = st.projection_shape(sub)
            if out_f == hidden and in_f > widest:
                widest = in_f
                evidence["ffn_size"] = f"down projection {name}: {in_f} -> {hidden}"
    return widest


def _support(family: str, module: nn.Module) -> tuple[bool, str]:
    """Can the base encoder loader (``modeling.base_encoder``) compose on it?"""
    if family == "decoder":
        return False, (
            "a decoder: causal attention means early tokens never see later ones, and the "
            "composition pools bidirectional encoder states of the whole text"
        )
    if family == "encoder-decoder":
        return False, (
            "an encoder-decoder: AutoModel builds both stacks and needs decoder inputs; "
            "the base encoder runs a single encoder stack"
        )
    try:
        params = pyinspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "input_ids" not in params or "attention_mask" not in params:
        return False, "its forward does not take input_ids and attention_mask"
    return True, "an encoder with a hidden size: the base encoder loads and runs it"
