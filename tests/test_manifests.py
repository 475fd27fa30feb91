"""Bad manifests are refused with one line naming the field, by the library and by the real CLI.

Every case starts from the real ``demo`` manifest of the session store, mutates it, stores it
as a new version and points ``demo`` at it, then checks that

* ``compose`` (or, for branch banks, which load lazily, the first use of the branch) raises a
  ``ScalerError`` whose ``str()`` is one line naming the field path;
* the CLI (in-process, every case; as a real ``scaler`` subprocess, one case per kind) exits 1
  with exactly one stderr line ``error: ...`` naming the field, and no traceback.

A hypothesis fuzz then mutates the manifest at random: only ScalerErrors (or success) come out.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
from conftest import _copy_store, run_scaler
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.errors import ManifestError, ScalerError
from scaler_wizard.manifests import load_schema, validate_manifest
from scaler_wizard.manifests.validation import field_path
from scaler_wizard.modeling.compose import compose

Manifest = dict[str, Any]
ABSENT = "sha256:" + "0" * 64  # a well-formed bank name no store holds


def current_manifest(store: ContentStore) -> Manifest:
    return copy.deepcopy(store.get_manifest(store.resolve("demo")))


def install(store: ContentStore, manifest: Any) -> BankHash:
    """Store ``manifest`` as a version and point ``demo`` at it (as a writer would)."""
    with store.lock():
        h = store.put_manifest(manifest)
        store.set_ref("demo", h, expected=store.get_ref("demo"), reason="test: bad manifest")
    return h


def assert_one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert isinstance(exc, ScalerError), f"{type(exc).__name__}: {msg}"
    assert msg and "\n" not in msg and msg == msg.strip(), repr(msg)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def assert_cli_error(proc: CompletedProcess[str] | tuple[int, str, str], *needles: str) -> str:
    code, stdout, stderr = (
        (proc.returncode, proc.stdout, proc.stderr) if isinstance(proc, CompletedProcess) else proc
    )
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, (code, stdout, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert stdout == "", stdout
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# -- the cases ------------------------------------------------------------------------------


def put(path: tuple[str | int, ...], value: Any) -> Callable[[Manifest], Manifest]:
    def mutate(m: Manifest) -> Manifest:
        target: Any = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(m) if callable(value) else value
        return m

    return mutate


def drop(path: tuple[str | int, ...]) -> Callable[[Manifest], Manifest]:
    def mutate(m: Manifest) -> Manifest:
        target: Any = m
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return m

    return mutate


def both(*mutations: Callable[[Manifest], Manifest]) -> Callable[[Manifest], Manifest]:
    def mutate(m: Manifest) -> Manifest:
        for f in mutations:
            m = f(m)
        return m

    return mutate


GATING = ("trunk", "layers", 0, "gating")
SPAM = ("branches", "spam")


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Manifest], Any]
    expect: tuple[str, ...]  # substrings of the one-line error: the field path first
    stage: str  # "validate": schema/semantics; "compose": compose refuses; "branch": first use
    real_cli: bool = False  # also run the real `scaler` subprocess (one case per kind)

    @property
    def argv(self) -> list[str]:
        if self.stage == "validate":
            return ["show", "demo"]
        return ["predict", "demo", "-b", "spam", "win a free cruise now"]


CASES = [
    # -- schema and semantics (refused by validate_manifest, so by `scaler show` too) --------
    Case("missing-base", drop(("base",)), ("'base' is required",), "validate", True),
    Case("format-version", put(("format_version",), 2), ("format_version 2",), "validate", True),
    Case("format-version-str", put(("format_version",), "1"), ("format_version",), "validate"),
    Case("format-other", put(("format",), "onnx/manifest"), ("format:",), "validate"),
    Case(
        "bad-hash-pattern",
        put(("trunk", "layers", 0, "bank"), "sha256:" + "AB" * 32),
        ("trunk.layers[0].bank", "not a valid bank hash"),
        "validate",
        True,
    ),
    Case(
        "hash-path-escape",
        put((*SPAM, "adapter_bank"), "sha256:../../../etc/passwd"),
        ("branches.spam.adapter_bank",),
        "validate",
    ),
    Case("labels-empty", put((*SPAM, "labels"), []), ("branches.spam.labels",), "validate", True),
    Case(
        "labels-duplicate",
        put((*SPAM, "labels"), ["ham", "ham"]),
        ("branches.spam.labels", "non-unique"),
        "validate",
    ),
    Case("label-blank", put((*SPAM, "labels"), ["ham", ""]), ("branches.spam.labels[1]",), "validate"),
    Case("v1-with-parent", put(("version",), 1), ("parent:", "version 1"), "validate", True),
    Case("v2-without-parent", put(("parent",), None), ("parent:", "version 2"), "validate"),
    Case("parent-not-a-hash", put(("parent",), "HEAD~1"), ("parent:", "HEAD~1"), "validate"),
    Case("version-zero", put(("version",), 0), ("version:",), "validate"),
    Case("name-path-escape", put(("name",), "../../evil"), ("name:", "../../evil"), "validate", True),
    Case("name-slash", put(("name",), "a/b"), ("name:", "a/b"), "validate"),
    Case("name-trailing-newline", put(("name",), "demo\n"), ("name:", "'demo\\n'"), "validate"),
    Case(
        "hash-trailing-newline",
        put((*SPAM, "head_bank"), lambda m: m["branches"]["spam"]["head_bank"] + "\n"),
        ("branches.spam.head_bank", "not a valid bank hash"),
        "validate",
    ),
    Case(
        "base-file-path-escape",
        put(("base", "files", "../../etc/passwd"), lambda m: m["base"]["files"]["config.json"]),
        ("base.files", "../../etc/passwd"),
        "validate",
    ),
    Case(
        "branch-name-slash",
        put(("branches", "x/../y"), lambda m: m["branches"]["spam"]),
        ("branches", "x/../y"),
        "validate",
    ),
    Case("extra-property", put(("evil",), True), ("'evil' was unexpected",), "validate", True),
    Case(
        "extra-property-nested",
        put(("trunk", "layers", 0, "script"), "rm -rf /"),
        ("trunk.layers[0]", "'script' was unexpected"),
        "validate",
    ),
    Case(
        "hidden-size-type",
        put(("base", "hidden_size"), "384"),
        ("base.hidden_size", "expected integer"),
        "validate",
    ),
    Case(
        "num-experts-float",
        put(("trunk", "layers", 0, "num_experts"), 8.0),
        ("trunk.layers[0].num_experts", "expected integer"),
        "validate",
    ),
    Case(
        "hidden-size-mismatch",
        put(("trunk", "hidden_size"), 512),
        ("trunk.hidden_size", "base.hidden_size"),
        "validate",
        True,
    ),
    Case("pooling-enum", put(("trunk", "pooling"), "max"), ("trunk.pooling",), "validate"),
    Case("gating-config-type", put((*GATING, "config"), []), ("trunk.layers[0].gating.config",), "validate"),
    Case("gating-no-provider", drop((*GATING, "provider")), ("trunk.layers[0].gating",), "validate"),
    Case("config-json-missing", drop(("base", "files", "config.json")), ("base.files",), "validate"),
    Case("top-level-list", lambda m: [m], ("top level",), "validate"),
    # -- plugins and configs (refused by compose, before any bank is read) ---------------------
    Case(
        "unknown-gating-plugin",
        put((*GATING, "plugin"), "nosuch"),
        ("trunk.layers[0].gating.plugin", "'nosuch'", "topk"),
        "compose",
        True,
    ),
    Case(
        "missing-third-party-head",
        both(
            put((*SPAM, "head", "plugin"), "crf"),
            put((*SPAM, "head", "provider"), {"distribution": "scaler-crf", "version": "2.0"}),
        ),
        ("branches.spam.head.plugin", "scaler-crf"),
        "compose",
    ),
    Case(
        "gating-config-value",
        put((*GATING, "config", "k"), 0),
        ("trunk.layers[0].gating.config.k",),
        "compose",
    ),
    Case(
        "gating-config-float-k",
        put((*GATING, "config", "k"), 2.0),
        ("trunk.layers[0].gating.config.k", "expected integer"),
        "compose",
    ),
    Case(
        "gating-config-unknown-key",
        put((*GATING, "config", "bogus"), 1),
        ("trunk.layers[0].gating.config", "'bogus'"),
        "compose",
    ),
    Case("gating-k-too-big", put((*GATING, "config", "k"), 9), ("trunk.layers[0].gating", "k=9"), "compose"),
    Case(
        "head-config-range",
        put((*SPAM, "head", "config", "dropout"), 2),
        ("branches.spam.head.config.dropout",),
        "compose",
    ),
    # -- banks (missing, of the wrong kind, or not fitting what the manifest declares) -------
    Case(
        "branch-bank-missing",
        put((*SPAM, "adapter_bank"), ABSENT),
        ("branches.spam.adapter_bank", ABSENT, "missing"),
        "branch",  # checked at first use: the other branches still serve
        True,
    ),
    Case(
        "trunk-bank-missing",
        put(("trunk", "layers", 1, "bank"), ABSENT),
        ("trunk.layers[1].bank", "missing"),
        "compose",
    ),
    Case(
        "base-file-missing",
        put(("base", "files", "tokenizer.json"), ABSENT),
        ("base.files.tokenizer.json", "missing"),
        "compose",
    ),
    Case(
        "base-file-not-allowed",
        put(("base", "files", "model.safetensors"), lambda m: m["trunk"]["layers"][0]["bank"]),
        ("base.files.model.safetensors",),
        "compose",
    ),
    Case(
        "wrong-kind-base",
        put(("base", "bank"), lambda m: m["trunk"]["layers"][0]["bank"]),
        ("base.bank", "'trunk-layer' bank"),
        "compose",
    ),
    Case(
        "wrong-kind-trunk",
        put(("trunk", "layers", 0, "bank"), lambda m: m["branches"]["spam"]["head_bank"]),
        ("trunk.layers[0]", "'head' bank, expected 'trunk-layer'"),
        "compose",
    ),
    Case(
        "base-hidden-size-lie",
        both(put(("base", "hidden_size"), 512), put(("trunk", "hidden_size"), 512)),
        ("base.hidden_size", "512"),
        "compose",
    ),
    Case(
        "num-experts-shape",
        put(("trunk", "layers", 0, "num_experts"), 4),
        ("trunk.layers[0]", "shape"),
        "compose",
    ),
    Case(
        "expert-hidden-huge",  # refused before allocating 8 x 384 x 10**6 floats (the schema caps 2**20)
        put(("trunk", "layers", 1, "expert_hidden"), 10**6),
        ("trunk.layers[1]", "shape"),
        "compose",
    ),
    Case(
        "wrong-kind-head",
        put((*SPAM, "head_bank"), lambda m: m["branches"]["spam"]["adapter_bank"]),
        ("branches.spam.head_bank", "'adapter' bank, expected 'head'"),
        "branch",
    ),
    Case(
        "labels-count-shape",
        put((*SPAM, "labels"), ["ham", "spam", "eggs"]),
        ("branches.spam.head_bank", "shape"),
        "branch",
        True,
    ),
    Case(
        "lora-rank-shape",
        put((*SPAM, "strategy", "config", "rank"), 16),
        ("branches.spam.adapter_bank", "shape"),
        "branch",
    ),
    Case(
        "lora-rank-huge",
        put((*SPAM, "strategy", "config", "rank"), 2**40),
        ("branches.spam.adapter_bank", "shape"),
        "branch",
    ),
]
KINDS = {c.id for c in CASES if c.real_cli}


def test_cases_cover_the_required_kinds() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(KINDS) >= 10


@pytest.fixture(scope="module")
def real_cli(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the real ``scaler`` for the ``real_cli`` cases, two at a time (each pays the imports)."""
    jobs = {}
    for case in CASES:
        if not case.real_cli:
            continue
        root = tmp_path_factory.mktemp(f"cli-{case.id}") / "store"
        _copy_store(session_store, root)
        store = ContentStore.open(root)
        install(store, case.mutate(current_manifest(store)))
        env = dict(os.environ, SCALER_HOME=str(root), HF_HUB_OFFLINE="1")
        env.pop("SCALER_DEBUG", None)
        jobs[case.id] = (case.argv, env)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {cid: pool.submit(run_scaler, *argv, env=env) for cid, (argv, env) in jobs.items()}
        return {cid: f.result() for cid, f in futures.items()}


