"""Teacher feature banks: a frozen teacher's pooled hidden states at chosen layers, run once and
kept as content-addressed safetensors banks in the store, like every other bank.

One bank holds one row shard of one layer (``features``: ``(rows, dim)``, float32 or float16)
and carries its **binding** in its header: the teacher id, the layer, the pooling, the max
length, the data hash (the sha256 of the ordered texts: the texts object's name), the dtype,
the shard's index, first row and row count. Whoever reads a bank (:func:`read_feature_bank`)
gets its tensor only when its bytes hash to its name and every bound field is what is asked;
anything else is a :class:`FeatureBankMismatchError`, never a silent use of old features.

The teacher runs over each shard once (length-sorted batches, every layer at once). A shard's
banks, once stored, are remembered in a small pointer file under ``cache/teacher-features/``
(named by the hash of the binding), so a killed run resumes at the first unfinished shard and
a second run with the same teacher, data, layers, pooling, max length and dtype reuses every
bank without loading the teacher. A pointer is only a claim: the bank it names is read back
and checked against the binding, and recomputed (with a warning) if anything disagrees.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from scaler_wizard.banks import BankHash, ContentStore, read_bank_metadata
from scaler_wizard.banks.atomic import atomic_write_bytes
from scaler_wizard.caches.feature_shards import Rows, ShardedRows
from scaler_wizard.distillation.teachers import LoadedTeacher
from scaler_wizard.errors import BankNotFoundError, FeatureBankMismatchError, IntegrityError, ScalerError
from scaler_wizard.manifests.teachers import TeacherEntry, TeacherFeatures
from scaler_wizard.modeling.tensor_banks import encode_bank, load_bank_tensors

log = logging.getLogger(__name__)

#: The bank kind (``scaler.kind``) of a teacher feature bank.
KIND = "teacher-features"
#: The tensor a feature bank holds.
TENSOR = "features"
#: Rows per shard (16,384 x 768 float32 = 48 MiB per layer).
SHARD_ROWS = 16384
DTYPES = {"float32": torch.float32, "float16": torch.float16}
Progress = Callable[[int], None]


def texts_bytes(texts: Sequence[str]) -> bytes:
    """The texts object: a compact JSON array of the texts, in order (its sha256 is the data hash)."""
    return json.dumps(list(texts), ensure_ascii=False, separators=(",", ":")).encode()


def data_hash(texts: Sequence[str]) -> str:
    """``sha256:<hex>`` of the ordered texts (of :func:`texts_bytes`)."""
    return str(BankHash.of_bytes(texts_bytes(texts)))


def read_texts(store: ContentStore, h: str) -> list[str]:
    """The texts a teacher entry names, their hash checked (FeatureBankMismatchError otherwise)."""
    try:
        texts = json.loads(store.read_bytes(h))
    except (IntegrityError, BankNotFoundError) as exc:
        raise FeatureBankMismatchError(f"texts object {h}: {exc}", bank=h, field="data") from exc
    except ValueError as exc:
        raise FeatureBankMismatchError(f"texts object {h} is not a JSON array of texts", bank=h) from exc
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise FeatureBankMismatchError(f"texts object {h} is not a JSON array of texts", bank=h, field="data")
    return texts


@dataclass(frozen=True)
class Binding:
    """Everything one feature bank is bound to (kept in its header as ``scaler.<field>``)."""

    teacher: str
    layer: int
    pooling: str
    max_length: int
    data: str
    dtype: str
    shard: int
    start: int
    rows: int
    dim: int

    def metadata(self) -> dict[str, object]:
        return {k: str(v) for k, v in asdict(self).items()}

    def key(self) -> str:
        """The hex name of this binding's pointer file."""
        payload = json.dumps({"kind": KIND, **self.metadata()}, sort_keys=True).encode()
        return BankHash.of_bytes(payload).hex


def encode_features(features: Tensor, binding: Binding) -> bytes:
    """A feature bank's bytes (canonical: same features and binding, same bytes, same name)."""
    return encode_bank({TENSOR: features}, kind=KIND, metadata=binding.metadata()).data


