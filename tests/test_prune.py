"""``scaler experts prune`` (issue 13 item 3): on a model trained a few steps on real data
(SMS + TREC samples), experts routed below the threshold are removed, the gating rewritten, the
effect measured and recorded, the branches re-recorded on the new trunk; refusals store
nothing; rollback restores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_scaler
from train_helpers import SMS, TREC, copy_store, one_thread, subprocess_env, tiny_template  # noqa: F401

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.hashing import sha256_file
from scaler_wizard.errors import GrowthError
from scaler_wizard.growth import prune_refit
from scaler_wizard.growth.prune import PruneResult, Texts, plan_prune, prune, prune_layer, pruned_trunk
from scaler_wizard.growth.prune_refit import _layer_out, refit_layer, refit_pruned
from scaler_wizard.manifests.facts import trunk_id
from scaler_wizard.modeling.compose import compose, new_trunk_layer
from scaler_wizard.modeling.model import Trunk
from scaler_wizard.modeling.verify import verify_fingerprints, verify_version
from scaler_wizard.moe import MoELayer
from scaler_wizard.training.config import BranchSpec, TrainConfig
from scaler_wizard.training.loop import make_accelerator, plan_run, start_run, train_run
from scaler_wizard.versions.history import rollback

_TRAINED: dict[str, Path] = {}
TEXTS = ["WINNER!! Claim your free prize now", "Who wrote Hamlet?", "see you at 6", "ok"]


def trained_template(factory: pytest.TempPathFactory) -> Path:
    """Model ``tiny`` trained 8 steps on SMS + TREC by ``scaler train`` (v2; its run in
    ``runs/tiny/train-test``)."""
    if "tiny" not in _TRAINED:
        root = factory.mktemp("trained") / "store"
        copy_store(tiny_template(factory), root)
        store = ContentStore.open(root)
        cfg = TrainConfig(steps=8, batch_size=16, eval_every=4, checkpoint_every=4, check_window=4)
        plan = plan_run(store, "tiny", [BranchSpec("spam", SMS), BranchSpec("trec", TREC)], cfg)
        acc = make_accelerator()
        path = start_run(store, plan, run_dir=root / "runs" / "tiny" / "train-test", accelerator=acc)
        train_run(store, path, accelerator=acc)
        _TRAINED["tiny"] = root
    return _TRAINED["tiny"]


@pytest.fixture
def trained(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, one_thread: None) -> ContentStore:  # noqa: F811
    dst = tmp_path / "store"
    copy_store(trained_template(tmp_path_factory), dst)
    return ContentStore.open(dst)


@torch.inference_mode()
def logits_of(store: ContentStore, spec: str) -> dict[str, torch.Tensor]:
    model = compose(store, spec)
    model.eval()
    batch = model.base.tokenize(TEXTS, model.device)
    return {k: v.clone() for k, v in model(**batch).logits.items()}


def threshold_removing_one(store: ContentStore) -> float:
    """A threshold that removes the least used expert of the trunk and at most one per layer."""
    model = compose(store, "tiny")
    model.load_all_branches()
    texts = [line.split(",")[0] for line in SMS.read_text().splitlines()[1:]]
    p = Texts(model, texts, model.branch_names).run(model.trunk)
    shares = [sorted((c / p.tokens).tolist()) for c in p.counts]
    return (min(s[0] for s in shares) + min(s[1] for s in shares)) / 2


def test_prune_layer_keeps_the_chosen_experts_and_their_router_rows() -> None:
    torch.manual_seed(0)
    layer = new_trunk_layer(hidden_size=8, num_experts=4, expert_hidden=6, gating="topk")
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    pruned = prune_layer(layer, [0, 2, 3])
    assert isinstance(pruned, MoELayer) and pruned.num_experts == 3 and pruned.gating.num_experts == 3
    assert pruned.gating_ref == layer.gating_ref
    old, new = layer.state_dict(), pruned.state_dict()
    assert old.keys() == new.keys()
    idx = torch.tensor([0, 2, 3])
    for key in ("w_in", "b_in", "w_out", "b_out", "gating.router.weight", "gating.noise.weight"):
        assert torch.equal(new[key], old[key][idx]), key
    assert torch.equal(new["norm.weight"], old["norm.weight"])
    # a token whose top-k never included expert 1 gets exactly the same output
    layer.eval()
    pruned.eval()
    x = torch.randn(1, 64, 8)
    mask = torch.ones(1, 64, dtype=torch.bool)
    logits = layer.gating.router(layer.norm(x[0]))
    unaffected = (logits.topk(2, dim=-1).indices != 1).all(-1)
    assert unaffected.any()
    a, b = layer(x, mask)[0][0], pruned(x, mask)[0][0]
    assert torch.allclose(a[unaffected], b[unaffected], atol=1e-6)


def _random_layer(num_experts: int = 8) -> MoELayer:
    layer = new_trunk_layer(hidden_size=16, num_experts=num_experts, expert_hidden=12, gating="topk")
    with torch.no_grad():
        for p in (layer.w_in, layer.w_out, layer.b_in, layer.b_out, layer.gating.router.weight):
            torch.nn.init.normal_(p, std=0.3)
    return layer.eval()


def test_the_refit_brings_pruned_layers_back_towards_the_unpruned_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two layers pruned 8 -> 4: the least-squares refit of the kept experts' output
    projections (on 4,000 tokens) cuts the error on 2,000 other tokens by > 30%; a layer
    that kept every expert is left as it was (its own weights solve the system exactly)."""
    torch.manual_seed(0)
    old = Trunk([_random_layer(), _random_layer()], pooling="mean").eval()
    new = Trunk([prune_layer(layer, [0, 2, 5, 7]) for layer in old.layers], pooling="mean").eval()
    fit_x, test_x = torch.randn(4000, 16), torch.randn(2000, 16)
    mask = torch.ones(1, len(test_x), dtype=torch.bool)

    def error(trunk: Trunk) -> float:
        with torch.no_grad():
            want = old(test_x.unsqueeze(0), mask).hidden
            return float((trunk(test_x.unsqueeze(0), mask).hidden - want).pow(2).mean())

    plain = error(new)
    assert refit_pruned(old, new, fit_x) == []
    assert error(new) < 0.7 * plain  # random experts: ~0.5 here (a trained trunk: TREC 54.7 -> 82.0%)
    # nothing removed: the system's exact solution is the layer's own weights
    full = _random_layer()
    copy = prune_layer(full, list(range(8))).eval()
    refit_layer(copy, fit_x, _layer_out(full, fit_x))
    torch.testing.assert_close(copy.w_out, full.w_out, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(copy.b_out, full.b_out, atol=2e-4, rtol=1e-3)
    # a layer with more unknowns than one solve may take is left as it was, and named
    monkeypatch.setattr(prune_refit, "REFIT_MAX_UNKNOWNS", 4 * 13 - 1)
    again = Trunk([prune_layer(layer, [0, 2, 5, 7]) for layer in old.layers], pooling="mean")
    kept = [layer.w_out.clone() for layer in again.layers]
    assert refit_pruned(old, again, fit_x) == [0, 1]
    assert all(torch.equal(layer.w_out, w) for layer, w in zip(again.layers, kept, strict=True))


@pytest.mark.slow
def test_prune_removes_rare_experts_records_the_effect_and_rollback_restores(trained: ContentStore) -> None:
    h2 = str(trained.resolve("tiny"))
    v2 = trained.get_manifest(h2)
    before = logits_of(trained, "tiny")
    x = threshold_removing_one(trained)
    evals = [BranchSpec("spam", SMS), BranchSpec("trec", TREC)]
    result = prune(trained, "tiny", threshold=x, data=SMS, evals=evals)

    h3 = str(trained.resolve("tiny"))
    m = trained.get_manifest(h3)
    assert result.manifest == h3 and m["version"] == 3 and m["parent"] == h2
    assert m["message"].startswith("prune experts below utilization")
    removed = {d["layer"]: d["removed"] for d in result.layers}
    assert sum(len(r) for r in removed.values()) >= 1 and all(len(r) <= 1 for r in removed.values())
    for i, (old, new) in enumerate(zip(v2["trunk"]["layers"], m["trunk"]["layers"], strict=True)):
        assert new["num_experts"] == old["num_experts"] - len(removed[i])
        assert new["gating"] == old["gating"]  # same plugin and config (k, noise, capacity)
        for e in removed[i]:
            assert result.layers[i]["utilization"][e] < x
    # the stored trunk is the pruned one: the old trunk's kept slices, the output projections
    # refit (by default) on the data's tokens
    model2 = compose(trained, h2)
    plans = plan_prune(model2.trunk, *_counts(result), x)
    direct = pruned_trunk(model2.trunk, plans)
    stored = compose(trained, h3).trunk
    assert result.refit is not None and result.refit["tokens"] > 0
    refit_keys = 0
    for (key, a), b in zip(direct.state_dict().items(), stored.state_dict().values(), strict=True):
        _, layer, name = key.split(".", 2)
        if name in ("w_out", "b_out") and removed[int(layer)]:  # a pruned layer's outputs
            refit_keys += 1
            assert a.shape == b.shape and not torch.equal(a, b), key
        else:
            assert torch.equal(a, b), key
    assert refit_keys == 2 * sum(1 for r in removed.values() if r)

    # the effect, measured and recorded; branches re-recorded (not stale) with new fingerprints
    assert set(result.accuracy) == {"spam", "trec"}
    tid = trunk_id(m)
    data_sha = str(sha256_file(SMS))
    for name, entry in m["branches"].items():
        assert entry["trunk"] == tid and "stale" not in entry["provenance"]
        g = entry["provenance"]["growth"][-1]
        assert g["operator"] == "prune" and g["arguments"]["min_utilization"] == x
        assert g["arguments"]["refit"] is True and g["refit"] == result.refit
        assert g["since_version"] == 3 and g["from_trunk"] == v2["branches"][name]["trunk"]
        assert g["data"]["sha256"] == data_sha and g["details"] == result.layers
        assert g["max_abs_delta"] == result.deltas[name] > 0.0
        acc = g["eval"]
        assert 0.0 <= acc["accuracy_before"] <= 1.0 and 0.0 <= acc["accuracy_after"] <= 1.0
        assert acc["accuracy_before"] == pytest.approx(result.accuracy[name]["accuracy_before"])
        assert entry["adapter_bank"] == v2["branches"][name]["adapter_bank"]
    assert not [c for c in verify_version(trained, h3) if not c.ok]
    assert not [c for c in verify_fingerprints(trained, h3) if not c.ok]
    after = logits_of(trained, "tiny")
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 0.0

    # rollback restores what v2 computed, bit for bit
    rollback(trained, "tiny", "2")
    assert str(trained.resolve("tiny")) == h2
    again = logits_of(trained, "tiny")
    assert all(torch.equal(again[k], before[k]) for k in before)


@pytest.mark.slow
def test_texts_are_batched_by_length_and_answer_in_the_order_given(trained: ContentStore) -> None:
    """TEXTS run longest first; Texts batches them shortest first and gives each text's logits
    back in its own row (the accuracy before/after is scored against the labels in file order)."""
    model = compose(trained, "tiny")
    model.load_all_branches()
    texts = Texts(model, TEXTS, model.branch_names)
    assert texts.order == [3, 2, 1, 0]
    got = texts.run(model.trunk).logits
    want = logits_of(trained, "tiny")
    for name in model.branch_names:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def _counts(result: PruneResult) -> tuple[list[torch.Tensor], int]:
    """Routing counts back from a result's utilisation (shares x tokens)."""
    tokens = result.tokens
    return [torch.tensor(d["utilization"], dtype=torch.float64) * tokens for d in result.layers], tokens


@pytest.mark.slow
def test_prune_refusals_store_nothing(trained: ContentStore) -> None:
    h2 = str(trained.resolve("tiny"))
    manifests = set(trained.iter_manifests())
    with pytest.raises(GrowthError, match="fewer than its top-k 2"):
        prune(trained, "tiny", threshold=1.0, data=SMS)
    with pytest.raises(GrowthError, match="nothing to prune"):
        prune(trained, "tiny", threshold=0.0, data=SMS)
    with pytest.raises(GrowthError, match="no branch 'nope'"):
        prune(trained, "tiny", threshold=0.49, data=SMS, evals=[BranchSpec("nope", SMS)])
    assert str(trained.resolve("tiny")) == h2 and set(trained.iter_manifests()) == manifests


@pytest.mark.slow
def test_cli_prune_dry_run_json_and_one_line_error(trained: ContentStore) -> None:
    env = subprocess_env(trained.root)
    h2 = str(trained.resolve("tiny"))
    bad = run_scaler("experts", "prune", "tiny", "--min-utilization", "1", "--data", str(SMS), env=env)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "fewer than its top-k" in lines[0] and "internal error" not in bad.stderr
    ok = run_scaler(
        "experts", "prune", "tiny", "--min-utilization", "0.5", "--data", str(SMS), "--text-column", "text",
        "--eval", f"spam={SMS}", "--dry-run", "--json", env=env,
    )  # fmt: skip
    if ok.returncode != 0 and "fewer than its top-k" in ok.stderr:
        pytest.skip("this trunk's routing keeps fewer than k experts above 0.5 in a layer")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["manifest"] is None and doc["threshold"] == 0.5 and set(doc["accuracy"]) == {"spam"}
    assert set(doc["deltas"]) == {"spam", "trec"} and doc["data_sha256"] == str(sha256_file(SMS))
    assert doc["refit"]["tokens"] > 0 and doc["refit"]["ridge"] > 0
    assert str(trained.resolve("tiny")) == h2
