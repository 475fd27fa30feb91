"""The encoder-host protocol: what an in-encoder branch strategy may use of the base encoder.

Part of the public plugin API (``docs/plugins.md``). A branch strategy that changes what the
frozen base encoder computes (LoRA inside attention, as the built-in ``peft-lora`` does, a
prompt, a shift of the embeddings...) receives the model's base encoder as an
``EncoderHost`` in ``BranchAdapter.attach``/``detach``/``import_folder``/``export_folder``/
``trainable_parameters``. It may:

* inject modules into ``host.model``, the wrapped ``transformers`` model (its own weights are
  frozen and must stay as they are: nothing a branch does may change another branch);
* read ``host.hidden_size`` and ``host.device``;
* keep its in-encoder adapters behind one ``AdapterSwitch``, registered once per host under a
  key of its choosing (``add_adapter_switch``) and found again with ``adapter_switch``.

The host runs every base pass inside the switches' ``active`` contexts: the shared pass with
every adapter off (``active(None)`` on each switch), a branch's own pass (its strategy sets
``needs_base_pass``) with that branch's adapter on and every other adapter off. A pass for a
branch that no switch ``holds`` is refused.

Importing this module costs nothing (no torch): the types below are for type checkers.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn


@runtime_checkable
class AdapterSwitch(Protocol):
    """Turns one plugin's in-encoder adapters on and off around a base pass."""

    def holds(self, branch: str) -> bool:
        """Whether this switch has an adapter for ``branch`` (attached or loaded)."""
        ...

    def active(self, branch: str | None) -> AbstractContextManager[Any]:
        """A context in which ``branch``'s adapter is on and every other adapter of this
        switch is off; ``None``: every adapter of this switch off. Leaving the context may
        restore what was before, or not (the host enters it again before each pass)."""
        ...


@runtime_checkable
class EncoderHost(Protocol):
    """The frozen base encoder, as an in-encoder strategy sees it."""

    @property
    def model(self) -> nn.Module:
        """The wrapped ``transformers`` model (e.g. a ``BertModel``); frozen, always eval."""
        ...

    @property
    def hidden_size(self) -> int:
        """Width of the encoder's token states (``model.config.hidden_size``)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are."""
        ...

    def adapter_switch(self, key: str) -> AdapterSwitch | None:
        """The switch registered under ``key``, or None."""
        ...

    def add_adapter_switch(self, key: str, switch: AdapterSwitch) -> None:
        """Register a switch under ``key`` (once per host: a second one under a key is an error)."""
        ...


__all__ = ["AdapterSwitch", "EncoderHost"]