def run_cli_in_process(
    argv: list[str], store_path: Path, monkeypatch: Any, capsys: Any
) -> tuple[int, str, str]:
    from scaler_wizard.cli.app import main

    monkeypatch.setenv("SCALER_HOME", str(store_path))
    monkeypatch.delenv("SCALER_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_manifest_is_refused_naming_the_field(
    case: Case, store: ContentStore, store_path: Path, monkeypatch: Any, capsys: Any, request: Any
) -> None:
    bad = case.mutate(current_manifest(store))
    install(store, bad)
    field = case.expect[0]

    if case.stage == "validate":
        with pytest.raises(ManifestError) as info:
            validate_manifest(store.get_manifest(store.resolve("demo")))
        assert_one_line(info.value, *case.expect)
    else:  # schema-valid: the problem is only visible against plugins and banks
        validate_manifest(bad)

    if case.stage == "branch":
        model = compose(store, "demo")  # branches load lazily: composing reads no branch bank
        with pytest.raises(ScalerError) as info:
            model.branch("spam")
    else:
        with pytest.raises(ScalerError) as info:
            compose(store, "demo")
    assert_one_line(info.value, *case.expect)

    assert_cli_error(run_cli_in_process(case.argv, store_path, monkeypatch, capsys), field)
    if case.real_cli:
        assert_cli_error(request.getfixturevalue("real_cli")[case.id], *case.expect)


