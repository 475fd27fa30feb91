"""``scaler train``: the recipe on real data (small samples), the stale-branch rule, monitoring,
the quality checks, config parsing, the sampler and the checkpoint format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import SMS, TREC, copy_store, one_thread, records, tiny_template  # noqa: F401
from typer.testing import CliRunner

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.hashing import sha256_file
from scaler_wizard.cli.app import app
from scaler_wizard.errors import DataError, ScalerError
from scaler_wizard.modeling.compose import compose, new_branch, save_version, trunk_id
from scaler_wizard.training.config import (
    BranchSpec,
    TrainConfig,
    TrainConfigError,
    load_config_file,
    parse_branch_option,
)
from scaler_wizard.training.loop import (
    make_accelerator,
    plan_run,
    start_run,
    train_run,
)
from scaler_wizard.training.monitor import QualityChecks
from scaler_wizard.training.multitask import parameter_groups
from scaler_wizard.training.sampler import MixedBatchSampler, sampling_probabilities

SMALL = {"steps": 8, "batch_size": 16, "eval_every": 4, "checkpoint_every": 4, "check_window": 4}


@pytest.fixture
def tiny(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> ContentStore:
    dst = tmp_path / "store"
    copy_store(tiny_template(tmp_path_factory), dst)
    return ContentStore.open(dst)


def run(
    store: ContentStore, specs: list[BranchSpec], run_dir: Path, *, allow_stale: bool = False, **cfg: object
):
    config = TrainConfig(**{**SMALL, **cfg})  # type: ignore[arg-type]
    plan = plan_run(store, "tiny", specs, config, allow_stale_branches=allow_stale)
    acc = make_accelerator()
    path = start_run(store, plan, run_dir=run_dir, accelerator=acc)
    return train_run(store, path, accelerator=acc)


def base_tensors(store: ContentStore, spec: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in compose(store, spec).base.model.state_dict().items()}


@pytest.mark.usefixtures("one_thread")
def test_trains_trunk_on_real_data_and_writes_a_version(tiny: ContentStore, tmp_path: Path) -> None:
    h1 = tiny.resolve("tiny")
    v1 = tiny.get_manifest(h1)
    result = run(tiny, [BranchSpec("spam", SMS), BranchSpec("trec", TREC)], tmp_path / "run")

    # a new version: parent v1, trained trunk banks, both branches with provenance and metrics
    h = tiny.resolve("tiny")
    m = tiny.get_manifest(h)
    assert result.manifest == h and m["version"] == 2 and m["parent"] == h1
    assert [lay["bank"] for lay in m["trunk"]["layers"]] != [lay["bank"] for lay in v1["trunk"]["layers"]]
    assert set(m["branches"]) == {"spam", "trec"}
    for name, entry in m["branches"].items():
        assert entry["trunk"] == trunk_id(m)
        training = entry["provenance"]["training"]
        assert training["command"] == "scaler train" and training["steps"] == 8 and training["seed"] == 0
        assert training["data"] == {"spam": str(sha256_file(SMS)), "trec": str(sha256_file(TREC))}
        assert entry["provenance"]["data"]["sha256"] == training["data"][name]
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0 and entry["fingerprint"]["sha256"].startswith(
            "sha256:"
        )
    assert "train trunk with spam, trec" in m["message"]

    # the base: same bank, and its weights byte for byte what v1 loads
    assert m["base"] == v1["base"]
    before, after = base_tensors(tiny, "tiny@1"), base_tensors(tiny, "tiny@2")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype
        assert (
            before[k].contiguous().view(torch.uint8).numpy().tobytes()
            == after[k].contiguous().view(torch.uint8).numpy().tobytes()
        ), k

    # the log: every step has total, task and aux loss, per-branch loss/accuracy, expert load
    steps = records(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert (
            r["loss"] > 0
            and r["aux_loss"] > 0
            and abs(r["loss"] - r["task_loss"] - 0.01 * r["aux_loss"]) < 1e-5
        )
        assert set(r["branches"]) == {"spam", "trec"} and all(
            b["examples"] >= 1 for b in r["branches"].values()
        )
        assert len(r["expert_load"]) == 2 and all(
            len(row) == 4 and abs(sum(row) - 1) < 1e-6 for row in r["expert_load"]
        )
        assert (
            r["tokens_per_s"] > 0
            and r["peak_memory_mb"] > 0
            and set(r["lr"]) == {"experts", "gating", "adapters", "heads"}
        )
    evals = records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [0, 4, 8]  # before, every eval_every, and the final one
    assert list((tmp_path / "run").glob("events.out.tfevents.*")), "TensorBoard log"
    assert (tmp_path / "run" / "checkpoints" / "step-00000008" / "model.safetensors").is_file()
    assert result.trunk["base_unchanged"] and result.trunk["old"] != result.trunk["new"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["version"] == 2

    # `scaler report` renders the plots
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    pngs = [Path(x) for x in json.loads(res.output)]
    assert [p.name for p in pngs] == ["loss.png", "accuracy.png", "experts.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    # the new version composes and predicts
    out = compose(tiny, "tiny").predict(["WIN a FREE prize now", "Who wrote Hamlet?"])
    assert set(out) == {"spam", "trec"}


@pytest.mark.usefixtures("one_thread")
def test_recipe_parameter_groups_and_warmup(tiny: ContentStore) -> None:
    from scaler_wizard.training.multitask import MultiTaskModule

    model = compose(tiny, "tiny")
    branch = new_branch(hidden_size=384, labels=["a", "b"])
    module = MultiTaskModule(model.trunk, {"x": branch}, ["x"])
    groups = {g["name"]: g for g in parameter_groups(module, TrainConfig())}
    assert {k: g["lr"] for k, g in groups.items()} == {
        "experts": 1e-4,
        "gating": 5e-4,
        "adapters": 5e-4,
        "heads": 1e-3,
    }
    assert all(g["weight_decay"] == 0.01 for g in groups.values())
    n = {k: sum(p.numel() for p in g["params"]) for k, g in groups.items()}
    assert n["gating"] == 2 * 2 * 4 * 384  # router + noise, 2 layers
    assert n["heads"] == 384 * 2 + 2
    assert TrainConfig(steps=100).warmup == 10 and TrainConfig(steps=50_000).warmup == 500


@pytest.mark.usefixtures("one_thread")
def test_refuses_to_leave_branches_stale_unless_allowed(tiny: ContentStore, tmp_path: Path) -> None:
    model = compose(tiny, "tiny")
    model.add_branch("old", new_branch(hidden_size=384, labels=["x", "y"]))
    save_version(tiny, model, message="add old")
    v2 = tiny.get_manifest(tiny.resolve("tiny"))
    with pytest.raises(ScalerError, match="not in this run: old .*--allow-stale-branches"):
        plan_run(tiny, "tiny", [BranchSpec("spam", SMS)], TrainConfig(**SMALL))  # type: ignore[arg-type]

    run(tiny, [BranchSpec("spam", SMS)], tmp_path / "run", allow_stale=True, steps=4)
    m = tiny.get_manifest(tiny.resolve("tiny"))
    old, before = m["branches"]["old"], v2["branches"]["old"]
    assert (old["adapter_bank"], old["head_bank"], old["trunk"]) == (
        before["adapter_bank"],
        before["head_bank"],
        before["trunk"],
    )
    assert old["trunk"] != trunk_id(m) and m["branches"]["spam"]["trunk"] == trunk_id(m)
    assert (
        old["provenance"]["stale"]["since_version"] == 3
        and old["provenance"]["stale"]["trained_on_trunk"] == before["trunk"]
    )
    assert "stale: old" in m["message"]


@pytest.mark.usefixtures("one_thread")
def test_existing_branch_continues_and_labels_must_fit(tiny: ContentStore, tmp_path: Path) -> None:
    run(tiny, [BranchSpec("spam", SMS), BranchSpec("trec", TREC)], tmp_path / "a", steps=2)
    before = tiny.get_manifest(tiny.resolve("tiny"))["branches"]["spam"]
    result = run(tiny, [BranchSpec("spam", SMS), BranchSpec("trec", TREC)], tmp_path / "b", steps=2)
    after = tiny.get_manifest(tiny.resolve("tiny"))["branches"]["spam"]
    assert not result.branches["spam"]["new"] and after["labels"] == before["labels"]
    assert after["adapter_bank"] != before["adapter_bank"]
    # TREC's labels are not spam's: a DataError naming them, before any step
    with pytest.raises(DataError, match="not among the branch's labels"):
        run(tiny, [BranchSpec("spam", TREC), BranchSpec("trec", TREC)], tmp_path / "c", steps=2)


@pytest.mark.usefixtures("one_thread")
def test_collapse_warning_fires_on_contrived_routing(tiny: ContentStore, tmp_path: Path) -> None:
    # Every token's router logits are huge for experts 0 and 1 and zero for 2 and 3: with
    # top-2, experts 2 and 3 never get a token.
    model = compose(tiny, "tiny")
    with torch.no_grad():
        for layer in model.trunk.layers:
            layer.norm.bias.fill_(10.0)
            layer.gating.router.weight.zero_()
            layer.gating.router.weight[0].fill_(1.0)
            layer.gating.router.weight[1].fill_(0.5)
    save_version(tiny, model, message="contrived routing")
    result = run(tiny, [BranchSpec("spam", SMS), BranchSpec("trec", TREC)], tmp_path / "run", steps=4)
    collapse = [w for w in result.warnings if w["check"] == "expert_collapse"]
    assert {w["message"].split(":")[1].strip().split(" got")[0] for w in collapse} >= {
        "layer 0 expert 2",
        "layer 0 expert 3",
    }
    assert records(tmp_path / "run", "warning"), "warnings are in the log too"
    assert all(r["expert_load"][0][2] == 0 and r["expert_load"][0][3] == 0 for r in records(tmp_path / "run"))


def test_quality_checks_on_synthetic_signals() -> None:
    cfg = TrainConfig(check_window=2, grad_spike_factor=5, accuracy_drop=0.05)
    checks = QualityChecks(cfg, num_layers=1)
    fired = []
    for step in range(1, 13):
        fired += checks.after_step(step, grad_norm=1.0, aux_loss=1.0 + 0.1 * step, load_counts=[[5.0, 5.0]])
    assert [w["check"] for w in fired] == ["aux_not_decreasing"] * 5
    assert (
        checks.after_step(13, grad_norm=50.0, aux_loss=1.0, load_counts=[[5, 5]])[0]["check"] == "grad_spike"
    )
    assert checks.after_eval(10, {"spam": 0.9}) == []
    assert checks.after_eval(20, {"spam": 0.8})[0]["check"] == "accuracy_drop"
    state = json.loads(json.dumps(checks.to_json()))
    again = QualityChecks(cfg, num_layers=1)
    again.load_json(state)
    assert again.to_json() == checks.to_json()


def test_branch_option_and_config_file(tmp_path: Path) -> None:
    spec = parse_branch_option(f"spam={SMS}")
    assert (spec.name, spec.data, spec.text_column, spec.label_column) == ("spam", SMS, "text", "label")
    spec = parse_branch_option("trec=data/trec.csv:question:fine")
    assert (spec.data, spec.text_column, spec.label_column) == (Path("data/trec.csv"), "question", "fine")
    for bad in ("spam", "=x.csv", "spam=x.csv:text", "bad name=x.csv"):
        with pytest.raises(ScalerError):
            parse_branch_option(bad)
    (tmp_path / "train.yaml").write_text(
        "steps: 20\nlr_heads: 0.002\nbranches:\n  spam: sms.csv\n  trec:\n    data: /abs/trec.csv\n    label_column: fine\n"
    )
    fields, specs = load_config_file(tmp_path / "train.yaml")
    assert fields == {"steps": 20, "lr_heads": 0.002}
    assert [(s.name, s.data, s.label_column) for s in specs] == [
        ("spam", tmp_path / "sms.csv", "label"),
        ("trec", Path("/abs/trec.csv"), "fine"),
    ]
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(TrainConfigError, match="unknown setting 'stepz'"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(TrainConfigError, match="steps must be >= 1"):
        TrainConfig(steps=0)


def test_cli_errors_are_one_line(tiny: ContentStore, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["--store", str(tiny.root), "train", "tiny"])
    assert res.exit_code == 1 and "no branches to train" in str(res.exception)
    res = runner.invoke(app, ["--store", str(tiny.root), "train", "--resume", str(tmp_path), "--steps", "3"])
    assert res.exit_code == 1 and "--resume continues a run" in str(res.exception)


def test_sampler_mixes_every_branch_with_temperature() -> None:
    sizes = [1000, 100, 10]
    s = MixedBatchSampler(sizes, batch_size=32, temperature=2.0, seed=1, total_steps=400)
    batches = list(s)
    assert len(batches) == 400 and all(len(b) == 32 for b in batches)
    counts = [0, 0, 0]
    for b in batches:
        ks = [0 if i < 1000 else 1 if i < 1100 else 2 for i in b]
        assert set(ks) == {0, 1, 2}  # every batch holds every branch
        for k in ks:
            counts[k] += 1
    p = sampling_probabilities(sizes, 2.0)
    shares = [c / sum(counts) for c in counts]
    assert all(abs(a - b) < 0.02 for a, b in zip(shares, p, strict=True)), (shares, p)
    # without replacement within an epoch: the small dataset cycles through all 10 rows
    small = [i - 1100 for b in batches[:10] for i in b if i >= 1100]
    assert sorted(small[:10]) == list(range(10))
    # resuming from the state after step 150 gives the same batches as going on
    state = json.loads(json.dumps(s.state_after(150)))
    resumed = MixedBatchSampler(sizes, batch_size=32, temperature=2.0, seed=1, total_steps=400, state=state)
    assert list(resumed) == batches[150:]
    with pytest.raises(ValueError, match="smaller than the number of branches"):
        MixedBatchSampler(sizes, batch_size=2, temperature=2.0, seed=0, total_steps=1)


def test_checkpoint_roundtrip_is_exact(tmp_path: Path) -> None:
    import random

    import numpy as np

    from scaler_wizard.training.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        restore_rng,
        save_checkpoint,
    )

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW([{"params": net.parameters(), "lr": 1e-3, "name": "x"}])
    for _ in range(3):
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    for keep_step in (1, 2, 3):
        save_checkpoint(
            tmp_path,
            step=keep_step,
            model=net.state_dict(),
            optimizer=opt.state_dict(),
            state={"k": keep_step},
            keep=2,
        )
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.name == "step-00000003"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    ck = load_checkpoint(path)
    restore_rng(ck.rng["tensors"], ck.rng["meta"])
    # the RNG states were captured when step 3 was saved, just before `draws`: restoring replays them
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
    net2 = torch.nn.Linear(4, 3)
    net2.load_state_dict(ck.model)
    opt2 = torch.optim.AdamW([{"params": net2.parameters(), "lr": 1e-3, "name": "x"}])
    opt2.load_state_dict(ck.optimizer)
    assert ck.state["k"] == 3
    x = torch.randn(5, 4)
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters(), strict=True))


@pytest.mark.usefixtures("one_thread")
def test_base_state_cache_is_keyed_and_exact(tiny: ContentStore) -> None:
    from scaler_wizard.caches.base_states import cache_dir, cached_states

    model = compose(tiny, "tiny")
    assert model.origin is not None
    texts = ["Free entry! Text WIN now", "ok", "Who wrote Hamlet and when was it first performed?"]
    states, hit = cached_states(tiny, model.base, model.origin.base_entry, texts)
    assert not hit and len(states) == 3
    again, hit = cached_states(tiny, model.base, model.origin.base_entry, texts)
    assert hit and torch.equal(again.flat, states.flat) and torch.equal(again.offsets, states.offsets)
    half, hit = cached_states(tiny, model.base, model.origin.base_entry, texts, float16=True)
    assert not hit and half.flat.dtype == torch.float16  # another key, not a stale hit
    assert len(list(cache_dir(tiny).glob("*.safetensors"))) >= 4  # 2 sample splits + these 2
    for i, text in enumerate(texts):  # each example's states are what the base gives it alone
        batch = model.base.tokenize([text])
        alone = model.base(batch["input_ids"], batch["attention_mask"])[0]
        assert states.example(i).shape == alone.shape
        assert torch.allclose(states.example(i), alone, atol=1e-5)
    padded, mask = states.batch([0, 1, 2])
    assert padded.shape[0] == 3 and mask.sum(1).tolist() == [len(states.example(i)) for i in range(3)]


@pytest.mark.usefixtures("one_thread")
def test_a_new_branch_is_checked_against_every_manifest_rule_before_training(
    tiny: ContentStore, tmp_path: Path
) -> None:
    """A label over the manifest's 1,000-character limit: refused in one line when the run
    starts, before any step, not when the trained version is saved."""
    from scaler_wizard.errors import ManifestError

    data = tmp_path / "long_label.csv"
    long = "x" * 1001
    data.write_text(
        "text,label\n" + "".join(f"text number {i},{long if i % 2 else 'short'}\n" for i in range(40))
    )
    before = tiny.resolve("tiny")
    with pytest.raises(ManifestError, match="checked before training") as err:
        run(tiny, [BranchSpec("longlabel", data)], tmp_path / "run")
    assert "\n" not in str(err.value)
    assert tiny.resolve("tiny") == before
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step ran


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"strategy": "peft-lora"}, "keeps its adapter inside the base encoder"),
        ({"head": "multilabel"}, "multi-label heads are not supported by scaler train"),
    ],
)
def test_branches_a_run_cannot_train_are_refused_before_any_step(
    tiny: ContentStore, tmp_path: Path, spec: dict[str, str], fragment: str
) -> None:
    before = tiny.resolve("tiny")
    with pytest.raises(ScalerError, match=fragment):
        run(tiny, [BranchSpec("new", SMS, **spec)], tmp_path / "run")  # type: ignore[arg-type]
    assert tiny.resolve("tiny") == before
    assert not (tmp_path / "run" / "checkpoints").exists()
