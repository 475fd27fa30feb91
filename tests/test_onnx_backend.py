"""``--backend onnx``: the composed model in onnxruntime, graphs exported once and cached (issue 16).

Most tests use the session store's ``demo`` (branches ``spam`` and ``topic``, a perturbed trunk);
the legacy fixture store adds an in-encoder branch (``enc``, peft-lora: its own graph) and an
``attn-mlp`` branch (reads base layers below the last).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import DATA, _copy_store, run_scaler
from test_legacy_store import _env, _restore

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ExportError
from scaler_wizard.exporting.onnx_backend import OnnxModel, with_backend
from scaler_wizard.exporting.onnx_cache import GRAPH, KIND, SEAL
from scaler_wizard.modeling.compose import compose, new_branch, save_version
from scaler_wizard.modeling.fingerprint import PROBE_TEXTS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TEXTS = [
    *PROBE_TEXTS,
    "Free entry in a weekly competition, text WIN now to 80086",
    "Who wrote Hamlet?",
    "see you at 5",
    "The committee met on Monday to discuss the budget for next year, " * 12,
]


@pytest.fixture(scope="module")
def warm_root(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session store whose ``onnx`` cache holds demo's graphs (exported once here)."""
    root = tmp_path_factory.mktemp("onnx-backend") / "store"
    _copy_store(session_store, root)
    model = OnnxModel.load(ContentStore.open(root), "demo")
    assert sorted(model.exported) == ["shared", "spam", "topic"]
    return root