def read_feature_bank(store: ContentStore, bank: str, binding: Binding, *, where: str = "") -> Tensor:
    """The bank's ``(rows, dim)`` features (memory-mapped) when its bytes hash to its name and its
    header, tensor, dtype and shape are exactly what ``binding`` says, and every value is finite;
    else FeatureBankMismatchError naming what differs."""
    at = f"{where}: " if where else ""
    try:
        path = store.verified_path(bank)
        meta = read_bank_metadata(path, name=bank)
        tensors = load_bank_tensors(path, name=bank)
    except (IntegrityError, BankNotFoundError) as exc:
        raise FeatureBankMismatchError(f"{at}{exc}", bank=bank, field="bank") from exc
    if meta.get("scaler.kind") != KIND:
        raise FeatureBankMismatchError(
            f"{at}bank {bank} is a {meta.get('scaler.kind')!r} bank, not a teacher feature bank",
            bank=bank,
            field="kind",
        )
    for name, want in binding.metadata().items():
        got = meta.get(f"scaler.{name}")
        if got != want:
            raise FeatureBankMismatchError(
                f"{at}feature bank {BankHash(bank).short} was made for {name} {got!r}, not {want!r}: "
                "never used for another teacher, data or layer",
                bank=bank,
                field=name,
            )
    features = tensors.get(TENSOR)
    expected = (binding.rows, binding.dim)
    if set(tensors) != {TENSOR} or features is None or tuple(features.shape) != expected:
        raise FeatureBankMismatchError(
            f"{at}feature bank {BankHash(bank).short} does not hold one {expected} tensor {TENSOR!r}",
            bank=bank,
            field="shape",
        )
    if features.dtype != DTYPES[binding.dtype] or not bool(torch.isfinite(features).all()):
        raise FeatureBankMismatchError(
            f"{at}feature bank {BankHash(bank).short} is not finite {binding.dtype}", bank=bank, field="dtype"
        )
    return features


# -- pointers: which bank a binding was stored as (resume and reuse) ---------------------------


def pointer_dir(store: ContentStore) -> Path:
    """Where the pointers live (derived data: deleting the folder only costs a recompute)."""
    return store.cache_dir(KIND)


def remembered(store: ContentStore, binding: Binding) -> str | None:
    """The bank stored for ``binding`` earlier, if its pointer exists and the bank checks out
    (a pointer to a missing, damaged or other bank is a miss: recomputed, never trusted)."""
    path = pointer_dir(store) / f"{binding.key()}.json"
    try:
        bank = json.loads(path.read_text())["bank"]
        BankHash(bank)
    except (OSError, ValueError, KeyError, TypeError, ScalerError):
        return None
    try:
        read_feature_bank(store, bank, binding)
    except FeatureBankMismatchError as exc:
        log.warning("feature bank pointer %s not used (%s): recomputing", path.name, exc)
        return None
    return str(bank)


def remember(store: ContentStore, binding: Binding, bank: str) -> None:
    """Write ``binding``'s pointer (a pointer that cannot be written only costs a recompute)."""
    path = pointer_dir(store) / f"{binding.key()}.json"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"bank": bank, "binding": binding.metadata()}).encode())


# -- the teacher pass ------------------------------------------------------------------------


