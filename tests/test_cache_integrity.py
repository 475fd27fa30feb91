"""Issue 11 item 5: every derived cache follows one rule, and a damaged file is never trusted.

Each cache kind (trunk ``features``, trunk ``tokens``, ``base-states``) is driven through the
public function that ``branch add`` or ``train`` calls, on the real model. Each attack below
leaves a file under the cache's name that is not the true cache of these inputs: a flipped
byte, a truncated or empty file, another key's file (as it is, or with a header relabelled to
this key), NaN (raw, or sealed with a matching checksum), another dtype or shape (sealed), a
header that lies about a tensor's dtype or shape, or a file of the previous format. Each must
be a miss: the result equals, with ``torch.equal``, a fresh computation that bypasses the
cache, and the file is rewritten bit for bit as the clean one (the next call is a hit).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, _copy_store
from torch import Tensor

from scaler_wizard.banks import ContentStore
from scaler_wizard.caches import base_states, features, token_features
from scaler_wizard.caches.bound_cache import BINDING_VERSION, write_bound
from scaler_wizard.errors import StoreError
from scaler_wizard.modeling.compose import compose, trunk_id
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.modeling.tensor_banks import encode_bank, load_bank_tensors

TEXTS = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts",
    "ok see you later",
    "Who wrote Hamlet and when was it first performed?",
    "What is the capital of Australia?",
]
OTHER = ["a different", "set of four", "texts with another", "key entirely, so another file"]


@dataclass
class Env:
    store: ContentStore
    model: ScalerModel
    trunk: str
    base_entry: dict[str, Any]


@pytest.fixture(scope="module")
def env(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("cache-integrity") / "store"
    _copy_store(session_store, root)
    store = ContentStore.open(root)
    model = compose(store, "demo")
    assert model.origin is not None
    return Env(store, model, trunk_id(model.origin.manifest), model.origin.base_entry)


# -- the kinds, each through its public path ---------------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str  # the store's cache kind
    main: str  # the floating tensor the attacks go for
    run: Callable[[Env, list[str]], tuple[dict[str, Tensor], bool]]  # the public path
    fresh: Callable[[Env, list[str]], dict[str, Tensor]]  # no cache at all
    bound: Callable[[Env, list[str]], dict[str, object]]
    old_kind: str  # the kind name in files of the previous format

    def __str__(self) -> str:
        return self.name


def _features_run(env: Env, texts: list[str]) -> tuple[dict[str, Tensor], bool]:
    rows, hit = features.cached_features(env.store, env.model, env.trunk, texts, kind="pooled")
    assert isinstance(rows, Tensor)
    return {"pooled": rows}, hit


def _tokens_run(env: Env, texts: list[str]) -> tuple[dict[str, Tensor], bool]:
    rows, hit = features.cached_features(env.store, env.model, env.trunk, texts, kind="tokens")
    assert isinstance(rows, token_features.TokenRows) and len(rows.shards) == 1
    return rows.shards[0].tensors(), hit


def _states_run(env: Env, texts: list[str]) -> tuple[dict[str, Tensor], bool]:
    states, hit = base_states.cached_states(env.store, env.model.base, env.base_entry, texts)
    return {"states": states.flat, "offsets": states.offsets}, hit


def _trunk_bound(dtype: str) -> Callable[[Env, list[str]], dict[str, object]]:
    def bound(env: Env, texts: list[str]) -> dict[str, object]:
        return {
            "trunk": env.trunk,
            "rows": len(texts),
            "dtype": dtype,
            "max_length": env.model.base.max_length,
        }

    return bound


def _states_bound(env: Env, texts: list[str]) -> dict[str, object]:
    base = env.model.base
    return {
        "base": env.base_entry["bank"],
        "rows": len(texts),
        "dtype": "float32",
        "max_length": base.max_length,
        "hidden": base.hidden_size,
    }


KINDS = [
    Kind(
        "features",
        "pooled",
        _features_run,
        lambda env, texts: {"pooled": features.compute_pooled(env.model, texts)},
        _trunk_bound("float32"),
        "feature-cache",
    ),
    Kind(
        "tokens",
        "states",
        _tokens_run,
        lambda env, texts: token_features.compute_tokens(env.model, texts).tensors(),
        _trunk_bound("float16"),
        "token-cache",
    ),
    Kind(
        "base-states",
        "states",
        _states_run,
        lambda env, texts: _states_fresh(base_states.compute_states(env.model.base, texts)),
        _states_bound,
        "base-states",
    ),
]


def _states_fresh(states: base_states.TokenStates) -> dict[str, Tensor]:
    return {"states": states.flat, "offsets": states.offsets}


# -- attacks: each leaves a file that is not the true cache of TEXTS --------------------------


@dataclass
class Target:
    env: Env
    kind: Kind
    path: Path
    clean: bytes

    @property
    def key(self) -> str:
        return self.path.stem

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in load_bank_tensors(self.path).items()}

    def replace(self, data: bytes) -> None:
        """A new file under the name (never written into in place: tensors may map it)."""
        self.path.unlink()
        self.path.write_bytes(data)

    def seal(self, tensors: dict[str, Tensor]) -> None:
        """Write ``tensors`` as a valid, checksummed cache file bound to this key and inputs."""
        self.path.unlink()
        bound = self.kind.bound(self.env, TEXTS)
        write_bound(self.path, tensors, kind=self.kind.name, key=self.key, bound=bound)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _relabel(header: dict[str, Any], name: str, dtype: str, shape: list[int], torch_dtype: str) -> None:
    """Make the header say tensor ``name`` is ``dtype``/``shape``, its metadata agreeing."""
    header[name]["dtype"], header[name]["shape"] = dtype, shape
    recorded = json.loads(header["__metadata__"]["scaler.tensors"])
    recorded[name] = [torch_dtype, shape]
    header["__metadata__"]["scaler.tensors"] = json.dumps(recorded, sort_keys=True)


def flipped_byte(t: Target) -> None:
    header, body = _split(t.clean)
    start, end = header[t.kind.main]["data_offsets"]
    data = bytearray(t.clean)
    data[len(t.clean) - len(body) + (start + end) // 2] ^= 0x10
    t.replace(bytes(data))


def truncated(t: Target) -> None:
    t.replace(t.clean[: len(t.clean) // 2])


def empty(t: Target) -> None:
    t.replace(b"")


def swapped_from_another_key(t: Target) -> None:
    """Another text list's valid cache file (same trunk or base, same row count) under this name."""
    t.kind.run(t.env, OTHER)
    other = t.path.parent / f"{_key_of(t.env, t.kind, OTHER)}.safetensors"
    t.replace(other.read_bytes())


