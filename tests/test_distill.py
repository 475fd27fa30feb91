"""``scaler distill`` (issue 14 items 2 and 3): the trunk learns to reproduce its teachers' stored
features through per-teacher adapters and a router; a teacher added later is distilled with the
first frozen (its adapter bank keeps its bytes); damaged or missing feature banks are refused;
a killed run resumes exactly.

Teachers are tiny random BERTs (``test_teachers.make_teacher``) over the small SMS sample; the
student is the tiny trunk of ``train_helpers``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_scaler, tamper_object
from test_teachers import make_teacher
from train_helpers import SMS, copy_store, subprocess_env, tiny_template

from scaler_wizard.banks import ContentStore
from scaler_wizard.distillation.distill import DistillConfig, distill_run, start_distill
from scaler_wizard.distillation.teacher_add import TeacherRequest, add_teacher
from scaler_wizard.errors import DistillError, FeatureBankMismatchError
from scaler_wizard.training.events import TrainEvents

_TEMPLATE: dict[str, Path] = {}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model ``tiny`` with teachers ``a`` and ``b`` (two random BERTs over the SMS sample) and
    the base states of their texts cached."""
    if "t" in _TEMPLATE:
        return _TEMPLATE["t"]
    from scaler_wizard.caches.base_states import cached_states
    from scaler_wizard.distillation.feature_banks import read_texts
    from scaler_wizard.modeling.compose import compose

    root = tmp_path_factory.mktemp("distill-template") / "store"
    copy_store(tiny_template(tmp_path_factory), root)
    store = ContentStore.open(root)
    folder = tmp_path_factory.mktemp("teachers")
    for i, name in enumerate(("a", "b")):
        teacher = make_teacher(folder / name, seed=i + 1)
        request = TeacherRequest(model=str(teacher), layers=[1, -1], data=[SMS], shard_rows=128, device="cpu")
        add_teacher(store, "tiny", name, request)
    model = compose(store, "tiny")
    assert model.origin is not None
    entry = store.manifest(store.resolve("tiny")).teachers["a"]
    cached_states(store, model.base, model.origin.base_entry, read_texts(store, entry.data.texts))
    _TEMPLATE["t"] = root
    return root


@pytest.fixture
def dstore(template: Path, tmp_path: Path) -> Iterator[ContentStore]:
    """A copy of the template; one thread (tiny steps are dominated by thread hand-offs)."""
    root = tmp_path / "store"
    copy_store(template, root)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ContentStore.open(root)
    torch.set_num_threads(before)


def run(store: ContentStore, events: TrainEvents | None = None, **kw: Any) -> Any:
    cfg = DistillConfig(**{"steps": 30, "batch_size": 16, **kw})
    path = start_distill(store, "tiny", cfg)
    return distill_run(store, path, events=events)


def teachers_of(store: ContentStore) -> dict[str, Any]:
    return dict(store.manifest(store.resolve("tiny")).teachers)


def test_distillation_lowers_held_out_feature_loss(dstore: ContentStore) -> None:
    before = teachers_of(dstore)
    result = run(dstore, teachers=["a"], steps=40)
    a = result.teachers["a"]
    assert a["eval_loss_after"] < 0.8 * a["eval_loss_before"], a
    assert result.eval_before["rows"] == 20  # 10% of the 200 texts held out
    # R² from the same predictions: one layer, MSE, so 1 - R² is the loss over a fixed variance
    assert a["explained_before"] < a["explained_after"] <= 1.0
    ratio = (1 - a["explained_before"]) / (1 - a["explained_after"])
    assert ratio == pytest.approx(a["eval_loss_before"] / a["eval_loss_after"], rel=1e-4)
    teachers = teachers_of(dstore)
    adapter = teachers["a"].adapter
    assert adapter is not None and adapter.loss == "mse" and adapter.trunk == result.trunk["new"]
    assert list(adapter.router["teachers"]) == ["a"] and adapter.router["plugin"] == "topk"
    assert teachers["b"] == before["b"]  # not in the run: untouched
    assert result.trunk["new"] != result.trunk["old"]
    # logged like `train`: per-teacher loss and router weights per step, evals before and after
    lines = [json.loads(s) for s in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "train"]
    assert len(steps) == 40 and set(steps[0]["per_teacher_loss"]) == {"a"}
    assert sum(steps[0]["router_hist"]["a"]) == 16
    assert [r["step"] for r in lines if r["event"] == "eval"] == [0, 40]
    # the adapter and router banks are reachable (verify, gc) and checked like every bank
    from scaler_wizard.modeling.verify import verify_version

    checks = verify_version(dstore, dstore.resolve("tiny"))
    fields = {c.what for c in checks if c.ok}
    assert "teachers.a.adapter.bank" in fields and "teachers.a.adapter.router.bank" in fields


