"""Fuzz: 1,200 seeded mutations of the real ``demo`` manifest (issue 10, "Done when").

Each mutant deletes, replaces, retypes or adds fields, swaps subtrees, plants huge integers,
non-finite numbers, deep nesting, wrong or absent bank hashes. Every one goes through the
validation API (as parsed from bytes, the way the store and the Hub read it):

* it is refused with a one-line ``ManifestError``, or
* it is accepted, stored as a new version (``put_manifest`` + ``set_ref`` under the lock) and
  composed, every branch loaded and run: it works, or ``compose`` refuses it with a one-line
  ``ScalerError`` (what only the banks can tell: a bank of the wrong kind or shape, or one
  written for another branch). Mutants that touch only descriptive fields (message, metrics,
  provenance) must compose and give the same logits.

Nothing else may escape (no Overflow, RecursionError, KeyError, TypeError...). A sample of 20
also runs through the real ``scaler`` CLI: no "internal error", one ``error:`` line or success.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import _copy_store, run_scaler

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.store import canonical_json
from scaler_wizard.errors import ManifestError, ScalerError
from scaler_wizard.manifests import validate_manifest
from scaler_wizard.manifests.validation import parse_manifest_bytes
from scaler_wizard.modeling.compose import compose

Manifest = dict[str, Any]
N_MUTANTS = 1200
N_CLI = 20
SEED = 20261205
ABSENT = "sha256:" + "0" * 64
DESCRIPTIVE = ("message", "metrics", "provenance")


def paths_of(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += paths_of(v, (*prefix, i))
    return out


def get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def nested(depth: int, leaf: Any = 1) -> Any:
    out = leaf
    for i in range(depth):
        out = {"a": out} if i % 2 else [out]
    return out


class Mutator:
    """Seeded structural mutations of a manifest (JSON object)."""

    def __init__(self, base: Manifest, rng: random.Random) -> None:
        self.base = base
        self.rng = rng
        self.hashes = sorted(
            {v for p in paths_of(base) if isinstance(v := get(base, p), str) and v.startswith("sha256:")}
        )

    def value(self, old: Any = None) -> Any:
        r = self.rng
        choices: list[Any] = [
            None,
            True,
            0,
            -1,
            1,
            2,
            8,
            384,
            2**31,
            2**53,
            2**63,
            -(2**63) - 1,
            9223372036854775808,
            10**100,
            0.5,
            2.0,
            1e308,
            float("nan"),
            float("inf"),
            "",
            "x",
            "con",
            "a.b",
            "../../etc/passwd",
            "sha256:../../x",
            ABSENT,
            "sha256:" + "A" * 64,
            "topk",
            "switch",
            "linear",
            "multilabel",
            "lora",
            "peft-lora",
            "cls",
            "mean",
            "2026-13-01T00:00:00Z",
            "2026-01-01T00:00:00Z",
            "legit --index-url http://evil.example/simple",
            "s" * 1001,
            [],
            {},
            [1, 2],
            {"k": 1},
            nested(r.choice([10, 63, 64, 65, 200])),
        ]
        if self.hashes:
            choices += [r.choice(self.hashes)] * 6  # a real bank, likely of another kind or branch
        if isinstance(old, int) and not isinstance(old, bool):
            choices += [old + 1, old - 1, old * 2, str(old), float(old)]
        if isinstance(old, str):
            choices += [old.upper(), old + " ", old[:-1], [old], {"v": old}]
        if isinstance(old, list):
            choices += [old[::-1], old[:1], old + old[:1], {str(i): v for i, v in enumerate(old)}]
        if isinstance(old, dict):
            choices += [list(old.values()), {**old, "extra": 1}, dict(list(old.items())[:1])]
        return copy.deepcopy(r.choice(choices))

    def mutate(self) -> Any:
        m: Any = copy.deepcopy(self.base)
        r = self.rng
        for _ in range(r.choice([1, 1, 1, 2, 3])):
            if not isinstance(m, dict):
                break
            paths = paths_of(m)
            path = r.choice(paths)
            action = r.choice(["replace", "replace", "replace", "delete", "add", "swap", "descriptive"])
            if action == "descriptive":
                field = r.choice(DESCRIPTIVE)
                branches = list(m.get("branches") or {}) if isinstance(m.get("branches"), dict) else []
                if field == "message" or not branches:
                    m["message"] = r.choice(["", "edited", "ü" * 50])
                elif isinstance(m["branches"][branches[0]], dict):
                    m["branches"][r.choice(branches)][field] = {
                        "note": r.choice([1, "x", [1.5], {"a": None}])
                    }
                continue
            if not path:
                if action == "replace":
                    m = self.value(m)
                continue
            parent, key = get(m, path[:-1]), path[-1]
            if action == "replace":
                parent[key] = self.value(parent[key])
            elif action == "delete":
                del parent[key]
            elif action == "add" and isinstance(parent[key], dict):
                keys = ["extra", "spam2", "con", "trunk", "a.b", "k", "line\nbreak", "é" * 120]
                parent[key][r.choice(keys)] = self.value()
            elif action == "swap":
                other = r.choice(paths)
                if other and other[: len(path)] != path and path[: len(other)] != other:
                    oparent, okey = get(m, other[:-1]), other[-1]
                    parent[key], oparent[okey] = oparent[okey], parent[key]
        return m


def only_descriptive(base: Manifest, m: Any) -> bool:
    """True if ``m`` differs from ``base`` only in message / branch metrics / provenance."""
    if not isinstance(m, dict) or set(m) != set(base):
        return False
    strip = copy.deepcopy(m)
    ref = copy.deepcopy(base)
    for x in (strip, ref):
        x.pop("message", None)
        if isinstance(x.get("branches"), dict):
            for e in x["branches"].values():
                if isinstance(e, dict):
                    e.pop("metrics", None)
                    e.pop("provenance", None)
    return strip == ref


def encode(m: Any) -> bytes | None:
    """The bytes a writer would store; None where even writing is impossible (too deep to encode)."""
    try:
        return json.dumps(m, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    except (RecursionError, ValueError):
        return None


def assert_one_line(exc: BaseException) -> None:
    msg = str(exc)
    assert isinstance(exc, ScalerError), f"{type(exc).__name__}: {msg}"
    assert msg and "\n" not in msg and len(msg) < 2000, repr(msg[:300])


@torch.no_grad()
def run_all(store: ContentStore, spec: str) -> dict[str, torch.Tensor]:
    model = compose(store, spec)
    model.load_all_branches()
    batch = model.base.tokenize(["win a free cruise now", "where is Paris?"])
    return dict(model(**batch, branches=model.branch_names).logits) if model.branch_names else {}


@pytest.fixture
def fast_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load each distinct base entry once (every mutant shares the same base bank)."""
    compose_module = importlib.import_module(
        "scaler_wizard.modeling.compose"
    )  # the package exports a function of that name
    real = compose_module.load_base
    memo: dict[bytes, Any] = {}

    def load_base(store: ContentStore, entry: dict[str, Any], **kw: Any) -> Any:
        key = canonical_json(entry)
        if key not in memo:
            memo[key] = real(store, entry, **kw)
        return memo[key]

    monkeypatch.setattr(compose_module, "load_base", load_base)


