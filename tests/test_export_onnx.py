"""``scaler export --format onnx``: base + MoE trunk + branches as one checked ONNX graph (issue 16).

The legacy fixture store's model has a trained (non-identity) trunk and one branch of each
built-in kind: ``enc`` (peft-lora: its own encoder pass), ``lin``/``seed`` (lora) and ``spam``
(attn-mlp, the default of ``branch add``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, run_scaler
from test_legacy_store import _env, _restore

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ExportError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TEXTS = [
    "Free entry in a weekly competition, text WIN now to 80086",
    "Who wrote Hamlet?",
    "see you at 5",
    "The committee met on Monday to discuss the budget for next year, " * 12,
]


@pytest.fixture(scope="module")
def legacy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _restore(tmp_path_factory.mktemp("legacy"))


@pytest.fixture(scope="module")
def exported(legacy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``legacy`` exported (fp32, every branch) through the Python API."""
    from scaler_wizard.exporting.onnx_export import export_onnx

    dest = tmp_path_factory.mktemp("onnx") / "out"
    result = export_onnx(ContentStore.open(legacy_root), "legacy", dest)
    assert [b.name for b in result.branches] == ["enc", "lin", "seed", "spam"]
    assert result.max_abs_diff <= 1e-4
    return dest


def _eval_csv(path: Path, rows: int = 40) -> Path:
    with (DATA / "samples" / "sms_spam_small.csv").open(newline="") as f:
        data = list(csv.DictReader(f))[:rows]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(data)
    return path