def test_explained_variance_is_r2_over_batches() -> None:
    from scaler_wizard.distillation.distill_module import ExplainedVariance

    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 6, generator=g) * torch.arange(1, 7)
    noise = torch.randn(50, 6, generator=g)
    for pred, want in ((y, 1.0), (y.mean(0).expand_as(y), 0.0)):
        ev = ExplainedVariance()
        ev.add({"t": {-1: pred}}, {"t": {-1: y}})
        assert ev.result()["t"] == pytest.approx(want, abs=1e-9)
    whole, parts = ExplainedVariance(), ExplainedVariance()
    whole.add({"t": {-1: y + noise}}, {"t": {-1: y}})
    for lo, hi in ((0, 17), (17, 33), (33, 50)):  # batches of uneven size give the same R²
        parts.add({"t": {-1: (y + noise)[lo:hi]}}, {"t": {-1: y[lo:hi]}})
    one = ExplainedVariance()  # one held-out row: no variance, no R² (not NaN)
    one.add({"t": {-1: y[:1] + 1}}, {"t": {-1: y[:1]}})
    assert one.result() == {}
    sst = ((y - y.mean(0)) ** 2).sum()
    assert parts.result()["t"] == pytest.approx(whole.result()["t"])
    assert whole.result()["t"] == pytest.approx(1 - float((noise**2).sum() / sst))


def test_second_teacher_later_keeps_first_adapter_bytes(dstore: ContentStore) -> None:
    run(dstore, teachers=["a"], steps=10)
    first = teachers_of(dstore)["a"].adapter
    assert first is not None
    first_bytes = dstore.object_path(first.bank).read_bytes()
    result = run(dstore, teachers=["b"], frozen=["a"], steps=10)
    teachers = teachers_of(dstore)
    a, b = teachers["a"].adapter, teachers["b"].adapter
    assert a is not None and b is not None
    assert a.bank == first.bank and dstore.object_path(a.bank).read_bytes() == first_bytes
    assert list(b.router["teachers"]) == ["a", "b"] and a.router == b.router
    assert result.teachers["a"]["frozen"] and not result.teachers["b"]["frozen"]
    assert result.teachers["b"]["eval_loss_after"] < result.teachers["b"]["eval_loss_before"]
    # with the trunk frozen too, the trunk banks keep their bytes
    trunk_before = dstore.manifest(dstore.resolve("tiny")).trunk
    run(dstore, teachers=["b"], frozen=["a"], steps=3, freeze_trunk=True)
    assert dstore.manifest(dstore.resolve("tiny")).trunk == trunk_before


def _loud_teacher(folder: Path, factor: float) -> Path:
    """A tiny random BERT whose every LayerNorm output is ``factor`` times larger: its features,
    and so its MSE, are on another scale than the other teachers'."""
    from safetensors.torch import load_file, save_file

    make_teacher(folder, seed=3)
    weights = load_file(folder / "model.safetensors")
    for k in weights:
        if "LayerNorm" in k:
            weights[k] = weights[k] * factor
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_router_keeps_a_teacher_whose_loss_is_on_a_larger_scale(dstore: ContentStore, tmp_path: Path) -> None:
    request = TeacherRequest(
        model=str(_loud_teacher(tmp_path / "loud", 10.0)),
        layers=[1, -1],
        data=[SMS],
        shard_rows=128,
        device="cpu",
    )
    add_teacher(dstore, "tiny", "loud", request)
    result = run(dstore, teachers=["a", "loud"], steps=40)
    lines = [json.loads(s) for s in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "train"]
    first = steps[0]["per_teacher_loss"]
    assert first["loud"] > 20 * first["a"], first  # the premise: one teacher looks far harder
    late = steps[-10:]
    for name in ("a", "loud"):
        share = sum(r["router_weight"][name] for r in late) / len(late)
        assert share > 0.3, (name, share)  # both keep a real share of the rows
        after, before = result.teachers[name]["eval_loss_after"], result.teachers[name]["eval_loss_before"]
        assert after < before, (name, before, after)
    assert not [r for r in lines if r.get("check") == "router-collapse"]
    assert all(abs(r["router_balance"]) < 0.5 for r in late)


def test_frozen_teacher_needs_an_adapter_and_same_texts_rules(dstore: ContentStore) -> None:
    with pytest.raises(DistillError, match="no adapter to keep frozen"):
        run(dstore, teachers=["b"], frozen=["a"])
    with pytest.raises(DistillError, match="no teacher 'c'"):
        run(dstore, teachers=["c"])
    with pytest.raises(DistillError, match="both trained"):
        DistillConfig(teachers=["a"], frozen=["a"])