def mutants(base: Manifest) -> list[Any]:
    mutator = Mutator(base, random.Random(SEED))
    return [mutator.mutate() for _ in range(N_MUTANTS)]


@pytest.mark.slow
def test_fuzzed_manifests_are_refused_in_one_line_or_compose(store: ContentStore, fast_base: None) -> None:
    base = copy.deepcopy(store.get_manifest(store.resolve("demo")))
    reference = run_all(store, "demo")
    outcomes: Counter[str] = Counter()
    for i, m in enumerate(mutants(base)):
        raw = encode(m)
        try:
            if raw is None:  # not even encodable: the in-memory validation API must still refuse it
                validate_manifest(m)
                raise AssertionError(f"mutant {i}: an unencodable manifest was accepted")
            accepted = validate_manifest(parse_manifest_bytes(raw, f"mutant {i}"))
        except ManifestError as exc:
            assert_one_line(exc)
            outcomes["refused by validation"] += 1
            continue
        h = BankHash.of_bytes(raw)
        if not store.has_manifest(h):
            store.manifest_path(h).write_bytes(raw)
        with store.lock():
            store.set_ref("demo", h, expected=store.get_ref("demo"), reason=f"fuzz {i}")
        assert accepted is not None
        try:
            got = run_all(store, "demo")
        except ScalerError as exc:
            assert_one_line(exc)
            assert not only_descriptive(base, m), f"mutant {i}: a descriptive edit was refused: {exc}"
            outcomes["refused by compose"] += 1
            continue
        outcomes["composed"] += 1
        if only_descriptive(base, m):
            outcomes["descriptive, same logits"] += 1
            assert got.keys() == reference.keys()
            assert all(torch.equal(got[k], reference[k]) for k in got), f"mutant {i}"
    assert sum(v for k, v in outcomes.items() if not k.startswith("descriptive")) == N_MUTANTS
    # The mutator must reach every outcome, or the test proves little.
    assert outcomes["refused by validation"] > N_MUTANTS // 2, outcomes
    assert outcomes["refused by compose"] >= 10, outcomes
    assert outcomes["composed"] >= 50, outcomes
    assert outcomes["descriptive, same logits"] >= 20, outcomes


