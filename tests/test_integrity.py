"""Integrity: tampered banks are refused by name, ``scaler verify`` re-hashes past the cache,
the verification cache is keyed by size+mtime+ctime+inode, and fuzzed bank files only ever give
ScalerErrors (IntegrityError) — never a crash, never a silently wrong model."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_scaler, tamper_object
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.safetensors_bank import read_bank_metadata
from scaler_wizard.errors import IntegrityError, ScalerError, StoreError
from scaler_wizard.manifests.facts import banks_of
from scaler_wizard.modeling.compose import compose
from scaler_wizard.modeling.tensor_banks import encode_bank, load_bank_tensors
from scaler_wizard.modeling.verify import verify_version

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def manifest(store: ContentStore) -> dict[str, Any]:
    return store.get_manifest(store.resolve("demo"))


def bank_of(store: ContentStore, field: str) -> BankHash:
    return BankHash({f: h for f, h, _ in banks_of(manifest(store))}[field])


def one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert isinstance(exc, ScalerError) and msg and "\n" not in msg, repr(exc)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def cache_file(store: ContentStore) -> Path:
    return store.root / "cache" / "verified.json"


def cache_key(path: Path) -> list[int]:
    st_ = path.stat()
    return [st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns, st_.st_ino]


def own_copy(path: Path) -> None:
    """Give a (hard-linked) object its own inode, same bytes and mode: safe to edit in place."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    os.chmod(path, 0o444)


