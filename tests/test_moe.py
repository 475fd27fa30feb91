"""The MoE layer and the built-in gating: routing counts, balance loss, capacity, padding, dispatch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from scaler_wizard.banks import ContentStore
from scaler_wizard.modeling.compose import compose, new_trunk_layer
from scaler_wizard.modeling.tensor_banks import encode_bank
from scaler_wizard.moe import MoELayer, Routing, apply_capacity, load_balancing_loss
from scaler_wizard.plugins.topk_gating import SwitchConfig, SwitchGating, TopKConfig, TopKGating


def topk_gating(d: int, e: int, **config: object) -> TopKGating:
    return TopKGating(TopKConfig(**config), hidden_size=d, num_experts=e)


def set_router(gating: TopKGating | SwitchGating, weight: Tensor) -> None:
    with torch.no_grad():
        gating.router.weight.copy_(weight)


def softmax(row: list[float]) -> list[float]:
    """Plain-Python softmax, so expected values do not reuse the code under test."""
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [v / total for v in exps]


def expected_aux(logits: list[list[float]], assigned: list[list[int]], k: int) -> float:
    """``E * sum_e f_e * P_e`` computed by hand."""
    n, e = len(logits), len(logits[0])
    probs = [softmax(row) for row in logits]
    f = [sum(1 for a in assigned if j in a) / (n * k) for j in range(e)]
    p = [sum(row[j] for row in probs) / n for j in range(e)]
    return e * sum(fj * pj for fj, pj in zip(f, p, strict=True))


def perturbed_layer(d: int = 16, e: int = 4, **gating_config: object) -> MoELayer:
    """A layer whose experts produce non-zero output (a fresh one is the identity)."""
    layer = new_trunk_layer(hidden_size=d, num_experts=e, gating_config=dict(gating_config))
    with torch.no_grad():
        layer.w_out.normal_(std=0.3)
        layer.b_out.normal_(std=0.3)
        layer.b_in.normal_(std=0.3)
    return layer


# -- how many experts each token gets ------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_topk_routes_each_token_to_exactly_k_experts(k: int, training: bool) -> None:
    torch.manual_seed(k)
    gating = topk_gating(16, 6, k=k).train(training)
    x = torch.randn(64, 16)
    routing = gating(x)
    assert isinstance(routing, Routing)
    assert routing.combine.shape == (64, 6)
    assert ((routing.combine > 0).sum(1) == k).all()
    # Without a capacity limit the k weights are a softmax: they sum to 1 per token.
    torch.testing.assert_close(routing.combine.sum(1), torch.ones(64))
    assert routing.dropped == 0
    if not training:  # no noise: the chosen experts are the k largest router logits
        chosen = (routing.combine > 0).nonzero()[:, 1].view(64, k).sort(1).values
        torch.testing.assert_close(chosen, gating.router(x).topk(k, dim=-1).indices.sort(1).values)


@pytest.mark.parametrize("training", [False, True])
def test_switch_routes_each_token_to_one_expert_weighted_by_its_probability(training: bool) -> None:
    torch.manual_seed(1)
    gating = SwitchGating(SwitchConfig(jitter=0.0), hidden_size=16, num_experts=5).train(training)
    x = torch.randn(40, 16)
    routing = gating(x)
    assert ((routing.combine > 0).sum(1) == 1).all()
    probs = torch.softmax(gating.router(x), -1)
    torch.testing.assert_close(routing.combine.sum(1), probs.max(-1).values)
    torch.testing.assert_close(routing.probs, probs)


def test_k_larger_than_num_experts_is_refused() -> None:
    with pytest.raises(ValueError, match="k=5 exceeds num_experts=4"):
        topk_gating(8, 4, k=5)


# -- the load-balancing loss ---------------------------------------------------------------


def test_aux_loss_matches_its_formula_on_hand_made_top1_routing() -> None:
    # Router = 2 * identity: token e_i has logit 2 on expert i, 0 elsewhere, so it goes to i.
    gating = topk_gating(4, 4, k=1, noisy=False).eval()
    set_router(gating, 2 * torch.eye(4))
    x = torch.eye(4)[[0, 0, 0, 1]]  # three tokens to expert 0, one to expert 1
    routing = gating(x)
    assert (routing.combine > 0).nonzero()[:, 1].tolist() == [0, 0, 0, 1]
    logits = (2 * x).tolist()
    expected = expected_aux(logits, [[0], [0], [0], [1]], k=1)
    # Spelled out: f = (3/4, 1/4, 0, 0), P_e = mean router probability of e.
    hi, lo = math.exp(2) / (math.exp(2) + 3), 1 / (math.exp(2) + 3)
    assert expected == pytest.approx(4 * (0.75 * (3 * hi + lo) / 4 + 0.25 * (3 * lo + hi) / 4))
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    assert routing.aux_loss.item() > 1.0  # concentrated routing costs more than uniform


def test_aux_loss_matches_its_formula_on_hand_made_top2_routing() -> None:
    gating = topk_gating(4, 4, k=2, noisy=False).eval()
    set_router(gating, 2 * torch.eye(4))
    pairs = [(0, 1), (0, 1), (2, 3), (0, 2)]
    x = torch.zeros(4, 4)
    for n, (i, j) in enumerate(pairs):
        x[n, i], x[n, j] = 1.0, 0.5  # logits 2 and 1 on i and j, 0 elsewhere
    routing = gating(x)
    assert [set(r.nonzero().flatten().tolist()) for r in routing.combine] == [set(p) for p in pairs]
    expected = expected_aux((2 * x).tolist(), [list(p) for p in pairs], k=2)
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    assert load_balancing_loss(routing.probs, routing.combine > 0, 2).item() == pytest.approx(expected)


@pytest.mark.parametrize(("k", "tokens"), [(1, [[0], [1], [2], [3]]), (2, [[0, 1], [1, 2], [2, 3], [3, 0]])])
def test_aux_loss_is_one_for_perfectly_uniform_routing(k: int, tokens: list[list[int]]) -> None:
    gating = topk_gating(4, 4, k=k, noisy=False).eval()
    set_router(gating, 3 * torch.eye(4))
    x = torch.zeros(4, 4)
    for n, experts in enumerate(tokens):
        x[n, experts] = 1.0
    routing = gating(x)
    assert ((routing.combine > 0).float().sum(0) == k).all()  # every expert equally loaded
    assert routing.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_of_no_tokens_is_zero() -> None:
    assert load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), 2).item() == 0.0


# -- capacity -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_training_capacity_caps_tokens_per_expert(k: int, capacity_factor: float) -> None:
    torch.manual_seed(7)
    n, e = 50, 5
    gating = topk_gating(16, e, k=k, noisy=False, capacity_factor=capacity_factor)
    with torch.no_grad():  # a skewed router, so some experts overflow
        gating.router.weight[0] += 2.0
    x = torch.randn(n, 16) + 1.0
    uncapped = gating.eval()(x)
    capped = gating.train()(x)
    capacity = math.ceil(capacity_factor * n * k / e)
    per_expert = (capped.combine > 0).sum(0)
    assert per_expert.max().item() <= capacity
    assert (uncapped.combine > 0).sum(0).max().item() > capacity  # the cap really bit
    dropped = int((uncapped.combine > 0).sum() - (capped.combine > 0).sum())
    assert capped.dropped == dropped > 0
    assert uncapped.dropped == 0
    # Kept assignments keep their weights; dropped ones are 0, never re-routed elsewhere.
    kept = capped.combine > 0
    torch.testing.assert_close(capped.combine[kept], uncapped.combine[kept])
    assert not (kept & ~(uncapped.combine > 0)).any()
    # The balance loss is computed before the drop.
    torch.testing.assert_close(capped.aux_loss, uncapped.aux_loss)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_switch_capacity_caps_tokens_per_expert(capacity_factor: float) -> None:
    torch.manual_seed(3)
    gating = SwitchGating(SwitchConfig(capacity_factor=capacity_factor), hidden_size=8, num_experts=4)
    with torch.no_grad():
        gating.router.weight[2] += 3.0
    x = torch.randn(30, 8) + 1.0
    routing = gating.train()(x)
    assert (routing.combine > 0).sum(0).max().item() <= math.ceil(capacity_factor * 30 / 4)
    assert routing.dropped == 30 - int((routing.combine > 0).sum())
    assert routing.dropped > 0


def hand_made_capacity_case() -> tuple[TopKGating, Tensor]:
    """k=2 over 3 experts; every token picks experts 0 and 1 with known weights.

    Token (a, 1, 0) has logits (a, 1, 0): weight sigmoid(a - 1) on expert 0, the rest on 1.
    With capacity_factor 0.5 and 5 tokens, capacity is ceil(0.5 * 5 * 2 / 3) = 2.
    """
    gating = topk_gating(3, 3, k=2, noisy=False, capacity_factor=0.5)
    set_router(gating, torch.eye(3))
    a = [1.0, 3.0, 1.0, 2.0, 1.0]
    x = torch.tensor([[v, 1.0, 0.0] for v in a])
    return gating, x


def test_overflow_keeps_largest_weights_and_breaks_ties_by_token_index() -> None:
    gating, x = hand_made_capacity_case()
    assert gating.capacity(5) == 2
    routing = gating.train()(x)
    w = torch.sigmoid(torch.tensor([0.0, 2.0, 1.0]))  # weights on expert 0 for a - 1 = 0, 2, 1
    expected = torch.tensor(
        [
            [0.0, 0.5, 0.0],  # ties at 0.5 on expert 1 (tokens 0, 2, 4): lower indices 0, 2 kept
            [w[1].item(), 0.0, 0.0],  # largest weight on expert 0 kept, its 0.12 on expert 1 dropped
            [0.0, 0.5, 0.0],
            [w[2].item(), 0.0, 0.0],  # second largest on expert 0 kept
            [0.0, 0.0, 0.0],  # token 4 loses both: a tie lost on expert 1, smallest on expert 0
        ]
    )
    torch.testing.assert_close(routing.combine, expected)
    assert routing.dropped == 10 - 4


def test_apply_capacity_rule_directly() -> None:
    combine = torch.tensor(
        [
            [0.5, 0.0],
            [0.7, 0.3],
            [0.5, 0.0],
            [0.5, 1.0],
            [0.0, 0.4],
        ]
    )
    capped, dropped = apply_capacity(combine, 2)
    # expert 0: 0.7 (token 1) then the first 0.5 (token 0); expert 1: 1.0 and 0.4
    expected = torch.tensor([[0.5, 0.0], [0.7, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.4]])
    assert torch.equal(capped, expected)
    assert dropped == 3
    same, none = apply_capacity(combine, 5)
    assert torch.equal(same, combine) and none == 0


def test_eval_drops_nothing_unless_capacity_at_inference() -> None:
    gating, x = hand_made_capacity_case()
    routing = gating.eval()(x)
    assert routing.dropped == 0
    assert ((routing.combine > 0).sum(1) == 2).all()
    torch.testing.assert_close(routing.combine.sum(1), torch.ones(5))

    strict, _ = hand_made_capacity_case()
    strict.config.capacity_at_inference = True
    routing = strict.eval()(x)
    assert routing.dropped == 6
    assert (routing.combine > 0).sum(0).max().item() <= 2


def test_moe_layer_reports_dropped_tokens_and_leaves_them_to_the_residual() -> None:
    gating, x = hand_made_capacity_case()
    # A fresh LayerNorm rescales each row but keeps its order of logits, and identical rows
    # stay identical: the routing is the hand-made one, token 4 loses both its experts.
    layer = MoELayer(3, 3, 8, gating)
    with torch.no_grad():
        layer.w_out.normal_()
        layer.b_out.normal_()
    routings: list[Routing] = []
    gating.register_forward_hook(lambda _m, _a, out: routings.append(out))
    hidden = x.unsqueeze(0)  # (1, 5, 3)
    mask = torch.ones(1, 5, dtype=torch.bool)
    out, _, stats = layer.train()(hidden, mask)
    assert stats.dropped == routings[0].dropped == 6
    assert stats.tokens == 5
    assert (routings[0].combine > 0).sum(0).tolist() == [2, 2, 0]
    assert torch.equal(out[0, 4], hidden[0, 4])  # fully dropped: the residual carries it
    assert not torch.equal(out[0, :4], hidden[0, :4])
    assert layer.eval()(hidden, mask)[2].dropped == 0


# -- the layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("gating", ["topk", "switch"])
def test_fresh_layer_is_exactly_the_identity(gating: str) -> None:
    torch.manual_seed(0)
    layer = new_trunk_layer(hidden_size=32, num_experts=4, gating=gating)
    hidden = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    for training in (False, True):
        out, aux, stats = layer.train(training)(hidden, mask)
        assert torch.equal(out, hidden)
        assert aux.dim() == 0 and torch.isfinite(aux)
        assert stats.tokens == int(mask.sum())


def test_padding_is_not_routed_and_keeps_its_states() -> None:
    torch.manual_seed(0)
    layer = perturbed_layer().eval()
    seen: list[int] = []
    layer.gating.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    hidden = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, _, stats = layer(hidden, mask)
    assert seen == [10]  # only the 10 real tokens reach the router
    assert stats.tokens == 10
    assert torch.equal(out[~mask], hidden[~mask])
    assert not torch.allclose(out[mask], hidden[mask])  # real tokens did move
    # Whatever sits in the padding does not change the real tokens' outputs.
    other = hidden.clone()
    other[~mask] = 1e3
    out2, _, _ = layer(other, mask)
    assert torch.equal(out2[mask], out[mask])
    assert torch.equal(out2[~mask], other[~mask])


def naive_moe(layer: MoELayer, hidden: Tensor, mask: Tensor, combine: Tensor) -> Tensor:
    """Reference: one token at a time, one expert at a time."""
    out = hidden.clone()
    positions = mask.nonzero().tolist()
    for n, (b, t) in enumerate(positions):
        xn = layer.norm(hidden[b, t])
        y = torch.zeros_like(xn)
        for e in range(layer.num_experts):
            w = combine[n, e]
            if w > 0:
                h = torch.nn.functional.gelu(xn @ layer.w_in[e] + layer.b_in[e])
                y = y + w * (h @ layer.w_out[e] + layer.b_out[e])
        out[b, t] = hidden[b, t] + y
    return out


class CountingMoE(MoELayer):
    """Counts expert invocations, to show dispatch is one call per expert, not per token."""

    calls = 0

    def expert(self, index: int, x: Tensor) -> Tensor:
        self.calls += 1
        return super().expert(index, x)


@pytest.mark.parametrize(
    ("config", "training"),
    [({"k": 2}, False), ({"k": 3}, False), ({"k": 2, "noisy": False, "capacity_factor": 0.5}, True)],
)
def test_vectorised_dispatch_equals_a_per_token_reference(config: dict[str, object], training: bool) -> None:
    torch.manual_seed(11)
    gating = topk_gating(16, 4, **config)
    layer = CountingMoE(16, 4, 24, gating).train(training)
    with torch.no_grad():
        layer.w_out.normal_(std=0.3)
        layer.b_out.normal_(std=0.3)
        layer.b_in.normal_(std=0.3)
        layer.norm.weight.normal_(1.0, 0.1)
        layer.norm.bias.normal_(0.0, 0.1)
    routings: list[Routing] = []
    gating.register_forward_hook(lambda _m, _a, out: routings.append(out))
    hidden = torch.randn(3, 9, 16)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        out, _, stats = layer(hidden, mask)
        expected = naive_moe(layer, hidden, mask, routings[0].combine)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert 0 < layer.calls <= 4  # one call per active expert, whatever the number of tokens
    if training:
        assert stats.dropped == routings[0].dropped > 0


# -- training never touches the base -----------------------------------------------------


def test_optimizer_step_leaves_the_base_byte_for_byte(store: ContentStore) -> None:
    torch.manual_seed(0)
    model = compose(store, "demo")
    spam = model.branch("spam")
    base_state = model.base.model.state_dict()
    before = encode_bank(base_state, kind="base").data
    trunk_before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    branch_before = {k: v.clone() for k, v in spam.state_dict().items()}

    model.train()
    assert not model.base.model.training  # the frozen base keeps dropout off
    batch = model.base.tokenize(["win a free prize now", "see you at lunch", "call me"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    out = model(**batch, branches=["spam"])
    loss = spam.head.loss(out.logits["spam"], torch.tensor([1, 0, 0])) + 0.01 * out.trunk.aux_loss
    loss.backward()
    opt.step()

    for name, p in model.base.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
    assert encode_bank(model.base.model.state_dict(), kind="base").data == before
    # ... while the trunk and the branch did learn.
    assert any(not torch.equal(v, trunk_before[k]) for k, v in model.trunk.state_dict().items())
    assert any(not torch.equal(v, branch_before[k]) for k, v in spam.state_dict().items())
    assert all(p.grad is not None for p in spam.parameters())


@pytest.mark.parametrize("gating", ["topk", "switch"])
@pytest.mark.parametrize("factor", [-1, 0, float("nan")])
def test_capacity_factor_must_be_positive(gating: str, factor: float) -> None:
    from scaler_wizard.errors import PluginError
    from scaler_wizard.plugin_manager import get_registry

    reg = get_registry().get("gating", gating)
    with pytest.raises(PluginError, match="capacity_factor must be > 0 or null"):
        reg.build_config({"capacity_factor": factor}, where="--gating-config")
    cfg, _ = reg.build_config({"capacity_factor": 1.25}, where="--gating-config")
    assert cfg.capacity_factor == 1.25


def test_balance_loss_counts_a_chosen_expert_whose_weight_underflows() -> None:
    """A top-2 choice with a logit gap of 200: the second weight is exactly 0 in float32, but it
    was chosen, so the balance loss counts it (``combine > 0`` would not)."""
    gating = topk_gating(2, 3, k=2, noisy=False)
    set_router(gating, torch.tensor([[200.0, 0.0], [0.0, 1.0], [-500.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 2)  # the last two give expert 1 weight
    routing = gating(x)
    assert torch.equal(routing.combine[:2, 1], torch.zeros(2))  # chosen, weight underflowed
    chosen = torch.zeros(4, 3, dtype=torch.bool).scatter(
        1, (x @ gating.router.weight.T).topk(2).indices, True
    )
    assert bool(chosen[:2, 1].all())
    assert torch.equal(routing.aux_loss, load_balancing_loss(routing.probs, chosen, 2))
    assert not torch.equal(routing.aux_loss, load_balancing_loss(routing.probs, routing.combine > 0, 2))