def swapped_with_a_header_relabelled_to_this_key(t: Target) -> None:
    """Another key's file whose header now claims this key: it says it is this cache."""
    swapped_from_another_key(t)
    header, body = _split(t.path.read_bytes())
    header["__metadata__"]["scaler.key"] = t.key
    t.replace(_join(header, body))


def nan_sealed(t: Target) -> None:
    """NaN written in, with a checksum that matches it."""
    tensors = t.tensors()
    tensors[t.kind.main].view(-1)[0] = float("nan")
    t.seal(tensors)


def nan_in_the_bytes(t: Target) -> None:
    header, body = _split(t.clean)
    start, _ = header[t.kind.main]["data_offsets"]
    nan = torch.tensor([float("nan")], dtype=t.tensors()[t.kind.main].dtype)
    raw = nan.view(torch.uint8).numpy().tobytes()
    at = len(t.clean) - len(body) + start
    t.replace(t.clean[:at] + raw + t.clean[at + len(raw) :])


def wrong_dtype_sealed(t: Target) -> None:
    tensors = t.tensors()
    tensors[t.kind.main] = tensors[t.kind.main].double()
    t.seal(tensors)


def wrong_shape_sealed(t: Target) -> None:
    """One row short, checksummed (the bound inputs unchanged)."""
    tensors = t.tensors()
    tensors[t.kind.main] = tensors[t.kind.main][:-1].clone()
    t.seal(tensors)


def header_lies_about_dtype(t: Target) -> None:
    """The same bytes, but the header (and its recorded shapes) call them integers."""
    header, body = _split(t.clean)
    entry = header[t.kind.main]
    lie = {"F32": ("I32", "torch.int32"), "F16": ("I16", "torch.int16")}[entry["dtype"]]
    _relabel(header, t.kind.main, lie[0], entry["shape"], lie[1])
    t.replace(_join(header, body))


def header_lies_about_shape(t: Target) -> None:
    """The same bytes, but the header (and its recorded shapes) transpose the tensor."""
    header, body = _split(t.clean)
    entry = header[t.kind.main]
    rows, cols = entry["shape"]
    dtype = {"F32": "torch.float32", "F16": "torch.float16"}[entry["dtype"]]
    _relabel(header, t.kind.main, entry["dtype"], [cols, rows], dtype)
    t.replace(_join(header, body))


