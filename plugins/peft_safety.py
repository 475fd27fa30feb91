"""What a PEFT adapter folder bank may say and hold, checked before PEFT sees any of it.

A ``peft-lora`` bank is a stock PEFT folder, but loading one must never run pickle (PEFT falls
back to ``torch.load`` on ``adapter_model.bin``) and never touch the shared base: many LoRA
options rewrite or retrain base weights (PiSSA/OLoRA/LoftQ/EVA/CorDA inits, ``modules_to_save``,
trainable biases, ``layer_replication``, trainable tokens...). So the folder's members, its
``adapter_config.json`` and its tensor names are each checked against an explicit allow-list,
and the weights are read with safetensors and copied into the adapter's own parameters only.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from scaler_wizard.errors import IntegrityError, ScalerError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: The members of a PEFT folder bank: exactly these (no .bin, no code, no card).
PEFT_MEMBERS = frozenset({CONFIG_FILE, WEIGHTS_FILE})
_MAX_CONFIG_BYTES = 64 * 1024
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]{1,100}(\.[A-Za-z0-9_]{1,100}){0,20}$")
_MAX_RANK = 4096

_EMPTY_MAP: tuple[Any, ...] = (None, {})
#: Fields a stock PEFT ``LoraConfig`` writes that must keep a value which leaves the base alone
#: (and which the loader therefore ignores). Anything not here or in ``_VARIABLE`` is refused.
_FIXED: dict[str, tuple[Any, ...]] = {
    "peft_type": ("LORA",),
    "task_type": (None,),
    "init_lora_weights": (True, False, "gaussian"),  # pissa, olora, loftq, eva, corda... rewrite the base
    "bias": ("none",),  # "all" / "lora_only" train (and save, and load) the base's own biases
    "lora_bias": (False,),
    "use_dora": (False,),  # leaves base weights alone, but reads them; not what peft-lora writes
    "use_rslora": (False,),
    "use_qalora": (False,),
    "use_bdlora": (None,),
    "fan_in_fan_out": (False,),
    "modules_to_save": (None,),  # trains and loads full copies of shared modules
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
    "layer_replication": (None,),  # rebuilds the base's layer stack
    "trainable_token_indices": (None,),  # trains rows of the shared embedding
    "target_parameters": (None,),
    "exclude_modules": (None,),
    "rank_pattern": _EMPTY_MAP,
    "alpha_pattern": _EMPTY_MAP,
    "loftq_config": _EMPTY_MAP,
    "eva_config": (None,),
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "arrow_config": (None,),
    "alora_invocation_tokens": (None,),
    "megatron_config": (None,),
    "megatron_core": ("megatron.core", None),  # a module PEFT would import
    "ensure_weight_tying": (False,),
}
#: Fields that may vary; each is checked by ``_check_variable``. Only the first four reach PEFT.
_VARIABLE = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "qalora_group_size",
    "auto_mapping",
)


def _refuse(where: str, field: str, why: str, *, source: str, error: type[ScalerError]) -> ScalerError:
    return error(f"{where}: {source} {field!r:.60} {why}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_variable(where: str, key: str, v: Any, *, source: str, error: type[ScalerError]) -> None:
    ok: bool
    if key == "r":
        ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_RANK
        need = f"an integer rank from 1 to {_MAX_RANK}"
    elif key == "lora_alpha":
        ok = _is_number(v)
        need = "a finite number"
    elif key == "lora_dropout":
        ok = _is_number(v) and 0 <= v <= 1
        need = "a number from 0 to 1"
    elif key == "target_modules":
        ok = (
            isinstance(v, list)
            and 0 < len(v) <= 64
            and all(isinstance(m, str) and _MODULE_NAME.fullmatch(m) for m in v)
        )
        need = "a list of module names (a string would be a regular expression)"
    elif key in ("base_model_name_or_path", "revision", "peft_version"):
        ok = v is None or (isinstance(v, str) and len(v) <= 1000)
        need = "a string or null"
    elif key == "inference_mode":
        ok = isinstance(v, bool)
        need = "true or false"
    elif key == "qalora_group_size":  # unused while use_qalora is false
        ok = isinstance(v, int) and not isinstance(v, bool)
        need = "an integer"
    else:  # auto_mapping: informational (AutoPeftModel imports from it; we never do)
        ok = v is None or (
            isinstance(v, dict)
            and set(v) <= {"base_model_class", "parent_library"}
            and all(isinstance(x, str) and len(x) <= 200 for x in v.values())
        )
        need = "null or {base_model_class, parent_library}"
    if not ok:
        raise _refuse(where, key, f"is {_short(v)}: must be {need}", source=source, error=error)


def check_adapter_config(
    config: Any,
    *,
    where: str,
    source: str = f"{CONFIG_FILE} field",
    error: type[ScalerError] = IntegrityError,
) -> dict[str, Any]:
    """Check a parsed ``adapter_config.json``; return the LoraConfig arguments it stands for.

    Refuses (one line, naming the field) every field or value whose loading could touch the
    shared base or leave the plain LoRA path, and every field not known to be harmless.
    ``source``/``error``: how the message names a field, and the error raised.
    """
    if not isinstance(config, dict):
        raise error(f"{where}: {CONFIG_FILE} is not a JSON object")
    refuse = functools.partial(_refuse, where, source=source, error=error)
    for key, value in config.items():
        if key in _FIXED:
            allowed = _FIXED[key]
            if not any(type(value) is type(a) and value == a for a in allowed):
                shown = ", ".join(_short(a) for a in allowed)
                raise refuse(
                    key,
                    f"is {_short(value)}; accepted: {shown} (other values can change the shared base)",
                )
        elif key in _VARIABLE:
            _check_variable(where, key, value, source=source, error=error)
        else:
            raise refuse(key, "is not on the allow-list of LoRA options")
    for key in ("peft_type", "r", "target_modules"):
        if key not in config:
            raise refuse(key, "is missing")
    return {
        "r": config["r"],
        "lora_alpha": config.get("lora_alpha", 8),
        "lora_dropout": config.get("lora_dropout", 0.0),
        "target_modules": list(config["target_modules"]),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "revision": config.get("revision"),
    }


def read_adapter_config(path: Path, *, where: str) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` (see ``check_adapter_config``)."""
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise IntegrityError(f"{where}: {CONFIG_FILE} is over {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where}: {CONFIG_FILE} is not JSON: {type(exc).__name__}: {exc}") from exc
    return check_adapter_config(config, where=where)