@torch.inference_mode()
def pooled_layers(
    teacher: LoadedTeacher,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    pooling: str,
    max_length: int,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> dict[int, Tensor]:
    """``{layer: (N, dim) float32}``: the teacher's hidden states at each layer, pooled (``mean``
    over the attention mask, or ``cls``: the first token), texts batched by length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    dim = teacher.info.hidden_size
    out = {layer: torch.empty(len(texts), dim, dtype=torch.float32) for layer in layers}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = teacher.tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        inputs = {
            k: v.to(teacher.device)
            for k, v in batch.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        hidden = teacher.model(**inputs, output_hidden_states=True).hidden_states
        mask = inputs["attention_mask"].unsqueeze(-1).to(torch.float32)
        rows = torch.tensor(idx)
        for layer in layers:
            states = hidden[layer].to(torch.float32)
            if pooling == "cls":
                pooled = states[:, 0]
            else:
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[layer][rows] = pooled.cpu()
        if progress:
            progress(len(idx))
    return out


@dataclass
class BankRun:
    """What building a teacher's feature banks did: the features per layer, the rows the
    teacher ran over (0: every bank was reused, the teacher never loaded), shards reused."""

    features: list[TeacherFeatures]
    computed_rows: int
    computed_shards: int
    reused_shards: int


def build_feature_banks(
    store: ContentStore,
    teacher: Callable[[], LoadedTeacher],
    *,
    teacher_id: str,
    texts: Sequence[str],
    layers: Sequence[int],
    dim: int,
    pooling: str,
    max_length: int,
    dtype: str = "float32",
    shard_rows: int = SHARD_ROWS,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> BankRun:
    """Every (layer, shard) feature bank of ``texts``: reused when stored before for the same
    binding (checked), else computed (``teacher()`` is called once, at the first shard that
    needs it) and stored shard by shard, so a killed run keeps the shards it finished."""
    if dtype not in DTYPES:
        raise ScalerError(f"feature dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if shard_rows < 1:
        raise ScalerError(f"shard rows must be at least 1, not {shard_rows}")
    data = data_hash(texts)
    banks: dict[int, list[str]] = {layer: [] for layer in layers}
    loaded: LoadedTeacher | None = None
    computed_rows = computed_shards = reused_shards = 0
    for shard, start in enumerate(range(0, len(texts), shard_rows)):
        chunk = texts[start : start + shard_rows]
        bindings = {
            layer: Binding(teacher_id, layer, pooling, max_length, data, dtype, shard, start, len(chunk), dim)
            for layer in layers
        }
        found = {layer: remembered(store, b) for layer, b in bindings.items()}
        missing = [layer for layer, bank in found.items() if bank is None]
        if missing:
            loaded = loaded or teacher()
            fresh = pooled_layers(
                loaded,
                chunk,
                missing,
                pooling=pooling,
                max_length=max_length,
                batch_size=batch_size,
                progress=progress,
            )
            for layer in missing:
                values = fresh[layer].to(DTYPES[dtype])
                bad = int((~torch.isfinite(values)).sum())
                if bad:
                    raise ScalerError(
                        f"teacher features at layer {layer}: {bad} values are not finite in {dtype}"
                        f"{' (float16 overflows: drop --fp16)' if dtype == 'float16' else ''}; nothing saved"
                    )
                bank = str(store.put_bytes(encode_features(values, bindings[layer])))
                remember(store, bindings[layer], bank)
                found[layer] = bank
            computed_rows += len(chunk)
            computed_shards += 1
        else:
            reused_shards += 1  # (a reused shard does not advance the progress: nothing ran)
        for layer in layers:
            stored = found[layer]
            assert stored is not None
            banks[layer].append(stored)
    return BankRun(
        features=[TeacherFeatures(layer=layer, dim=dim, banks=tuple(banks[layer])) for layer in layers],
        computed_rows=computed_rows,
        computed_shards=computed_shards,
        reused_shards=reused_shards,
    )


# -- reading a teacher's features back (what `scaler distill` will train on) -----------------


def bindings_of(entry: TeacherEntry, layer: int, shard_rows: Sequence[int]) -> list[Binding]:
    """The binding each of ``entry``'s banks at ``layer`` must have, given the shards' row counts."""
    out, start = [], 0
    for shard, rows in enumerate(shard_rows):
        out.append(
            Binding(
                entry.id,
                layer,
                entry.pooling,
                entry.max_length,
                entry.data.texts,
                entry.dtype,
                shard,
                start,
                rows,
                entry.hidden_size,
            )
        )
        start += rows
    return out


def teacher_features(
    store: ContentStore,
    entry: TeacherEntry,
    layer: int,
    *,
    texts: Sequence[str] | None = None,
    name: str = "",
) -> Rows:
    """``(rows, dim)`` features of ``entry`` at ``layer`` (one memory-mapped tensor, or the
    shards read as one), every bank checked against the entry
    (and, with ``texts``, the entry's data checked to be exactly those texts, in order):
    FeatureBankMismatchError, never stale features."""
    what = f"teacher {name}" if name else "teacher"
    if texts is not None and data_hash(texts) != entry.data.texts:
        raise FeatureBankMismatchError(
            f"{what}: its feature banks were computed on other texts (data {BankHash(entry.data.texts).short}, "
            f"these hash to {BankHash(data_hash(texts)).short})",
            teacher=name or None,
            field="data",
        )
    features = entry.at_layer(layer)
    if features is None:
        raise FeatureBankMismatchError(
            f"{what} has no features at layer {layer} (has {', '.join(map(str, entry.layers))})",
            teacher=name or None,
            field="layer",
        )
    parts = []
    start = 0
    for shard, bank in enumerate(features.banks):
        try:
            rows = int(read_bank_metadata(store.verified_path(bank), name=bank).get("scaler.rows", "0"))
        except (IntegrityError, BankNotFoundError) as exc:
            raise FeatureBankMismatchError(f"{what}: {exc}", teacher=name or None, bank=bank) from exc
        binding = bindings_of(entry, layer, [rows])[0]
        binding = Binding(**{**asdict(binding), "shard": shard, "start": start})
        parts.append(read_feature_bank(store, bank, binding, where=f"{what} layer {layer}"))
        start += rows
    if start != entry.data.rows:
        raise FeatureBankMismatchError(
            f"{what} layer {layer}: its banks hold {start} rows, its data {entry.data.rows}",
            teacher=name or None,
            field="rows",
        )
    return parts[0] if len(parts) == 1 else ShardedRows(parts)


def check_teacher(store: ContentStore, entry: TeacherEntry, *, name: str = "") -> None:
    """Check every object ``entry`` names: the texts (their hash and count) and each layer's banks."""
    texts = read_texts(store, entry.data.texts)
    if len(texts) != entry.data.rows:
        raise FeatureBankMismatchError(
            f"teacher {name}: its texts object holds {len(texts)} texts, not {entry.data.rows}",
            teacher=name or None,
            field="rows",
        )
    for layer in entry.layers:
        teacher_features(store, entry, layer, name=name)


__all__ = [
    "KIND",
    "SHARD_ROWS",
    "BankRun",
    "Binding",
    "build_feature_banks",
    "check_teacher",
    "data_hash",
    "encode_features",
    "read_feature_bank",
    "read_texts",
    "teacher_features",
    "texts_bytes",
]
