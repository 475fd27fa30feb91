"""``scaler expand``: function-preserving trunk growth (issue 13 item 2).

Every operator on a model whose trunk is *not* the identity (the session store's ``demo`` has
perturbed expert outputs, norm biases and branches): max |delta logits| <= 1e-5 on every branch,
re-checked from the stored banks; the version's provenance; rollback; refusals store nothing;
the new capacity trains (``scaler train`` after expanding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import _perturb, run_scaler
from train_helpers import SMS, copy_store, one_thread, records, tiny_template  # noqa: F401

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import GrowthError
from scaler_wizard.growth.expand import TOLERANCE, expand, measure
from scaler_wizard.growth.experts import MIN_BIAS, add_experts
from scaler_wizard.growth.operators import AddExperts, AddLayer, Widen
from scaler_wizard.manifests.facts import trunk_id
from scaler_wizard.modeling.compose import compose, new_branch, new_trunk_layer, save_version
from scaler_wizard.modeling.fingerprint import PROBE_TEXTS
from scaler_wizard.modeling.model import ScalerModel, Trunk
from scaler_wizard.modeling.verify import verify_fingerprints, verify_version
from scaler_wizard.moe import MoELayer
from scaler_wizard.versions.history import rollback


@torch.inference_mode()
def logits_of(store: ContentStore, spec: str, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
    model = compose(store, spec)
    batch = model.base.tokenize(list(texts or PROBE_TEXTS), model.device)
    return {k: v.clone() for k, v in model(**batch).logits.items()}


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def objects(store: ContentStore) -> set[str]:
    return {p.name for p in (store.root / "objects").rglob("*") if p.is_file()}


def check_version(store: ContentStore, before: str, op_name: str) -> dict[str, Any]:
    """The head is a new version of ``before`` made by ``op_name``, computing what ``before`` did
    on every branch (re-composed from the stored banks), its branches re-recorded on it."""
    head = store.resolve("demo")
    m = store.get_manifest(head)
    old = store.get_manifest(store.resolve(before) if not before.startswith("sha256:") else before)
    assert m["parent"] == before and m["version"] == old["version"] + 1
    assert m["message"].startswith(f"expand {op_name}:")
    tid = trunk_id(m)
    assert tid != trunk_id(old)
    for name, entry in m["branches"].items():
        assert entry["trunk"] == tid, name
        assert "stale" not in entry["provenance"]
        growth = entry["provenance"]["growth"][-1]
        assert growth["operator"] == op_name and growth["since_version"] == m["version"]
        assert growth["from_trunk"] == old["branches"][name]["trunk"]
        assert growth["max_abs_delta"] <= TOLERANCE
        assert entry["adapter_bank"] == old["branches"][name]["adapter_bank"]
    assert max_delta(logits_of(store, before), logits_of(store, "demo")) <= TOLERANCE
    bad = [c for c in verify_version(store, str(head)) if not c.ok]  # banks fit their entries
    assert not bad, bad
    return m


# -- each operator is function-preserving on a trained-like trunk ----------------------------


def test_add_experts_to_every_layer_preserves_every_branch_and_rollback_restores(store: ContentStore) -> None:
    before = str(store.resolve("demo"))
    old_logits = logits_of(store, "demo")
    result = expand(store, "demo", AddExperts(count=2, seed=1))
    assert result.max_delta <= TOLERANCE and set(result.deltas) == {"spam", "topic"}
    assert result.rerecorded == ["spam", "topic"] and result.manifest == str(store.resolve("demo"))
    m = check_version(store, before, "add-experts")
    assert [layer["num_experts"] for layer in m["trunk"]["layers"]] == [10, 10]
    growth = m["branches"]["spam"]["provenance"]["growth"][-1]
    assert growth["arguments"] == {"layer": None, "count": 2, "seed": 1}
    assert [d["experts_after"] for d in growth["details"]] == [10, 10]
    # the new experts are never chosen on the probe texts (nor on any input: see below)
    model = compose(store, "demo")
    batch = model.base.tokenize(list(PROBE_TEXTS), model.device)
    with torch.inference_mode():
        stats = model(**batch).trunk.stats
    assert all(float(s.load[8:].sum()) == 0.0 for s in stats)

    rollback(store, "demo", str(m["version"] - 1))
    assert str(store.resolve("demo")) == before
    assert max_delta(old_logits, logits_of(store, "demo")) == 0.0


def test_add_experts_to_one_layer_of_a_switch_model(store: ContentStore) -> None:
    from scaler_wizard.modeling.compose import init_model

    init_model(store, "sw", gating="switch", seed=3)
    model = compose(store, "sw")
    _perturb(model.trunk)
    branch = new_branch(hidden_size=384, labels=["ham", "spam"])
    _perturb(branch)
    model.add_branch("spam", branch)
    save_version(store, model, message="perturbed switch")
    before = logits_of(store, "sw")
    result = expand(store, "sw", AddExperts(count=3, layer=1))
    assert result.max_delta <= TOLERANCE
    m = store.get_manifest(store.resolve("sw"))
    assert [layer["num_experts"] for layer in m["trunk"]["layers"]] == [8, 11]
    assert m["branches"]["spam"]["trunk"] == trunk_id(m)
    assert max_delta(before, logits_of(store, "sw")) <= TOLERANCE


def test_add_layer_is_exactly_the_identity(store: ContentStore) -> None:
    before = str(store.resolve("demo"))
    result = expand(store, "demo", AddLayer(at=1))
    assert result.max_delta == 0.0
    m = check_version(store, before, "add-layer")
    layers = m["trunk"]["layers"]
    assert len(layers) == 3 and layers[1]["num_experts"] == layers[0]["num_experts"]
    old = store.get_manifest(before)["trunk"]["layers"]
    assert layers[0]["bank"] == old[0]["bank"]  # the layer before the insertion is unchanged
    assert m["branches"]["topic"]["provenance"]["growth"][-1]["arguments"]["at"] == 1


@pytest.mark.parametrize("method", ["duplicate", "zero"])
def test_widen_preserves_every_branch(store: ContentStore, method: str) -> None:
    before = str(store.resolve("demo"))
    result = expand(store, "demo", Widen(hidden=1000, layer=0, method=method))
    assert result.max_delta <= TOLERANCE
    m = check_version(store, before, "widen")
    assert [layer["expert_hidden"] for layer in m["trunk"]["layers"]] == [1000, 768]


def test_operators_compose_one_after_another(store: ContentStore) -> None:
    v2 = logits_of(store, "demo")
    for op in (AddExperts(count=1, layer=0), Widen(hidden=800), AddLayer(), AddExperts(count=2)):
        expand(store, "demo", op)
    m = store.get_manifest(store.resolve("demo"))
    assert m["version"] == 6
    assert [(la["num_experts"], la["expert_hidden"]) for la in m["trunk"]["layers"]] == [
        (11, 800),
        (10, 800),
        (10, 800),  # the new layer takes its neighbour's shape
    ]
    assert all(len(e["provenance"]["growth"]) == 4 for e in m["branches"].values())
    assert max_delta(v2, logits_of(store, "demo")) <= TOLERANCE


# -- the routing argument holds on any input, not only the probe set -------------------------


def _layer(gating: str, config: dict[str, Any], norm_bias: float) -> MoELayer:
    torch.manual_seed(0)
    layer = new_trunk_layer(
        hidden_size=64, num_experts=6, expert_hidden=32, gating=gating, gating_config=config
    )
    with torch.no_grad():
        layer.w_out.normal_(std=0.1)
        layer.b_out.normal_(std=0.1)
        layer.b_in.normal_(std=0.1)
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.normal_(mean=norm_bias, std=0.02)
        layer.gating.router.weight.normal_(std=0.3)  # type: ignore[union-attr]
    return layer.eval()


@pytest.mark.parametrize(
    ("gating", "config", "norm_bias"),
    [
        ("topk", {"k": 2}, 0.0),  # b = sum(beta / gamma) near 0: the norm bias is moved first
        ("topk", {"k": 1, "noisy": False}, 0.5),  # b usable as it is
        ("topk", {"k": 3}, 0.0),
        ("switch", {}, 0.0),
        ("switch", {}, 0.5),
    ],
)
def test_new_experts_are_never_routed_to_on_any_input(
    gating: str, config: dict[str, Any], norm_bias: float
) -> None:
    layer = _layer(gating, config, norm_bias)
    grown, info = add_experts(layer, 0, 3, generator=torch.Generator().manual_seed(0))
    b = float((layer.norm.bias / layer.norm.weight).sum().detach())
    assert info.after == 9 and (info.norm_bias_moved > 0) == (abs(b) < MIN_BIAS) == (norm_bias == 0.0)
    # random tokens at many scales, plus for each expert the input that minimises its logit
    # (the worst case of the bound) and the one that maximises it
    torch.manual_seed(1)
    x = torch.cat([torch.randn(2000, 64) * s for s in (0.01, 1.0, 100.0)])
    gamma, rows = layer.norm.weight.detach(), layer.gating.router.weight.detach()  # type: ignore[union-attr]
    a = rows * gamma
    a = a - a.mean(1, keepdim=True)
    worst = torch.cat([-a / a.norm(dim=1, keepdim=True), a / a.norm(dim=1, keepdim=True)]) * 8.0
    x = torch.cat([x, worst, worst * 1e3])
    mask = torch.ones(1, x.shape[0], dtype=torch.bool)
    with torch.inference_mode():
        y0, _, _ = layer(x[None], mask)
        y1, _, _ = grown(x[None], mask)
        routing = grown.gating(grown.norm(x))
    assert float(routing.combine[:, 6:].abs().max()) == 0.0
    assert float((y1 - y0).abs().max()) <= 1e-5 * max(1.0, float(y0.abs().max()))


# -- refusals store nothing -----------------------------------------------------------------


class Breaks(Widen):
    """A widening that is *not* function-preserving: it nudges one output weight."""

    def apply(self, trunk: Trunk) -> Trunk:
        grown = super().apply(trunk)
        with torch.no_grad():
            grown.layers[0].w_out[0, 0, 0] += 0.5  # type: ignore[index]
        return grown


def test_a_change_of_function_is_refused_and_nothing_is_stored(store: ContentStore) -> None:
    head, before = store.resolve("demo"), objects(store)
    with pytest.raises(GrowthError) as info:
        expand(store, "demo", Breaks(hidden=1000, layer=0))
    assert "exceeds 1e-05" in str(info.value) and "nothing stored" in str(info.value)
    assert (
        info.value.operator == "widen"
        and info.value.max_delta is not None
        and info.value.max_delta > TOLERANCE
    )
    assert store.resolve("demo") == head and objects(store) == before


def test_operators_it_cannot_apply_exactly_are_refused(store: ContentStore) -> None:
    from scaler_wizard.modeling.compose import init_model

    init_model(store, "capped", gating_config={"capacity_factor": 1.0, "capacity_at_inference": True})
    head, before = store.resolve("capped"), objects(store)
    with pytest.raises(GrowthError, match="capacity limit applies at inference"):
        expand(store, "capped", AddExperts(count=1))
    with pytest.raises(GrowthError, match="not wider"):
        expand(store, "capped", Widen(hidden=10))
    with pytest.raises(GrowthError, match="out of range"):
        expand(store, "capped", AddLayer(at=7))
    with pytest.raises(GrowthError, match="out of range"):
        expand(store, "capped", AddExperts(count=1, layer=2))
    assert store.resolve("capped") == head and objects(store) == before


def test_measure_without_branches_compares_the_trunk(store: ContentStore) -> None:
    model = compose(store, "demo@1")
    assert isinstance(model, ScalerModel) and not model.branch_names
    deltas, _ = measure(model, AddExperts(count=1).apply(model.trunk), list(PROBE_TEXTS))
    assert set(deltas) == {"(trunk)"} and deltas["(trunk)"] <= TOLERANCE


# -- the CLI ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_expand_json_dry_run_errors_and_probe_file(
    store_path: Path, scaler_env: dict[str, str], tmp_path: Path
) -> None:
    probe = tmp_path / "probe.txt"
    probe.write_text("free entry in a weekly competition\n\nhow far is the moon?\n")
    r = run_scaler(
        "expand", "add-experts", "demo", "--layer", "0", "--count", "2", "--dry-run", env=scaler_env
    )
    assert r.returncode == 0 and "nothing stored" in r.stdout, r.stderr
    r = run_scaler(
        "expand", "add-experts", "demo", "--layer", "0", "--probe", str(probe), "--json", env=scaler_env
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == 3 and out["probes"] == 2 and out["probe"] == "file"
    assert out["max_delta"] <= TOLERANCE and out["rerecorded"] == ["spam", "topic"]
    r = run_scaler("expand", "widen", "demo", "--hidden", "900", "--method", "zero", env=scaler_env)
    assert r.returncode == 0, r.stderr
    assert (
        "expanded demo: widen" in r.stdout
        and "max |delta logits|" in r.stdout
        and "undo: scaler rollback demo 3" in r.stdout
    )
    r = run_scaler("expand", "widen", "demo", "--hidden", "10", env=scaler_env)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: widen: --hidden 10 is not wider")
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_scaler("history", "demo", "--json", env=scaler_env)
    assert [v["version"] for v in json.loads(r.stdout)][:3] == [4, 3, 2]


# -- the new capacity trains ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_after_expanding_training_uses_the_new_capacity(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from scaler_wizard.training.config import BranchSpec, TrainConfig
    from scaler_wizard.training.loop import make_accelerator, plan_run, start_run, train_run

    copy_store(tiny_template(tmp_path_factory), tmp_path / "store")
    store = ContentStore.open(tmp_path / "store")
    model = compose(store, "tiny")  # 2 layers x 4 experts (width 32), noisy top-2
    _perturb(model.trunk)  # a trunk that is not the identity
    save_version(store, model, message="perturbed trunk")
    expand(store, "tiny", AddExperts(count=2))  # experts 4, 5 in both layers
    expand(store, "tiny", Widen(hidden=48, method="zero"))  # units 32..47
    expand(store, "tiny", AddLayer())  # layer 2, a fresh one
    grown = compose(store, "tiny")

    config = TrainConfig(steps=12, batch_size=16, eval_every=12, checkpoint_every=12, check_window=4)
    plan = plan_run(store, "tiny", [BranchSpec("spam", SMS)], config)
    acc = make_accelerator()
    train_run(store, start_run(store, plan, run_dir=tmp_path / "run", accelerator=acc), accelerator=acc)
    trained = compose(store, "tiny")

    # the new experts were routed to while training (the exploration noise of their gate rows)
    steps = records(tmp_path / "run")
    for li in (0, 1):
        assert sum(sum(r["expert_load"][li][4:]) for r in steps) > 0, li
    # ... and received gradient: their output projections, all zero before, moved
    for li in (0, 1):
        layer = trained.trunk.layers[li]
        assert (
            float(layer.w_out[4:].detach().abs().sum()) > 0
            and float(layer.b_out[4:].detach().abs().sum()) > 0
        )
        router = layer.gating.router.weight
        assert not torch.equal(router[4:], grown.trunk.layers[li].gating.router.weight[4:])
        # the widened units' output weights (zero-initialised) moved too
        assert float(layer.w_out[:, 32:].detach().abs().sum()) > 0
    # the inserted layer trained: its output projections are no longer zero
    assert float(trained.trunk.layers[2].w_out.detach().abs().sum()) > 0

    # expanding the trained model keeps the fingerprint `scaler train` recorded for its branch
    expand(store, "tiny", AddExperts(count=1, layer=2))
    checks = verify_fingerprints(store, str(store.resolve("tiny")))
    assert [c.what for c in checks] == ["branches.spam.fingerprint"] and all(c.ok for c in checks), checks