@pytest.mark.slow
def test_onnx_graph_matches_torch_for_every_branch_kind(legacy_root: Path, exported: Path) -> None:
    import onnxruntime as ort

    from scaler_wizard import compose
    from scaler_wizard.exporting.onnx_export import EXPORTER_VERSION
    from scaler_wizard.exporting.peft_export import _trunk_is_identity

    store = ContentStore.open(legacy_root)
    manifest = store.manifest(store.resolve("legacy"))
    assert not _trunk_is_identity(store, manifest)  # the trunk really computes something
    assert {manifest.branches[b].strategy.plugin for b in manifest.branches} == {
        "peft-lora",
        "lora",
        "attn-mlp",
    }

    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(isinstance(i.shape[0], str) and isinstance(i.shape[1], str) for i in inputs)  # dynamic axes
    assert [o.name for o in session.get_outputs()] == [
        "logits_enc",
        "logits_lin",
        "logits_seed",
        "logits_spam",
    ]

    model = compose(store, "legacy")
    for texts in (TEXTS, TEXTS[:1], TEXTS[1:3] * 5):  # new texts, other batch and sequence sizes
        batch = model.base.tokenize(texts)
        with torch.inference_mode():
            ref = model(**batch, branches=["enc", "lin", "seed", "spam"]).logits
        got = session.run(None, {k: v.numpy() for k, v in batch.items()})
        for name, out in zip(["enc", "lin", "seed", "spam"], got, strict=True):
            assert out.shape == tuple(ref[name].shape)
            assert np.abs(out - ref[name].numpy()).max() <= 1e-4, name

    # the tokenizer beside the graph, and the facts in the graph and in export.json
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (exported / name).is_file()
    assert not (exported / "model.int8.onnx").exists()
    info = json.loads((exported / "export.json").read_text())
    assert (
        info["manifest_hash"] == str(store.resolve("legacy")) and info["exporter_version"] == EXPORTER_VERSION
    )
    assert {b["name"]: b["labels"] for b in info["branches"]} == {
        b: list(manifest.branches[b].labels) for b in manifest.branches
    }
    assert all(b["max_abs_diff"] <= 1e-4 for b in info["branches"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["scaler.manifest"] == info["manifest_hash"]
    assert meta["scaler.exporter_version"] == str(EXPORTER_VERSION) and meta["scaler.precision"] == "fp32"
    assert json.loads(meta["scaler.labels.enc"]) == ["ham", "spam"]
    assert set(json.loads(meta["scaler.branches"])) == {"enc", "lin", "seed", "spam"}
    assert not list(exported.parent.glob(".out.export-*"))


def _unexportable(self: torch.nn.Module, trunk: object) -> torch.Tensor:
    if torch.jit.is_tracing():
        raise RuntimeError("this strategy has no ONNX form")
    return trunk.pooled  # type: ignore[attr-defined,no-any-return]


def _traced_wrong(self: torch.nn.Module, trunk: object) -> torch.Tensor:
    x = trunk.pooled  # type: ignore[attr-defined]
    return x * float(x.abs().max())  # a Python float: the tracer freezes the example's value


@pytest.mark.slow
@pytest.mark.parametrize(
    ("forward", "expect"),
    [(_unexportable, "no ONNX form"), (_traced_wrong, "differs from the torch model")],
)
def test_a_branch_that_does_not_export_is_refused_by_name(
    legacy_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forward: object, expect: str
) -> None:
    from scaler_wizard.exporting.onnx_export import export_onnx
    from scaler_wizard.plugins.pooled_lora import PooledLoRA

    monkeypatch.setattr(PooledLoRA, "forward", forward)
    with pytest.raises(ExportError) as info:
        export_onnx(ContentStore.open(legacy_root), "legacy", tmp_path / "out", branches=["spam", "lin"])
    message = str(info.value)
    assert "\n" not in message and "'lin'" in message and "'lora'" in message and expect in message
    assert list(tmp_path.iterdir()) == []  # no DEST, no staging folder


def test_onnx_export_refuses_a_non_empty_dest_and_unknown_branch(legacy_root: Path, tmp_path: Path) -> None:
    from scaler_wizard.errors import BranchNotFoundError
    from scaler_wizard.exporting.onnx_export import export_onnx

    store = ContentStore.open(legacy_root)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_onnx(store, "legacy", dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    with pytest.raises(BranchNotFoundError, match="nope"):
        export_onnx(store, "legacy", tmp_path / "new", branches=["nope"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_onnx_export_cli_round_trip_with_int8_accuracy(legacy_root: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    env = _env(legacy_root)
    dest = tmp_path / "out"
    eval_file = _eval_csv(tmp_path / "sms.csv")
    proc = run_scaler(
        "export",
        "legacy",
        str(dest),
        "--format",
        "onnx",
        "-b",
        "spam,enc",
        "--int8",
        "--eval-data",
        str(eval_file),
        "--json",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert [b["branch"] for b in shown["exported"]] == ["spam", "enc"]
    assert shown["max_abs_diff"] <= 1e-4 and shown["int8"] is True
    info = json.loads((dest / "export.json").read_text())
    for b in info["branches"]:
        acc = b["accuracy"]["sms.csv"]
        assert acc["rows"] == 40 and 0 <= acc["fp32"] <= 1 and 0 <= acc["int8"] <= 1
        assert acc["change"] == pytest.approx(acc["int8"] - acc["fp32"])
        assert b["int8_max_abs_diff"] is not None
    assert {b["branch"]: b["accuracy"] for b in shown["exported"]} == {
        b["name"]: b["accuracy"] for b in info["branches"]
    }
    q = ort.InferenceSession(str(dest / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in q.get_outputs()] == ["logits_spam", "logits_enc"]
    meta = q.get_modelmeta().custom_metadata_map
    assert meta["scaler.precision"] == "int8"
    assert "accuracy" in json.loads(meta["scaler.branches"])["spam"]

    plain = run_scaler("export", "legacy", str(tmp_path / "plain"), "--format", "onnx", "-b", "lin", env=env)
    assert plain.returncode == 0, plain.stderr
    assert "max |Δ logits|" in plain.stdout and "lin (lora): logits_lin" in plain.stdout

    refused = run_scaler("export", "legacy", str(tmp_path / "x"), "--int8", env=env)
    assert refused.returncode == 2 and "--format onnx" in refused.stderr
    mismatch = _eval_csv(tmp_path / "trec.csv")
    mismatch.write_text("text,label\nWho wrote Hamlet?,HUM\nWhere is Rome?,LOC\n")
    bad = run_scaler(
        "export",
        "legacy",
        str(tmp_path / "y"),
        "--format",
        "onnx",
        "-b",
        "spam",
        "--eval-data",
        str(mismatch),
        env=env,
    )
    assert bad.returncode == 1 and "trec.csv" in bad.stderr and "internal error" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    assert not (tmp_path / "y").exists()


@pytest.fixture
def extras_plugin(monkeypatch: pytest.MonkeyPatch) -> object:
    """The example third-party plugin (examples/plugins/scaler-wizard-extras), registered in process."""
    from conftest import REPO

    from scaler_wizard.plugin_manager import get_host

    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugins" / "scaler-wizard-extras" / "src"))
    import scaler_wizard_extras

    pm = get_host().pm
    pm.register(scaler_wizard_extras, name="extras-onnx-test")
    yield scaler_wizard_extras
    pm.unregister(name="extras-onnx-test")


def _perturbed_model(store: ContentStore, name: str, gating: str) -> None:
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    init_model(store, name, gating=gating, moe_layers=1, num_experts=4, seed=0)
    model = compose(store, name)
    torch.manual_seed(0)
    branch = new_branch(hidden_size=384, labels=["a", "b"], strategy="bottleneck", head="cosine")
    with torch.no_grad():
        for p in [*model.trunk.parameters(), *branch.parameters()]:
            if p.dim() > 0 and not bool(p.count_nonzero()):
                p.normal_(std=0.05)
    model.add_branch("bn", branch)
    save_version(store, model, message="third-party branch")


@pytest.mark.slow
def test_a_third_party_plugin_branch_exports_and_a_batch_dependent_gating_is_refused(
    extras_plugin: object, empty_store: ContentStore, tmp_path: Path
) -> None:
    from scaler_wizard.exporting.onnx_export import export_onnx

    out = tmp_path / "exports"
    _perturbed_model(empty_store, "third", "topk")
    result = export_onnx(empty_store, "third", out / "ok")
    assert [(b.name, b.strategy, b.head) for b in result.branches] == [("bn", "bottleneck", "cosine")]
    assert result.max_abs_diff <= 1e-4

    # expert-choice sizes each expert's capacity from the batch's token count in Python: the
    # tracer freezes it, the check sees the trunk differ and names the gating
    _perturbed_model(empty_store, "chooser", "expert-choice")
    with pytest.raises(ExportError) as info:
        export_onnx(empty_store, "chooser", out / "no")
    message = str(info.value)
    assert "\n" not in message and "'expert-choice'" in message and "MoE trunk" in message
    assert sorted(p.name for p in out.iterdir()) == ["ok"]