@pytest.fixture
def warm_copy(warm_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    _copy_store(warm_root, dst)
    return dst


def _torch_logits(model: OnnxModel, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
    batch = model.model.base.tokenize(texts, "cpu")
    with torch.inference_mode():
        out = model.model(**batch, branches=names).logits
    return {n: out[n].numpy() for n in names}


def _onnx_logits(model: OnnxModel, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
    return model.logits(model.model.base.tokenize(texts, "cpu"), names)


def test_onnx_predictions_match_torch(warm_root: Path) -> None:
    store = ContentStore.open(warm_root)
    onnx_model = OnnxModel.load(store, "demo")
    assert onnx_model.exported == []  # every graph from the cache
    names = ["spam", "topic"]
    got, ref = _onnx_logits(onnx_model, TEXTS, names), _torch_logits(onnx_model, TEXTS, names)
    for n in names:
        assert float(np.abs(got[n] - ref[n]).max()) <= 1e-4, n
        assert got[n].argmax(-1).tolist() == ref[n].argmax(-1).tolist(), n
    onnx_preds = onnx_model.predict(TEXTS, names, batch_size=5)
    torch_preds = compose(store, "demo").predict(TEXTS, names, batch_size=5)
    for n in names:
        assert [p.label for p in onnx_preds[n]] == [p.label for p in torch_preds[n]]
        assert max(abs(a.score - b.score) for a, b in zip(onnx_preds[n], torch_preds[n], strict=True)) <= 1e-4
        # the predictions are the graphs' logits, decoded
        probs = torch.softmax(torch.from_numpy(got[n]), -1)
        assert [p.score for p in onnx_model.predict(TEXTS, n)[n]] == probs.max(-1).values.tolist()
    one = onnx_model.predict(TEXTS[0], "spam")
    assert one["spam"].label == onnx_preds["spam"][0].label


def test_per_row_routing_equals_whole_batch(warm_root: Path) -> None:
    onnx_model = OnnxModel.load(ContentStore.open(warm_root), "demo")
    rows = ["spam" if i % 3 else "topic" for i in range(len(TEXTS))]
    routed = onnx_model.predict_rows(TEXTS, rows, batch_size=64)
    whole = onnx_model.predict(TEXTS, ["spam", "topic"], batch_size=64)
    for i, (pred, b) in enumerate(zip(routed, rows, strict=True)):
        assert pred.label == whole[b][i].label
        assert abs(pred.score - whole[b][i].score) <= 1e-6
    both = onnx_model.predict_routed(TEXTS[:3], [["spam", "topic"], "topic", ["spam"]], 2)
    assert [sorted(p) for p in both] == [["spam", "topic"], ["topic"], ["spam"]]


def test_adding_a_branch_leaves_another_branchs_onnx_logits_equal(warm_copy: Path) -> None:
    store = ContentStore.open(warm_copy)
    before = OnnxModel.load(store, "demo", branches=["spam"])
    old = _onnx_logits(before, TEXTS, ["spam"])["spam"]
    model = compose(store, "demo")
    torch.manual_seed(1)
    # attn-mix reads base layers below the last: the shared graph does not change for it
    extra = new_branch(hidden_size=384, labels=["a", "b", "c"], strategy="attn-mix")
    assert extra.adapter.base_layers > 0
    model.add_branch("extra", extra)
    save_version(store, model, message="add extra")
    after = OnnxModel.load(store, "demo")
    assert sorted(after.branch_names) == ["extra", "spam", "topic"]
    assert after.exported == ["extra"]  # the shared graph and spam's tail: the same cached bytes
    new = _onnx_logits(after, TEXTS, ["spam", "extra"])
    assert torch.equal(torch.from_numpy(new["spam"]), torch.from_numpy(old))
    ref = _torch_logits(after, TEXTS, ["extra"])["extra"]
    assert float(np.abs(new["extra"] - ref).max()) <= 1e-4


def _graph_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "cache" / KIND).iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("damage", ["flip", "truncate", "seal"])
def test_a_damaged_cached_graph_is_re_exported_never_used(
    warm_copy: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = ContentStore.open(warm_copy)
    reference = OnnxModel.load(store, "demo", branches=["spam"])
    ref = _onnx_logits(reference, TEXTS, ["spam"])["spam"]
    spam_key = reference._graphs["spam"].key
    folder = store.cache_dir(KIND) / spam_key
    graph = folder / GRAPH
    good = graph.read_bytes()
    if damage == "flip":
        data = bytearray(good)
        data[len(data) // 2] ^= 0x01
        graph.write_bytes(bytes(data))
    elif damage == "truncate":
        graph.write_bytes(good[: len(good) // 2])
    else:
        seal = json.loads((folder / SEAL).read_text())
        seal["bound"]["trunk_id"] = "sha256:" + "0" * 64
        (folder / SEAL).write_text(json.dumps(seal))
    with caplog.at_level(logging.WARNING, logger="scaler_wizard.exporting.onnx_cache"):
        again = OnnxModel.load(store, "demo", branches=["spam"])
    assert again.exported == ["spam"]  # re-exported; the shared graph still from its cache
    assert any("not used" in r.getMessage() for r in caplog.records)
    assert graph.read_bytes() == good  # the same export, sealed again
    assert torch.equal(torch.from_numpy(_onnx_logits(again, TEXTS, ["spam"])["spam"]), torch.from_numpy(ref))
    assert OnnxModel.load(store, "demo", branches=["spam"]).exported == []


def test_a_second_run_hits_the_cache_and_never_exports(
    warm_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("exported although the cache holds the graph")

    monkeypatch.setattr(OnnxModel, "_export", refuse)
    store = ContentStore.open(warm_copy)
    onnx_model = OnnxModel.load(store, "demo")
    assert onnx_model.exported == []
    assert set(onnx_model.predict(["hello"], ["spam", "topic"])) == {"spam", "topic"}
    # a cache that is gone is exported again
    shutil.rmtree(store.cache_dir(KIND))
    with pytest.raises(AssertionError, match="exported although"):
        OnnxModel.load(store, "demo")


def test_unknown_backend_is_one_line(warm_copy: Path) -> None:
    store = ContentStore.open(warm_copy)
    with pytest.raises(ExportError, match="unknown backend 'tensorrt': choose torch, onnx, onnx-int8"):
        with_backend(store, compose(store, "demo"), "tensorrt")
    assert with_backend(store, model := compose(store, "demo"), "torch") is model


def _labelled_csv(path: Path, rows: int = 30) -> Path:
    with (DATA / "samples" / "sms_spam_small.csv").open(newline="") as f:
        data = list(csv.DictReader(f))[:rows]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(data)
    return path


@pytest.mark.slow
def test_cli_predict_and_eval_with_backend_onnx(warm_copy: Path, tmp_path: Path) -> None:
    env = _env(warm_copy)
    texts = TEXTS[:4]
    args = ("predict", "demo", *texts, "-b", "spam", "-b", "topic", "--json")
    torch_out = run_scaler(*args, env=env)
    onnx_out = run_scaler(*args, "--backend", "onnx", env=env)
    assert torch_out.returncode == 0, torch_out.stderr
    assert onnx_out.returncode == 0, onnx_out.stderr
    t, o = json.loads(torch_out.stdout), json.loads(onnx_out.stdout)
    for rt, ro in zip(t, o, strict=True):
        for b in ("spam", "topic"):
            assert rt["predictions"][b]["label"] == ro["predictions"][b]["label"]
            assert abs(rt["predictions"][b]["score"] - ro["predictions"][b]["score"]) <= 1e-4

    data = _labelled_csv(tmp_path / "eval.csv")
    out = tmp_path / "out.jsonl"
    r = run_scaler(
        "predict", "demo", "--data", str(data), "-b", "spam", "-o", str(out), "--backend", "onnx", env=env
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and all(row["spam"] in ("ham", "spam") for row in rows)

    ev = [
        run_scaler("eval", "demo", "-b", "spam", "--data", str(data), "--json", *extra, env=env)
        for extra in ((), ("--backend", "onnx"))
    ]
    assert all(e.returncode == 0 for e in ev), [e.stderr for e in ev]
    te, oe = (json.loads(e.stdout) for e in ev)
    assert te["accuracy"] == oe["accuracy"] and te["confusion_matrix"] == oe["confusion_matrix"]

    bad = run_scaler("predict", "demo", "hi", "-b", "spam", "--backend", "tpu", env=env)
    assert bad.returncode != 0
    assert "unknown backend 'tpu'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_in_encoder_and_base_layer_branches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The legacy model: peft-lora (own graph), lora, attn-mlp (reads base layers); and the
    ``scaler export --format onnx`` graph of the same model gives the same logits."""
    from scaler_wizard.exporting.onnx_check import open_session, session_logits
    from scaler_wizard.exporting.onnx_export import export_onnx

    root = _restore(tmp_path_factory.mktemp("legacy-backend"))
    store = ContentStore.open(root)
    onnx_model = OnnxModel.load(store, "legacy")
    names = onnx_model.branch_names
    assert {onnx_model._graphs[n].role for n in names} == {"own", "tail"}
    got, ref = _onnx_logits(onnx_model, TEXTS, names), _torch_logits(onnx_model, TEXTS, names)
    export = export_onnx(store, "legacy", tmp_path_factory.mktemp("legacy-export") / "out")
    exported = session_logits(
        open_session(export.dest / "model.onnx"), onnx_model.model.base.tokenize(TEXTS, "cpu"), names
    )
    for n in names:
        assert float(np.abs(got[n] - ref[n]).max()) <= 1e-4, n
        assert float(np.abs(got[n] - exported[n]).max()) <= 1e-4, n
        assert got[n].argmax(-1).tolist() == ref[n].argmax(-1).tolist(), n


@pytest.mark.slow
def test_int8_backend_is_cached_and_close(warm_copy: Path) -> None:
    store = ContentStore.open(warm_copy)
    int8 = OnnxModel.load(store, "demo", precision="int8")
    assert sorted(int8.exported) == ["shared", "spam", "topic"]  # quantized from the cached fp32 graphs
    got = _onnx_logits(int8, TEXTS, ["spam", "topic"])
    ref = _torch_logits(int8, TEXTS, ["spam", "topic"])
    for n in ("spam", "topic"):
        assert float(np.abs(got[n] - ref[n]).max()) <= 0.5, n  # int8 weights of an untrained model
    assert OnnxModel.load(store, "demo", precision="int8").exported == []


@pytest.fixture
def onnx_server(warm_copy: Path) -> Iterator[object]:
    from test_serve import _start

    yield from _start(_env(warm_copy), "--backend", "onnx", "--max-wait-ms", "50")


@pytest.mark.slow
def test_serve_with_backend_onnx_answers(onnx_server: object) -> None:
    url, env = onnx_server.url, onnx_server.env  # type: ignore[attr-defined]
    texts = TEXTS[:3]
    r = httpx.post(
        f"{url}/v1/predict", json={"texts": texts, "row_branches": ["spam", "topic", "spam"]}, timeout=60
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    cli = run_scaler("predict", "demo", *texts, "-b", "spam", "-b", "topic", "--json", env=env)
    assert cli.returncode == 0, cli.stderr
    for i, (res, b) in enumerate(zip(results, ["spam", "topic", "spam"], strict=True)):
        want = json.loads(cli.stdout)[i]["predictions"][b]
        assert res["predictions"][b]["label"] == want["label"]
        assert abs(res["predictions"][b]["score"] - want["score"]) <= 1e-4