def previous_format(t: Target) -> None:
    """The true values, as the previous format (binding 2: a checksum of the bytes only) wrote them."""
    tensors = t.tensors()
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().data)
    meta: dict[str, object] = {
        "binding": "2",
        "key": t.key,
        "tensors": {n: [str(v.dtype), list(v.shape)] for n, v in sorted(tensors.items())},
        "sha256": "sha256:" + digest.hexdigest(),
        **t.kind.bound(t.env, TEXTS),
    }
    t.replace(encode_bank(tensors, kind=t.kind.old_kind, metadata=meta).data)


ATTACKS: list[Callable[[Target], None]] = [
    flipped_byte,
    truncated,
    empty,
    swapped_from_another_key,
    swapped_with_a_header_relabelled_to_this_key,
    nan_sealed,
    nan_in_the_bytes,
    wrong_dtype_sealed,
    wrong_shape_sealed,
    header_lies_about_dtype,
    header_lies_about_shape,
    previous_format,
]


def _key_of(env: Env, kind: Kind, texts: list[str]) -> str:
    max_length = env.model.base.max_length
    if kind.name == "features":
        return features.feature_key(env.trunk, texts, max_length)
    if kind.name == "tokens":
        return token_features.token_key(env.trunk, texts, max_length)
    return base_states.states_key(env.base_entry, texts, max_length=max_length, dtype="float32")


_FRESH: dict[str, dict[str, Tensor]] = {}


def _fresh(env: Env, kind: Kind) -> dict[str, Tensor]:
    if kind.name not in _FRESH:
        _FRESH[kind.name] = kind.fresh(env, TEXTS)
    return _FRESH[kind.name]


def _equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_a_damaged_cache_file_is_recomputed_and_rewritten(
    kind: Kind, attack: Callable[[Target], None], env: Env
) -> None:
    fresh = _fresh(env, kind)
    path = env.store.cache_path(kind.name, _key_of(env, kind, TEXTS))
    assert path.parent == env.store.root / "cache" / kind.name
    path.unlink(missing_ok=True)  # each case starts from no file, whatever an earlier one left
    first, hit = kind.run(env, TEXTS)
    assert hit is False and _equal(first, fresh)  # the cache holds exactly the fresh computation
    del first  # (it may map the file)
    clean = path.read_bytes()
    attack(Target(env, kind, path, clean))
    assert path.read_bytes() != clean

    again, hit = kind.run(env, TEXTS)
    assert hit is False  # not trusted
    assert _equal(again, fresh)
    del again
    assert path.read_bytes() == clean  # rewritten, bit for bit the clean file
    third, hit = kind.run(env, TEXTS)
    assert hit is True and _equal(third, fresh)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_a_clean_cache_file_is_used(kind: Kind, env: Env) -> None:
    """The control: an untouched file is a hit, and holds the binding of this version."""
    kind.run(env, TEXTS)
    found, hit = kind.run(env, TEXTS)
    assert hit is True and _equal(found, _fresh(env, kind))
    header, _ = _split(env.store.cache_path(kind.name, _key_of(env, kind, TEXTS)).read_bytes())
    meta = header["__metadata__"]
    assert meta["scaler.kind"] == kind.name and meta["scaler.binding"] == BINDING_VERSION


# -- the layout is the store's ----------------------------------------------------------------


def test_cache_path_validates_kind_and_key(empty_store: ContentStore) -> None:
    key = "ab" * 32
    assert (
        empty_store.cache_path("features", key)
        == empty_store.root / "cache" / "features" / f"{key}.safetensors"
    )
    for kind, bad in (("nope", key), ("features", "AB" * 32), ("features", "../" + key[3:]), ("tokens", "")):
        with pytest.raises(StoreError) as info:
            empty_store.cache_path(kind, bad)
        assert "\n" not in str(info.value)


def test_no_module_builds_cache_paths_itself() -> None:
    """Only the store knows the layout of ``cache/``: nobody else joins ``"cache"`` into a path."""
    pattern = re.compile(r"""/\s*["']cache["']""")
    offenders = [
        str(p.relative_to(REPO))
        for folder in ("core", "cli", "plugins", "banks", "manifests")
        for p in sorted((REPO / folder).rglob("*.py"))
        if p != REPO / "banks" / "store.py" and pattern.search(p.read_text())
    ]
    assert offenders == []