def test_the_intact_manifest_passes(
    store: ContentStore, store_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """The control: the unmutated manifest validates, composes, and `scaler show` prints it."""
    m = validate_manifest(current_manifest(store))
    assert m["version"] == 2 and sorted(m["branches"]) == ["spam", "topic"]
    model = compose(store, "demo")
    model.load_all_branches()
    code, out, err = run_cli_in_process(["show", "demo"], store_path, monkeypatch, capsys)
    assert code == 0 and "demo v2" in out and err == ""


def test_schema_is_draft_2020_12_and_strict() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert field_path(["branches", "spam", "labels", 0]) == "branches.spam.labels[0]"


# -- fuzz -----------------------------------------------------------------------------------


def paths_of(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths_of(v, (*prefix, i))
    return out


def interesting_values(m: Manifest) -> list[Any]:
    hashes = sorted({v for p in paths_of(m) if isinstance(v := get(m, p), str) and v.startswith("sha256:")})
    return [
        *hashes,
        ABSENT,
        "sha256:../../etc/passwd",
        "../evil",
        "a/b",
        "",
        "topk",
        "switch",
        "linear",
        "multilabel",
        "lora",
        "mean",
        "cls",
        "scaler-wizard",
        0,
        1,
        2,
        4,
        8,
        9,
        16,
        384,
        768,
        2.0,
        8.0,
        384.0,
        -1,
        2**31,
        10**12,
        [],
        {},
        None,
    ]


KEYS = ["model.safetensors", "pytorch_model.bin", "config.json", "../x", "evil", "k", "spam2", "a/b"]


def get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def json_values(m: Manifest) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12)
        | st.sampled_from(interesting_values(m))
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=6) | st.sampled_from(KEYS), children, max_size=3)
        ),
        max_leaves=6,
    )


