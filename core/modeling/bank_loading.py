"""Loading a bank into the module its manifest entry builds, refusing one that does not fit.

Shared by ``compose`` (which loads) and ``verify`` (which only checks, on the meta device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.safetensors_bank import read_bank_metadata
from scaler_wizard.errors import IntegrityError, PluginError, ScalerError
from scaler_wizard.modeling.tensor_banks import load_bank_tensors
from scaler_wizard.moe import MoELayer


def call_factory(factory: Any, cfg: Any, where: str, **kwargs: Any) -> Any:
    try:
        return factory(cfg, **kwargs)
    except (ValueError, TypeError) as exc:
        raise PluginError(f"{where}: {exc}") from exc


def check_fit(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], *, bank: str, where: str
) -> None:
    """A one-line error naming the bank and the first tensor that does not fit ``expected``."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise IntegrityError(f"bank {bank} does not fit {where}: {what}")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise IntegrityError(
                f"bank {bank} does not fit {where}: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
        if not value.dtype.is_floating_point:
            raise IntegrityError(f"bank {bank} does not fit {where}: {key} is {value.dtype}")


def load_state(module: nn.Module, tensors: dict[str, torch.Tensor], *, bank: str, where: str) -> None:
    """Strict load with a one-line error naming the bank and the first mismatch."""
    expected = module.state_dict()
    check_fit(expected, tensors, bank=bank, where=where)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def meta_probe(build: Callable[[], Any]) -> Any:
    """The module built on the meta device (no memory), or None for a plugin that cannot."""
    try:
        with torch.device("meta"):
            return build()
    except ScalerError:
        raise
    except Exception:
        return None


def build_from_bank(
    build: Callable[[], Any],
    tensors: dict[str, torch.Tensor],
    *,
    bank: str,
    where: str,
    probe: Any = None,
) -> Any:
    """Build a module and load a bank into it, refusing a bank that does not fit before allocating.

    The module is first built on the meta device (no memory; ``probe`` if the caller already
    has one), so a manifest that declares absurd sizes (``expert_hidden: 10**12``) is a
    one-line error, not an out-of-memory crash.
    """
    if probe is None:
        probe = meta_probe(build)
    if probe is not None:  # else a plugin that cannot build on meta: checked after building for real
        check_fit(probe.state_dict(), tensors, bank=bank, where=where)
    try:
        module = build()
    except (RuntimeError, MemoryError) as exc:
        raise IntegrityError(f"bank {bank} does not fit {where}: {str(exc).splitlines()[0]}") from exc
    load_state(module, tensors, bank=bank, where=where)
    return module


def moe_layer(factory: Any, cfg: Any, spec: dict[str, Any], *, hidden_size: int, where: str) -> MoELayer:
    n = spec["num_experts"]
    gate = call_factory(factory, cfg, f"{where}.gating", hidden_size=hidden_size, num_experts=n)
    return MoELayer(hidden_size, n, spec["expert_hidden"], gate)


def bank_tensors(
    store: ContentStore, h: str, *, kind: str, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A bank's tensors and metadata (its kind checked)."""
    path = store.verified_path(h)
    meta = read_bank_metadata(path, name=h)
    if meta.get("scaler.kind") != kind:
        raise IntegrityError(f"{where}: bank {h} is a {meta.get('scaler.kind')!r} bank, expected {kind!r}")
    return load_bank_tensors(path, name=h), meta