def check_members(names: Iterable[str], *, where: str) -> None:
    """A PEFT folder bank holds exactly ``adapter_config.json`` and ``adapter_model.safetensors``."""
    names = set(names)
    extra = sorted(names - PEFT_MEMBERS)
    if extra:
        raise IntegrityError(
            f"{where}: PEFT folder member {extra[0]!r:.80} is not allowed "
            f"(only {CONFIG_FILE} and {WEIGHTS_FILE}: no pickle, no code)"
        )
    missing = sorted(PEFT_MEMBERS - names)
    if missing:
        raise IntegrityError(f"{where}: PEFT folder lacks {missing[0]}")


def lora_config(args: Mapping[str, Any]) -> Any:
    """A fresh ``peft.LoraConfig`` from checked arguments: plain LoRA, default init, nothing else."""
    from peft import LoraConfig

    return LoraConfig(**dict(args))


def adapter_parameter_map(model: Any, adapter_name: str) -> dict[str, Any]:
    """``{key as PEFT saves it: parameter}`` for one adapter's own parameters in ``model``.

    PEFT saves a parameter under its name with the adapter-name component removed
    (``...query.lora_A.<name>.weight`` -> ``...query.lora_A.weight``).
    """
    out: dict[str, Any] = {}
    for pname, param in model.named_parameters():
        parts = pname.split(".")
        if adapter_name in parts:
            out[".".join(p for p in parts if p != adapter_name)] = param
    return out


def load_adapter_weights(model: Any, adapter_name: str, weights: Path, *, where: str) -> None:
    """Copy ``adapter_model.safetensors`` into ``adapter_name``'s own parameters, nothing else.

    Read with safetensors (never pickle). Every tensor must name one of this adapter's
    parameters with its shape and dtype, and every such parameter must be given: a tensor
    naming a base weight (``...query.base_layer.weight``) or anything else is refused.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    targets = adapter_parameter_map(model, adapter_name)
    try:
        with safe_open(str(weights), framework="pt") as fh:
            keys = list(fh.keys())
            extra = sorted(set(keys) - set(targets))
            if extra:
                raise IntegrityError(
                    f"{where}: {WEIGHTS_FILE} holds tensor {extra[0]!r:.120}, which is not one of "
                    "this adapter's LoRA weights (an adapter may not carry base weights)"
                )
            missing = sorted(set(targets) - set(keys))
            if missing:
                raise IntegrityError(
                    f"{where}: {WEIGHTS_FILE} lacks tensor {missing[0]!r:.120} ({len(missing)} missing)"
                )
            tensors = {k: fh.get_tensor(k) for k in keys}
    except SafetensorError as exc:
        raise IntegrityError(f"{where}: {WEIGHTS_FILE} is not safetensors: {exc}".splitlines()[0]) from exc
    for key, tensor in tensors.items():
        param = targets[key]
        if tensor.shape != param.shape or tensor.dtype != param.dtype:
            raise IntegrityError(
                f"{where}: {WEIGHTS_FILE} tensor {key!r:.120} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"the adapter needs {tuple(param.shape)} {param.dtype}"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            targets[key].copy_(tensor)


__all__ = [
    "CONFIG_FILE",
    "PEFT_MEMBERS",
    "WEIGHTS_FILE",
    "adapter_parameter_map",
    "check_adapter_config",
    "check_members",
    "load_adapter_weights",
    "lora_config",
    "read_adapter_config",
]
