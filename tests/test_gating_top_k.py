"""``init_model(top_k=...)`` reaches any gating plugin that names its experts-per-token field.

compose knows no gating plugin (issue 11, item 6): a gating's factory says which config field
``top_k`` fills with a class attribute ``top_k_field`` (the built-in ``topk``: ``"k"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from scaler_wizard import ContentStore, get_plugin_manager, hookimpl, init_model
from scaler_wizard.moe import Gating, Routing, load_balancing_loss


@dataclass
class FirstConfig:
    """Send each token to the first ``experts`` experts, equally weighted."""

    experts: int = field(default=3, metadata={"minimum": 1})
    other: int = 5


class FirstGating(Gating):
    top_k_field = "experts"

    def __init__(self, config: FirstConfig, *, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.k, self.num_experts = config.experts, num_experts
        self.router = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x: Tensor) -> Routing:
        probs = torch.softmax(self.router(x), dim=-1)
        combine = torch.zeros_like(probs)
        combine[:, : self.k] = 1.0 / self.k
        return Routing(combine=combine, aux_loss=load_balancing_loss(probs, combine > 0, self.k), probs=probs)


class NoTopKGating(FirstGating):
    top_k_field = None


class Plugin:
    @hookimpl
    def register_gating(self, register: Any) -> None:
        register("first", FirstGating, config=FirstConfig)
        register("no-top-k", NoTopKGating, config=FirstConfig)


@pytest.fixture
def first_gating() -> Iterator[None]:
    pm = get_plugin_manager()
    pm.register(Plugin(), name="test-first-gating")
    try:
        yield
    finally:
        pm.unregister(name="test-first-gating")


def _gating(store: ContentStore, name: str) -> dict[str, object]:
    config: dict[str, object] = store.get_manifest(store.resolve(name))["trunk"]["layers"][0]["gating"][
        "config"
    ]
    return config


def test_top_k_fills_the_field_the_gating_names(empty_store: ContentStore, first_gating: None) -> None:
    tiny = {"moe_layers": 1, "num_experts": 4, "expert_hidden": 8}
    init_model(empty_store, "first", gating="first", top_k=1, **tiny)
    assert _gating(empty_store, "first") == {"experts": 1, "other": 5}
    # a value the gating config states wins, as for topk's k
    init_model(empty_store, "stated", gating="first", gating_config={"experts": 2}, top_k=1, **tiny)
    assert _gating(empty_store, "stated") == {"experts": 2, "other": 5}
    # a gating that names no such field ignores top_k
    init_model(empty_store, "none", gating="no-top-k", top_k=1, **tiny)
    assert _gating(empty_store, "none") == {"experts": 3, "other": 5}
    # the built-in topk names "k"
    init_model(empty_store, "topk", gating="topk", top_k=3, **tiny)
    assert _gating(empty_store, "topk")["k"] == 3