def mutate_randomly(data: st.DataObject, m: Manifest) -> Any:
    values = json_values(m)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = paths_of(m)
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "add-key"]), label="action")
        if not path:  # the root itself
            if action == "replace":
                m = data.draw(values, label="root")
            continue
        parent, key = get(m, path[:-1]), path[-1]
        if action == "replace":
            parent[key] = data.draw(values, label="value")
        elif action == "delete":
            del parent[key]
        elif isinstance(parent[key], dict):
            parent[key][data.draw(st.text(max_size=8) | st.sampled_from(KEYS), label="key")] = data.draw(
                values, label="value"
            )
        if not isinstance(m, dict):
            break
    return m


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_manifests_give_one_line_errors_or_compose(store: ContentStore, data: st.DataObject) -> None:
    """Random deletions / replacements / additions: a ScalerError or a working model, never a crash."""
    m = mutate_randomly(data, copy.deepcopy(store.get_manifest(store.resolve("demo"))))
    valid = True
    try:
        validate_manifest(m)
    except ManifestError as exc:
        assert_one_line(exc)
        valid = False
    h = store.put_manifest(m)
    try:
        model = compose(store, str(h))
        model.load_all_branches()
    except ScalerError as exc:
        assert_one_line(exc)
        assert valid or isinstance(exc, ManifestError)
        event(f"refused: {type(exc).__name__}")
    else:
        assert valid
        event("composed")


@pytest.mark.parametrize("root", [-1, 7, 2.5, "x", None, [], True])
def test_a_manifest_that_is_not_an_object_is_stored_as_json_and_refused_on_compose(
    store: ContentStore, root: Any
) -> None:
    """Found by the fuzz test: ``(-1).to_bytes()`` was taken for a typed manifest's byte form."""
    h = store.put_manifest(root)
    assert store.manifest_path(h).read_bytes() == (json.dumps(root) + "\n").encode()
    with pytest.raises(ManifestError) as info:
        compose(store, str(h))
    assert_one_line(info.value)
