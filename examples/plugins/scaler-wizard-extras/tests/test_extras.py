"""Tests of scaler-wizard-extras, written against scaler-wizard's public API only."""

from __future__ import annotations

from importlib import metadata

import pytest
import scaler_wizard_extras
import torch
import typer
from scaler_wizard_extras.expert_choice import ExpertChoiceConfig, ExpertChoiceGating
from typer.testing import CliRunner

from scaler_wizard import get_registry, new_branch, new_trunk_layer
from scaler_wizard.branch import TrunkOutput

D, E = 16, 4


def _trunk(pooled: torch.Tensor) -> TrunkOutput:
    b = pooled.shape[0]
    return TrunkOutput(
        pooled=pooled,
        hidden=pooled[:, None, :],
        mask=torch.ones(b, 1, dtype=torch.bool),
        aux_loss=pooled.new_zeros(()),
    )


def test_entry_point_is_declared() -> None:
    (ep,) = [ep for ep in metadata.entry_points(group="scaler_wizard") if ep.name == "extras"]
    assert ep.value == "scaler_wizard_extras"
    assert ep.dist is not None and ep.dist.version == scaler_wizard_extras.__version__


def test_scaler_wizard_registers_everything_with_its_provider() -> None:
    registry = get_registry()
    for kind, name in [
        ("gating", "expert-choice"),
        ("head", "cosine"),
        ("strategy", "bottleneck"),
        ("store", "tmp"),
    ]:
        reg = registry.get(kind, name)
        assert reg.provider() == {"distribution": "scaler-wizard-extras", "version": "0.2.0"}
    schema = registry.get("gating", "expert-choice").schema()
    assert schema["properties"]["capacity_factor"] == {
        "type": "number",
        "description": "tokens per expert as a multiple of N/E: on average a token gets this many experts",
        "exclusiveMinimum": 0,
        "default": 2.0,
    }


@pytest.mark.parametrize(
    ("n", "capacity_factor", "c"), [(10, 2.0, 5), (10, 1.0, 3), (1, 2.0, 1), (3, 8.0, 3)]
)
def test_each_expert_takes_its_top_c_tokens(n: int, capacity_factor: float, c: int) -> None:
    torch.manual_seed(0)
    gate = ExpertChoiceGating(
        ExpertChoiceConfig(capacity_factor=capacity_factor), hidden_size=D, num_experts=E
    )
    x = torch.randn(n, D)
    routing = gate(x)
    assert routing.combine.shape == (n, E)
    assert ((routing.combine > 0).sum(0) == c).all()  # every expert does the same work
    per_token = (routing.combine > 0).sum(1)
    assert per_token.min() >= 0 and per_token.max() <= E
    assert routing.dropped == int((per_token == 0).sum())
    chosen = routing.combine > 0
    assert torch.equal(routing.combine[chosen], routing.probs[chosen])  # weight = router probability
    for e in range(E):  # the chosen tokens are the expert's highest-probability ones
        others = routing.probs[~chosen[:, e], e]
        if others.numel():
            assert routing.probs[chosen[:, e], e].min() >= others.max()
    assert routing.aux_loss.item() == 0.0


def test_expert_choice_trains_the_router_and_handles_no_tokens() -> None:
    gate = ExpertChoiceGating(ExpertChoiceConfig(entropy_weight=0.5), hidden_size=D, num_experts=E)
    routing = gate(torch.randn(6, D))
    assert routing.aux_loss.item() > 0
    (routing.combine.sum() + routing.aux_loss).backward()
    assert gate.router.weight.grad is not None and gate.router.weight.grad.abs().sum() > 0
    empty = gate(torch.randn(0, D))
    assert empty.combine.shape == (0, E) and empty.aux_loss.item() == 0.0


def test_trunk_layer_with_expert_choice_records_a_complete_config() -> None:
    layer = new_trunk_layer(
        hidden_size=D, num_experts=E, gating="expert-choice", gating_config={"capacity_factor": 1.0}
    )
    assert layer.gating_ref is not None
    assert layer.gating_ref.config_dict() == {"capacity_factor": 1.0, "entropy_weight": 0.0}
    hidden, mask = torch.randn(2, 5, D), torch.ones(2, 5, dtype=torch.bool)
    out, aux, stats = layer(hidden, mask)
    assert out.shape == hidden.shape and stats.tokens == 10


def test_bottleneck_branch_with_cosine_head_starts_at_identity_and_learns() -> None:
    torch.manual_seed(0)
    branch = new_branch(
        hidden_size=D,
        labels=["a", "b"],
        strategy="bottleneck",
        strategy_config={"size": 4, "activation": "tanh"},
        head="cosine",
        head_config={"scale": 5.0},
    )
    assert branch.entry["head"]["config"] == {"scale": 5.0, "learn_scale": True, "dropout": 0.0}
    x = torch.randn(32, D)
    y = (x[:, 0] > 0).long()
    trunk = _trunk(x)
    assert torch.equal(branch.adapter(trunk), x)  # zero-initialised up-projection
    logits = branch(trunk)
    assert logits.shape == (32, 2) and logits.abs().max() <= 5.0 + 1e-5
    opt = torch.optim.Adam(branch.parameters(), lr=0.05)
    first = branch.head.loss(branch(trunk), y).item()
    for _ in range(30):
        opt.zero_grad()
        branch.head.loss(branch(trunk), y).backward()
        opt.step()
    assert branch.head.loss(branch(trunk), y).item() < first
    assert branch.predict(trunk)[0].label in ("a", "b")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head": "cosine", "head_config": {"scale": 0}}, "scale"),
        ({"strategy": "bottleneck", "strategy_config": {"activation": "swish"}}, "activation"),
        ({"strategy": "bottleneck", "strategy_config": {"width": 8}}, "width"),
    ],
)
def test_invalid_configs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        new_branch(hidden_size=D, labels=["a", "b"], **kwargs)


def test_tmp_store_is_one_store_per_name() -> None:
    open_tmp = get_registry().get("store", "tmp").factory
    store = open_tmp("tmp://a")
    assert open_tmp("tmp://a") is store and open_tmp("tmp://b") is not store
    h = store.put_bytes(b"hello")
    assert store.has(h) and store.read_bytes(h) == b"hello"


def test_expert_usage_command_is_added_to_the_cli() -> None:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """A stand-in for the `scaler` root app."""

    scaler_wizard_extras.register_commands(cli=app)
    result = CliRunner().invoke(app, ["expert-usage", "--help"])
    assert result.exit_code == 0, result.output
    assert "expert-usage" in result.output and "gating" in result.output