def test_damaged_or_missing_feature_bank_is_an_error(dstore: ContentStore) -> None:
    entry = teachers_of(dstore)["a"]
    tamper_object(dstore.object_path(entry.features[0].banks[0]))
    with pytest.raises(FeatureBankMismatchError, match="teacher a"):
        run(dstore, teachers=["a"], steps=2)
    entry_b = teachers_of(dstore)["b"]
    dstore.object_path(entry_b.features[1].banks[-1]).unlink()
    with pytest.raises(FeatureBankMismatchError, match="teacher b"):
        run(dstore, teachers=["b"], steps=2)


class _Killed(Exception):
    pass


class _KillAt(TrainEvents):
    def __init__(self, step: int) -> None:
        self.at = step

    def step(self, record: dict[str, Any]) -> None:
        if record["step"] == self.at:
            raise _Killed


def test_resume_continues_exactly(dstore: ContentStore, tmp_path: Path) -> None:
    other = tmp_path / "other"
    copy_store(dstore.root, other)
    twin = ContentStore.open(other)
    kw: dict[str, Any] = {"teachers": ["a", "b"], "steps": 12, "checkpoint_interval": 5}
    run(twin, **kw)
    cfg = DistillConfig(**{"batch_size": 16, **kw})
    path = start_distill(dstore, "tiny", cfg)
    with pytest.raises(_Killed):
        distill_run(dstore, path, events=_KillAt(8))
    resumed = distill_run(dstore, path, resume=True)
    assert resumed.resumed_from == 5
    ours, theirs = teachers_of(dstore), teachers_of(twin)
    for name in ("a", "b"):
        assert ours[name].adapter.bank == theirs[name].adapter.bank  # type: ignore[union-attr]
        assert ours[name].adapter.router == theirs[name].adapter.router  # type: ignore[union-attr]
    assert dstore.manifest(dstore.resolve("tiny")).trunk == twin.manifest(twin.resolve("tiny")).trunk
    steps = [json.loads(s) for s in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "train"] == list(range(1, 13))


def test_branches_become_stale_only_when_allowed(dstore: ContentStore) -> None:
    from scaler_wizard.training.config import BranchSpec, TrainConfig
    from scaler_wizard.training.loop import plan_run, start_run, train_run

    cfg = TrainConfig(steps=2, batch_size=8)
    plan = plan_run(dstore, "tiny", [BranchSpec("spam", SMS)], cfg)
    from scaler_wizard.training.distributed import make_accelerator

    acc = make_accelerator()
    train_run(dstore, start_run(dstore, plan, run_dir=None, accelerator=acc), accelerator=acc)
    with pytest.raises(DistillError, match="spam"):
        run(dstore, teachers=["a"], steps=2)
    # trained along (--branch): its task loss joins the feature loss; it is recorded on the new trunk
    along = run(dstore, teachers=["a"], steps=4, branches=[BranchSpec("spam", SMS).to_json()])
    spam = dstore.manifest(dstore.resolve("tiny")).branches["spam"]
    assert not (spam.provenance or {}).get("stale") and spam.trunk == along.trunk["new"]
    assert set(along.branches["after"]) == {"spam"} and "accuracy" in along.branches["before"]["spam"]
    assert (spam.provenance or {})["training"]["command"] == "scaler distill"
    run(dstore, teachers=["a"], steps=2, allow_stale_branches=True)
    spam = dstore.manifest(dstore.resolve("tiny")).branches["spam"]
    assert (spam.provenance or {}).get("stale")
    # `verify --deep`: a branch left stale on purpose is reported as such, not as damage
    from scaler_wizard.modeling.verify import verify_fingerprints

    (check,) = [
        c
        for c in verify_fingerprints(dstore, dstore.resolve("tiny"))
        if c.what == "branches.spam.fingerprint"
    ]
    assert check.ok and "stale since v" in check.detail and "scaler train MODEL -b spam=" in check.detail


@pytest.mark.slow
def test_cli_end_to_end(dstore: ContentStore) -> None:
    env = subprocess_env(dstore.root)
    r = run_scaler("distill", "tiny", "--teachers", "a", "--steps", "8", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["teachers"]["a"]["eval_loss_after"] < out["teachers"]["a"]["eval_loss_before"]
    first = teachers_of(dstore)["a"].adapter.bank  # type: ignore[union-attr]
    r = run_scaler(
        "distill",
        "tiny",
        "--teachers",
        "b",
        "--freeze-teachers",
        "a",
        "--steps",
        "4",
        "--loss",
        "cosine",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "held-out loss" in r.stdout and "(frozen)" in r.stdout and "R² " in r.stdout
    assert teachers_of(dstore)["a"].adapter.bank == first  # type: ignore[union-attr]
    again = run_scaler("distill", "tiny", "--resume", out["run_dir"], "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["already_finished"]
    bad = run_scaler("distill", "tiny", "--teachers", "zz", env=env)
    assert bad.returncode != 0 and "no teacher 'zz'" in bad.stderr and "internal error" not in bad.stderr
    assert run_scaler("verify", "tiny", env=env).returncode == 0
