"""``scaler teacher add``: run a frozen teacher once over texts, keep its pooled features at the
chosen layers as feature banks, and record the teacher in a new version of the model.

Nothing else in the model changes: base, trunk and branches are carried over as they are (a
teacher changes no branch's output). Re-running with the same teacher, data, layers, pooling,
max length and dtype reuses the banks without loading the teacher; a teacher already in the
model under that name with other weights or data is a :class:`FeatureBankMismatchError` unless
``replace`` (then its banks are recomputed for what is asked, never taken from the old entry).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaler_wizard.banks import BankHash, ContentStore, sha256_file
from scaler_wizard.distillation.feature_banks import (
    SHARD_ROWS,
    BankRun,
    build_feature_banks,
    check_teacher,
    data_hash,
    texts_bytes,
)
from scaler_wizard.distillation.teachers import (
    POOLINGS,
    LoadedTeacher,
    TeacherInfo,
    default_device,
    inspect_teacher,
    load_teacher,
    locate_teacher,
)
from scaler_wizard.errors import (
    ConflictError,
    DataError,
    FeatureBankMismatchError,
    ModelNotFoundError,
    TeacherError,
    did_you_mean,
)
from scaler_wizard.inference.file_readers import input_format, read_chunks
from scaler_wizard.manifests.model import Manifest, source_from_dict
from scaler_wizard.manifests.teachers import TeacherData, TeacherEntry, TeacherFile
from scaler_wizard.names import validate_name
from scaler_wizard.version import __version__
from scaler_wizard.versions.builder import rfc3339, with_teacher
from scaler_wizard.versions.history import next_version

ProgressFactory = Callable[[str, int], Callable[[int], None]]
Reporter = Callable[[str], None]


@dataclass
class TeacherRequest:
    """What ``teacher add`` is asked: the teacher, its layers, the data and how to pool and keep."""

    model: str
    layers: Sequence[int]
    data: Sequence[Path]
    text_column: str = "text"
    pooling: str | None = None
    max_length: int | None = None
    fp16: bool = False
    shard_rows: int = SHARD_ROWS
    batch_size: int = 32
    device: str | None = None


@dataclass
class TeacherAddResult:
    model: str
    teacher: str
    manifest: str
    version: int
    entry: TeacherEntry
    computed_rows: int
    computed_shards: int
    reused_shards: int
    unchanged: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def reused(self) -> bool:
        """Every bank came from an earlier run: the teacher never ran."""
        return self.computed_rows == 0

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "teacher": self.teacher,
            "version": self.version,
            "manifest": self.manifest,
            "unchanged": self.unchanged,
            "reused": self.reused,
            "teacher_pass": not self.reused,
            "computed_rows": self.computed_rows,
            "computed_shards": self.computed_shards,
            "reused_shards": self.reused_shards,
            "seconds": round(self.seconds, 3),
            **teacher_summary(self.teacher, self.entry),
        }


def read_texts_from(
    paths: Sequence[Path], text_column: str, *, chunk_rows: int = 65536
) -> tuple[list[str], list[TeacherFile]]:
    """Every text of ``paths`` in order (CSV, TSV, JSON Lines, Parquet; read in chunks) and a
    record of each file (path, sha256, rows). Missing or empty texts are a DataError."""
    if not paths:
        raise DataError("no data: give at least one --data FILE")
    texts: list[str] = []
    files: list[TeacherFile] = []
    for path in paths:
        before = len(texts)
        for chunk in read_chunks(Path(path), input_format(Path(path)), chunk_rows):
            if chunk.records and text_column not in chunk.columns:
                raise DataError(
                    f"{path}: no text column {text_column!r} (columns: {', '.join(chunk.columns) or 'none'}); "
                    "name it with --text-column",
                    path=path,
                )
            for i, record in enumerate(chunk.records):
                text = record.get(text_column)
                if not isinstance(text, str) or not text.strip():
                    raise DataError(
                        f"{path}: row {chunk.first_row + i}: the text is missing or empty", path=path
                    )
                texts.append(text)
        if len(texts) == before:
            raise DataError(f"{path}: no rows", path=path)
        files.append(TeacherFile(path=str(path), sha256=str(sha256_file(path)), rows=len(texts) - before))
    return texts, files


def _layers(info: TeacherInfo, layers: Sequence[int]) -> list[int]:
    if not layers:
        raise TeacherError("no layers: give --layers L[,L...] (0 = embeddings, -1 = the last)")
    out: list[int] = []
    for layer in layers:
        index = info.layer_index(layer)
        if index not in out:
            out.append(index)
    return out


def _differs(old: TeacherEntry, new: TeacherEntry) -> str | None:
    """What makes ``new`` not the same features as ``old`` (None: the same)."""
    for what, a, b in (
        ("teacher weights or files", old.id, new.id),
        ("data", old.data.texts, new.data.texts),
        ("layers", sorted(old.layers), sorted(new.layers)),
        ("pooling", old.pooling, new.pooling),
        ("max length", old.max_length, new.max_length),
        ("dtype", old.dtype, new.dtype),
    ):
        if a != b:
            return what
    return None


def add_teacher(
    store: ContentStore,
    model_name: str,
    name: str,
    request: TeacherRequest,
    *,
    replace: bool = False,
    progress_factory: ProgressFactory | None = None,
    report: Reporter | None = None,
) -> TeacherAddResult:
    """Check everything cheap first (name, model, teacher config, layers, data), then build or
    reuse the feature banks and save a new version (none when nothing changed)."""
    t0 = time.perf_counter()
    note = report or (lambda _line: None)
    validate_name(name, what="teacher")
    if "." in name:  # the schema's branch-name rule: a teacher's adapter will be a module
        raise TeacherError(f"invalid teacher name {name!r}: use letters, digits, '_' or '-'", teacher=name)
    head_hash = store.get_ref(model_name)
    if head_hash is None:
        raise ModelNotFoundError(
            f"no model {model_name!r} in {store.root} {did_you_mean(model_name, store.models())}",
            name=model_name,
            available=store.models(),
        )
    head = store.manifest(head_hash)
    folder, source = locate_teacher(request.model)
    info = inspect_teacher(folder, source, max_length=request.max_length)
    layers = _layers(info, request.layers)
    pooling = request.pooling or info.pooling
    if pooling not in POOLINGS:
        raise TeacherError(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}", teacher=name)
    if request.batch_size < 1:
        raise TeacherError(f"--batch-size must be at least 1, not {request.batch_size}", teacher=name)
    texts, files = read_texts_from(request.data, request.text_column)
    dtype = "float16" if request.fp16 else "float32"
    data = TeacherData(
        texts=data_hash(texts), rows=len(texts), text_column=request.text_column, files=tuple(files)
    )
    old = head.teachers.get(name)
    if old is not None and not replace:
        why = _differs(old, _draft_entry(info, pooling, dtype, data, layers))
        if why is not None:
            raise FeatureBankMismatchError(
                f"model {model_name!r} already has a teacher {name!r} whose feature banks differ in {why} "
                "from what is asked: pass --replace to compute new ones (the old are never reused for it)",
                teacher=name,
                model=model_name,
                field=why,
            )
        check_teacher(store, old, name=name)  # damaged banks are an error, never trusted
        note(f"teacher {name} is already in {model_name} with these banks: nothing to do (no teacher pass)")
        return TeacherAddResult(
            model_name, name, str(head_hash), head.version, old, 0, 0, len(old.features[0].banks), True, 0.0
        )
    texts_hash = store.put_bytes(texts_bytes(texts))
    assert str(texts_hash) == data.texts
    device = request.device or default_device()

    def teacher() -> LoadedTeacher:
        note(f"loading teacher {folder} on {device}")
        return load_teacher(info, device=device)

    progress = progress_factory(f"teacher {name} features", len(texts)) if progress_factory else None
    run = build_feature_banks(
        store,
        teacher,
        teacher_id=info.id,
        texts=texts,
        layers=layers,
        dim=info.hidden_size,
        pooling=pooling,
        max_length=info.max_length,
        dtype=dtype,
        shard_rows=request.shard_rows,
        batch_size=request.batch_size,
        progress=progress,
    )
    if run.computed_rows == 0:
        note(f"reusing {run.reused_shards * len(layers)} stored feature banks: no teacher pass")
    seconds = time.perf_counter() - t0
    entry = _entry(info, pooling, dtype, data, run, device, seconds, request)
    saved_hash, saved = _save(store, model_name, name, entry, replace=replace)
    return TeacherAddResult(
        model_name,
        name,
        saved_hash,
        saved.version,
        entry,
        run.computed_rows,
        run.computed_shards,
        run.reused_shards,
        False,
        seconds,
    )


def _draft_entry(
    info: TeacherInfo, pooling: str, dtype: str, data: TeacherData, layers: Sequence[int]
) -> TeacherEntry:
    """An entry with no banks yet: enough to compare with an existing one."""
    from scaler_wizard.manifests.teachers import TeacherFeatures

    fake = "sha256:" + "0" * 64
    return TeacherEntry(
        id=info.id,
        weights=info.weights,
        source=source_from_dict(info.source),
        architecture=info.architecture,
        hidden_size=info.hidden_size,
        num_layers=info.num_layers,
        max_length=info.max_length,
        pooling=pooling,
        dtype=dtype,
        data=data,
        features=tuple(TeacherFeatures(layer=layer, dim=info.hidden_size, banks=(fake,)) for layer in layers),
        model_type=info.model_type,
    )


def _entry(
    info: TeacherInfo,
    pooling: str,
    dtype: str,
    data: TeacherData,
    run: BankRun,
    device: str,
    seconds: float,
    request: TeacherRequest,
) -> TeacherEntry:
    draft = _draft_entry(info, pooling, dtype, data, [f.layer for f in run.features])
    provenance = {
        "created": rfc3339(),
        "library": {"distribution": "scaler-wizard", "version": __version__},
        "teacher_files": dict(info.files),
        "shard_rows": request.shard_rows,
        "batch_size": request.batch_size,
        "device": device,
        "computed_rows": run.computed_rows,
        "reused_shards": run.reused_shards,
        "seconds": round(seconds, 3),
    }
    return dataclasses.replace(draft, features=tuple(run.features), provenance=provenance)


def _save(
    store: ContentStore, model_name: str, name: str, entry: TeacherEntry, *, replace: bool
) -> tuple[str, Manifest]:
    """The new version, made on the model's head *now* (a teacher touches nothing a concurrent
    writer changes, so it applies on top of whatever the head became), ref moved last."""
    with store.lock():
        store.clean_temp(stale_only=True)
        current = store.get_ref(model_name)
        if current is None:
            raise ConflictError(f"model {model_name!r} was deleted while its teacher ran", model=model_name)
        head = store.manifest(current)
        manifest = with_teacher(
            head,
            name,
            entry,
            replace=replace,
            version=next_version(store, model_name, head.version),
        )
        h = store.put_manifest(manifest)
        store.set_ref(model_name, h, expected=current, reason=manifest.message or f"add teacher {name}")
    return str(h), manifest


def teacher_summary(name: str, entry: TeacherEntry) -> dict[str, Any]:
    """One teacher as ``teacher list --json`` shows it."""
    return {
        "name": name,
        "source": entry.source.to_dict(),
        "id": entry.id,
        "weights": entry.weights,
        "architecture": entry.architecture,
        "hidden_size": entry.hidden_size,
        "num_layers": entry.num_layers,
        "layers": list(entry.layers),
        "pooling": entry.pooling,
        "max_length": entry.max_length,
        "dtype": entry.dtype,
        "rows": entry.data.rows,
        "data": entry.data.texts,
        "shards": len(entry.features[0].banks) if entry.features else 0,
        "banks": [b for f in entry.features for b in f.banks],
    }


def list_teachers(store: ContentStore, manifest: Manifest, *, verify: bool = False) -> list[dict[str, Any]]:
    """Every teacher of ``manifest`` (by name), with its banks' bytes; ``verify`` checks each one
    (``ok`` true, or the one-line problem)."""
    out = []
    for name, entry in sorted(manifest.teachers.items()):
        row = teacher_summary(name, entry)
        size = 0
        for bank in row["banks"]:
            path = store.object_path(BankHash(bank))
            size += path.stat().st_size if path.is_file() else 0
        row["bytes"] = size
        if verify:
            try:
                check_teacher(store, entry, name=name)
                row["ok"] = True
            except FeatureBankMismatchError as exc:
                row["ok"] = False
                row["problem"] = str(exc)
        out.append(row)
    return out


__all__ = ["TeacherAddResult", "TeacherRequest", "add_teacher", "list_teachers", "read_texts_from"]