@pytest.mark.slow
def test_a_sample_of_fuzzed_manifests_through_the_cli(
    session_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    template = ContentStore.open(session_store)
    base = copy.deepcopy(template.get_manifest(template.resolve("demo")))
    sample = [m for m in mutants(base) if encode(m) is not None][: N_CLI * 10 : 10]
    jobs = []
    for i, m in enumerate(sample):
        root = tmp_path_factory.mktemp(f"fuzz-cli-{i}") / "store"
        _copy_store(session_store, root)
        store = ContentStore.open(root)
        raw = encode(m)
        assert raw is not None
        h = BankHash.of_bytes(raw)
        store.manifest_path(h).write_bytes(raw)
        with store.lock():
            store.set_ref("demo", h, expected=store.get_ref("demo"), reason="fuzz")
        env = dict(os.environ, SCALER_HOME=str(root), HF_HUB_OFFLINE="1")
        env.pop("SCALER_DEBUG", None)
        branches = m.get("branches") if isinstance(m, dict) else None
        branch = next(iter(branches), "spam") if isinstance(branches, dict) and branches else "spam"
        argv = ["predict", "demo", "-b", str(branch), "win a free cruise"] if i % 2 else ["show", "demo"]
        jobs.append((argv, env))
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda job: run_scaler(*job[0], env=job[1]), jobs))
    codes = Counter()
    for (argv, _env), proc in zip(jobs, procs, strict=True):
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert proc.returncode in (0, 1, 2), (argv, proc.returncode, proc.stderr)
        if proc.returncode == 1:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), (argv, proc.stderr)
        codes[proc.returncode] += 1
    assert len(jobs) == N_CLI and codes[1] > 0, codes


def test_fuzzed_manifests_parse_to_the_typed_model_and_back_exactly(store: ContentStore) -> None:
    """The same mutants through ``parse_manifest``: it refuses exactly what ``validate_manifest``
    refuses (same one line), and every accepted mutant comes back byte for byte from the typed
    model, so no field is lost, reordered, retyped or invented."""
    from scaler_wizard.manifests.model import parse_manifest

    base = copy.deepcopy(store.get_manifest(store.resolve("demo")))
    accepted = 0
    for i, m in enumerate(mutants(base)):
        raw = encode(m)
        if raw is None:
            continue
        try:
            expected = validate_manifest(parse_manifest_bytes(raw, f"mutant {i}"), where=f"mutant {i}")
        except ManifestError as exc:
            with pytest.raises(ManifestError) as info:
                parse_manifest(raw, where=f"mutant {i}")
            assert str(info.value) == str(exc)
            assert_one_line(info.value)
            continue
        typed = parse_manifest(raw, where=f"mutant {i}", canonical=True)
        assert canonical_json(typed.to_dict()) == raw, f"mutant {i}"
        assert typed.to_dict() == expected and typed.hash == BankHash.of_bytes(raw)
        accepted += 1
    assert accepted >= 50