# -- tampered banks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    ["base.bank", "base.files.config.json", "trunk.layers[1].bank", "branches.spam.adapter_bank"],
)
def test_a_flipped_byte_is_refused_naming_the_bank(store: ContentStore, field: str) -> None:
    h = bank_of(store, field)
    tamper_object(store.object_path(h), offset=len(store.object_path(h).read_bytes()) // 2)
    if field.startswith("branches."):
        model = compose(store, "demo")  # branch banks are checked when the branch is first used
        model.branch("topic")  # the other branch is unaffected
        with pytest.raises(IntegrityError) as info:
            model.branch("spam")
    else:
        with pytest.raises(IntegrityError) as info:
            compose(store, "demo")
    one_line(info.value, str(h), "corrupt or tampered")


@pytest.mark.slow
def test_scaler_verify_names_the_tampered_bank(store: ContentStore, scaler_env: dict[str, str]) -> None:
    h = bank_of(store, "branches.topic.head_bank")
    proc = run_scaler("verify", "demo", env=scaler_env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: demo"), proc.stderr
    tamper_object(store.object_path(h), offset=100)
    proc = run_scaler("verify", "demo", env=scaler_env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"FAILED branches.topic.head_bank {h}: "), lines
    assert "corrupt or tampered" in lines[0]


@pytest.mark.slow
def test_verify_ignores_the_cache_even_when_the_tamper_restores_mtime(
    store: ContentStore, scaler_env: dict[str, str]
) -> None:
    """What a reader does when a bank is edited in place and its mtime put back with os.utime.

    * compose re-hashes it and refuses it: the cache key also holds ctime_ns, which any write
      (and os.utime itself) bumps and no user call can set back;
    * if the key still matched (a cache entry forged or restored along with the file, a
      filesystem without ctime...), readers that trust the cache would accept the bytes:
      that is what the cache is for, and why ``scaler verify`` never consults it.
    """
    h = bank_of(store, "trunk.layers[0].bank")
    path = store.object_path(h)
    own_copy(path)
    store.verified_path(h)  # cached under the new inode
    assert json.loads(cache_file(store).read_text())[h.hex] == cache_key(path)

    before = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:  # same inode, same size
        fh.seek(before.st_size // 2)
        byte = fh.read(1)
        fh.seek(before.st_size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.chmod(path, stat.S_IMODE(before.st_mode))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )

    with pytest.raises(IntegrityError) as info:  # ctime moved: compose re-hashes
        compose(ContentStore.open(store.root), "demo")
    one_line(info.value, str(h))

    # Forge the cache so that its key matches the tampered file exactly.
    entries = json.loads(cache_file(store).read_text())
    entries[h.hex] = cache_key(path)
    cache_file(store).write_text(json.dumps(entries))
    trusting = ContentStore.open(store.root)
    assert trusting.verified_path(h) == path  # the cache is trusted: no re-hash
    with pytest.raises(IntegrityError, match=h):
        trusting.verified_path(h, trust_cache=False)
    failed = [c for c in verify_version(trusting, store.resolve("demo")) if not c.ok]
    assert [(c.what, c.bank) for c in failed] == [("trunk.layers[0].bank", h)]

    proc = run_scaler("verify", "demo", "--json", env=scaler_env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    bad = [c for v in report["versions"] for c in v["checks"] if not c["ok"]]
    assert [(c["what"], c["bank"]) for c in bad] == [("trunk.layers[0].bank", h)]
    assert "corrupt or tampered" in bad[0]["detail"]


# -- the verification cache --------------------------------------------------------------------------


def test_compose_fills_the_cache_and_a_second_compose_rehashes_nothing(store: ContentStore) -> None:
    cache_file(store).unlink()
    compose(store, "demo").load_all_branches()
    entries = json.loads(cache_file(store).read_text())
    for field, h, _ in banks_of(manifest(store)):
        assert entries[BankHash(h).hex] == cache_key(store.object_path(h)), field
    # every re-hash rewrites the cache file (atomically: a new inode); none must happen now
    before = (cache_file(store).stat().st_ino, cache_file(store).read_bytes())
    for s in (store, ContentStore.open(store.root)):
        compose(s, "demo").load_all_branches()
    assert (cache_file(store).stat().st_ino, cache_file(store).read_bytes()) == before


def test_a_new_inode_invalidates_the_cache_entry(store: ContentStore) -> None:
    h = bank_of(store, "branches.spam.head_bank")
    path = store.object_path(h)
    store.verified_path(h)
    old = json.loads(cache_file(store).read_text())[h.hex]
    own_copy(path)  # same bytes, same size, new inode
    assert cache_key(path)[3] != old[3]
    store.verified_path(h)  # re-hashed (the bytes are fine) and re-keyed
    assert json.loads(cache_file(store).read_text())[h.hex] == cache_key(path) != old
    tamper_object(path)  # and a changed file under a new inode is caught
    with pytest.raises(IntegrityError, match=h):
        ContentStore.open(store.root).verified_path(h)


def test_a_damaged_cache_is_only_a_lost_optimisation(store: ContentStore) -> None:
    cache_file(store).write_text("{not json")
    compose(ContentStore.open(store.root), "demo").load_all_branches()
    assert len(json.loads(cache_file(store).read_text())) >= len(banks_of(manifest(store)))
    cache_file(store).write_text("[1, 2, 3]")
    compose(ContentStore.open(store.root), "demo")
    store.forget_verified()
    assert not cache_file(store).exists()


# -- fuzzing bank files --------------------------------------------------------------------------------


def check_bank_file(path: Path) -> dict[str, torch.Tensor] | None:
    """Read a bank the ways the library does: IntegrityError or tensors, nothing else."""
    try:
        read_bank_metadata(path, name="fuzz")
        return load_bank_tensors(path, name="fuzz")
    except IntegrityError as exc:
        one_line(exc, "fuzz")
        return None


@FUZZ
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    check_bank_file(path)


def _small_bank() -> bytes:
    return encode_bank(
        {"linear.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "linear.bias": torch.ones(3)},
        kind="head",
        metadata={"labels": ["a", "b", "c"]},
    ).data


SMALL_BANK = _small_bank()
HEADER_END = 8 + int.from_bytes(SMALL_BANK[:8], "little")


@FUZZ
@given(
    how=st.sampled_from(["truncate", "flip-header", "flip-anywhere", "length-field", "append"]),
    at=st.integers(min_value=0, max_value=len(SMALL_BANK) - 1),
    bit=st.integers(min_value=0, max_value=7),
    number=st.integers(min_value=0, max_value=2**64 - 1),
    tail=st.binary(min_size=1, max_size=64),
)
def test_fuzz_corrupted_safetensors(
    tmp_path: Path, how: str, at: int, bit: int, number: int, tail: bytes
) -> None:
    data = bytearray(SMALL_BANK)
    if how == "truncate":
        data = data[:at]
    elif how == "flip-header":
        data[at % HEADER_END] ^= 1 << bit
    elif how == "flip-anywhere":
        data[at] ^= 1 << bit
    elif how == "length-field":
        data[:8] = number.to_bytes(8, "little")
    else:
        data += tail
    path = tmp_path / "bank.safetensors"
    path.write_bytes(bytes(data))
    check_bank_file(path)


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X9"]) | json_scalars,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-2, 2**40), min_size=2, max_size=2) | json_values,
    }
)


@FUZZ
@given(
    header=st.dictionaries(
        st.sampled_from(["__metadata__", "linear.weight", "linear.bias", "x"]) | st.text(max_size=6),
        tensor_entries | json_values,
        max_size=4,
    ),
    body=st.binary(max_size=64),
    pad=st.integers(0, 9),
)
def test_fuzz_forged_headers(tmp_path: Path, header: dict[str, Any], body: bytes, pad: int) -> None:
    text = json.dumps(header).encode() + b" " * pad
    path = tmp_path / "forged.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)
    check_bank_file(path)


@settings(FUZZ, max_examples=100)  # each example fsyncs a few files
@given(data=st.binary(max_size=256), flip=st.integers(min_value=0))
def test_fuzz_the_store_checks_every_byte(empty_store: ContentStore, data: bytes, flip: int) -> None:
    """Good bytes read back as themselves; any other bytes under that name are refused."""
    h = empty_store.put_bytes(data)
    path = empty_store.verified_path(h, trust_cache=False)
    check_bank_file(path)
    assert empty_store.read_bytes(h, trust_cache=False) == data
    wrong = bytearray(data + b"\0")
    wrong[flip % len(wrong)] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(wrong))  # a different inode: the cache cannot vouch for it
    with pytest.raises(IntegrityError, match=h):
        empty_store.verified_path(h)
    path.unlink()
    with pytest.raises(StoreError, match="missing from the store"):
        empty_store.verified_path(h)


small_shapes = st.lists(st.integers(0, 5), max_size=3)
dtypes = st.sampled_from(
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]
)


@pytest.mark.slow
@settings(FUZZ, max_examples=30)  # each example composes
@given(
    tensors=st.dictionaries(
        st.sampled_from(["linear.weight", "linear.bias", "lora_A.weight", "extra"]),
        st.tuples(small_shapes, dtypes),
        max_size=3,
    ),
    kind=st.sampled_from(["head", "adapter", "trunk-layer", "base", "other"]),
    as_metadata_only=st.booleans(),
)
def test_fuzz_forged_head_banks_through_compose(
    store: ContentStore, tensors: dict[str, Any], kind: str, as_metadata_only: bool
) -> None:
    """Valid safetensors with the wrong tensors, shapes, dtypes or kind, as spam's head bank."""
    made = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in tensors.items()}
    if as_metadata_only:  # plain safetensors, no scaler metadata at all
        h = store.put_bytes(st_save(made))
    else:
        h = store.put_bytes(encode_bank(made, kind=kind).data)
    m = copy.deepcopy(manifest(store))
    m["branches"]["spam"]["head_bank"] = str(h)
    model = compose(store, str(store.put_manifest(m)))
    try:
        model.branch("spam")
    except ScalerError as exc:
        one_line(exc, "branches.spam.head_bank")
    else:  # only the genuine layout may load
        assert kind == "head" and not as_metadata_only
        assert {k: (tuple(v.shape), v.dtype.is_floating_point) for k, v in made.items()} == {
            "linear.weight": ((2, 384), True),
            "linear.bias": ((2,), True),
        }
