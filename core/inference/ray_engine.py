"""Batch prediction scaled out on Ray Data: one composed model per actor (issue 15 item 4).

``predict_dataset_on_ray(store, "demo", "big.parquet", "text", ["spam"], actors=8)`` resolves
the model ref to its manifest hash *once, at submit time*, and returns a lazy Ray Dataset:
``map_batches`` over an actor pool (``ActorPoolStrategy(size=actors)``), each actor composing
the model from the store at exactly that hash. An actor whose store lacks that manifest, or
holds other bytes under its name, refuses with a one-line :class:`ManifestMismatchError`
before it labels a row: a job never mixes two versions, even when the ref moves mid-run.

``predict_file_on_ray(store, "demo", "in.csv", "out.parquet", ...)`` runs it and writes the
same file ``predict_file`` writes (every input column, then ``<branch>`` and
``<branch>_score`` per branch, in input order, atomically) through the same writers.

What travels through Ray: Ray moves the data batches and the actor's constructor arguments
between its processes with its own serializer (cloudpickle) - strings only here: the store's
path, the manifest hash, the branch names. No model weights go through it: each actor reads
the banks (safetensors, every hash checked) from the store itself, so the store must be
reachable at ``worker_store`` (default: this store's path) from every node, and
``scaler-wizard`` installed there. ``ray`` is imported inside the functions: ``import
scaler_wizard`` never needs it (``pip install 'scaler-wizard[ray]'``).
"""

from __future__ import annotations

import csv
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scaler_wizard.errors as errors
from scaler_wizard.banks import BankHash, ContentStore
from scaler_wizard.banks.atomic import atomic_writer
from scaler_wizard.errors import (
    BranchNotFoundError,
    DataError,
    ManifestMismatchError,
    ScalerError,
    did_you_mean,
)
from scaler_wizard.inference.file_readers import input_format
from scaler_wizard.inference.file_writers import RowWriter, output_format
from scaler_wizard.inference.files import FileProgress, FileSummary

#: rows handed to one actor call (one Ray batch); sorted by length inside, like a file chunk
CALL_ROWS = 512
#: the one-line hint when Ray is not installed
INSTALL_HINT = "the ray engine needs Ray: pip install 'scaler-wizard[ray]'"


@dataclass(frozen=True)
class RayPrediction:
    """A submitted (lazy) prediction: ``dataset`` has the input columns plus, per branch,
    ``<branch>`` and ``<branch>_score``; nothing runs until it is consumed."""

    dataset: Any  # ray.data.Dataset
    model: str
    manifest_hash: str
    branches: list[str]
    columns: list[str]


def import_ray() -> Any:
    """``ray`` with ``ray.data``, or a one-line ScalerError naming the extra to install."""
    try:
        import ray
        import ray.data  # the Data library comes with the [data] extra
    except ImportError:
        raise ScalerError(INSTALL_HINT) from None
    return ray


def connect(address: str | None = None, *, quiet: bool = False) -> bool:
    """Join the Ray cluster at ``address`` (``None``: ``RAY_ADDRESS`` or a new local instance).

    Returns True when this call started the connection (the caller then owns ``ray.shutdown()``);
    an already initialised Ray is used as it is. ``quiet`` (the CLI): Ray's own log lines and
    the workers' output stay in Ray's log folder (``/tmp/ray/session_latest/logs``), so
    that a failure reads as one line.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if quiet:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        kwargs.update(logging_level=logging.ERROR, log_to_driver=False)
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScalerError(
            f"cannot reach the Ray cluster at {address or 'a new local instance'}: {first}"
        ) from None
    return True


def pin_model(
    store: ContentStore, model_ref: str, branches: Sequence[str] | None
) -> tuple[str, str, list[str]]:
    """(model name, manifest hash, branch names) for ``model_ref``, resolved now.

    ``branches`` None means every branch; an unknown name is a one-line BranchNotFoundError.
    """
    from scaler_wizard.versions.history import resolve_version

    name, h = resolve_version(store, model_ref)
    manifest = store.manifest(h, where=f"manifest {h.short} ({name})")
    have = list(manifest.branches)
    names = have if branches is None else list(dict.fromkeys(branches))
    for n in names:
        if n not in have:
            raise BranchNotFoundError(
                f"no branch named {n!r} {did_you_mean(n, have)}", branch=n, model=name, available=have
            )
    if not names:
        raise DataError(f"model {name!r} has no branch to predict with")
    return name, str(h), names


class RayBranchPredictor:
    """One actor of the pool: composes the pinned manifest once, then labels Arrow batches.

    Refuses (ManifestMismatchError) when the store it reads cannot give that exact manifest.
    """

    def __init__(
        self,
        *,
        store_root: str,
        manifest_hash: str,
        model: str,
        branches: list[str],
        text_column: str,
        batch_size: int,
        threads: int,
        source: str,
    ) -> None:
        import torch

        from scaler_wizard.modeling.compose import compose

        torch.set_num_threads(max(1, threads))
        self.text_column = text_column
        self.branches = branches
        self.batch_size = batch_size
        self.source = source
        store = ContentStore.open(store_root)
        check_worker_manifest(store, manifest_hash, model)
        self.model = compose(store, manifest_hash)
        got = self.model.origin.manifest_hash if self.model.origin is not None else None
        if got != manifest_hash:
            raise ManifestMismatchError(
                f"worker on {socket.gethostname()} composed {got} for {model!r}, not the manifest "
                f"{manifest_hash} pinned at submit",
                expected=manifest_hash,
                found=got,
            )
        for n in branches:
            self.model.branch(n)  # load every branch now, not inside the first batch

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa  # type: ignore[import-untyped]

        texts = batch.column(self.text_column).to_pylist()
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                what = (
                    "missing"
                    if t is None
                    else "empty"
                    if isinstance(t, str)
                    else f"not text ({type(t).__name__})"
                )
                raise DataError(f"{self.source}: a row's text in column {self.text_column!r} is {what}")
        if not texts:
            for n in self.branches:
                batch = batch.append_column(n, pa.array([], pa.string()))
                batch = batch.append_column(f"{n}_score", pa.array([], pa.float64()))
            return batch
        results = self.model.predict(texts, self.branches, batch_size=self.batch_size)  # length-batched
        for n in self.branches:
            labels = [list(p.label) if isinstance(p.label, list) else p.label for p in results[n]]
            scores = [float(p.score) for p in results[n]]
            batch = batch.append_column(n, pa.array(labels))
            batch = batch.append_column(f"{n}_score", pa.array(scores, pa.float64()))
        return batch


def check_worker_manifest(store: ContentStore, manifest_hash: str, model: str) -> None:
    """Refuse unless ``store`` holds exactly the bytes of ``manifest_hash`` (read and hashed here)."""
    where = f"worker on {socket.gethostname()}"
    path = store.manifest_path(manifest_hash)
    try:
        data = path.read_bytes()
    except OSError:
        raise ManifestMismatchError(
            f"{where}: the store {store.root} has no manifest {manifest_hash} ({model!r} as submitted); "
            "give every worker the same store",
            expected=manifest_hash,
        ) from None
    found = str(BankHash.of_bytes(data))
    if found != manifest_hash:
        raise ManifestMismatchError(
            f"{where}: the store {store.root} holds {found} under manifest {manifest_hash} "
            f"({model!r} as submitted): refusing to compose another version",
            expected=manifest_hash,
            found=found,
        )


def _read(ray: Any, src: Any, fmt: str | None) -> tuple[Any, str, list[str] | None]:
    """A Ray Dataset for ``src`` (a Dataset, a file or a folder of files), its name for errors,
    and its columns when the first file tells them without a Ray job (CSV header, Parquet
    footer)."""
    if not isinstance(src, str | os.PathLike):
        return src, "dataset", None
    path = Path(src)
    if not path.exists():
        raise DataError(f"cannot read {path}: no such file or folder", path=path)
    first = path if path.is_file() else next((p for p in sorted(path.iterdir()) if p.is_file()), None)
    if first is None:
        raise DataError(f"{path}: the folder has no file to read", path=path)
    kind = input_format(first, fmt)
    if kind in ("csv", "tsv"):
        import pyarrow as pa
        import pyarrow.csv as pacsv  # type: ignore[import-untyped]

        delimiter = "," if kind == "csv" else "\t"
        try:
            with open(first, encoding="utf-8-sig", newline="") as f:
                header = next(csv.reader(f, delimiter=delimiter), [])
        except (UnicodeDecodeError, OSError) as exc:
            raise DataError(f"cannot read {first}: {exc}", path=first) from exc
        # every cell a string, "" kept as "" (what the local reader does: dtype=str, no NA)
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=False, null_values=[]
        )
        parse = pacsv.ParseOptions(delimiter=delimiter)
        ds = ray.data.read_csv(str(path), convert_options=convert, parse_options=parse)
        return ds, str(path), header
    if kind == "jsonl":
        params = _params(ray.data.read_json)  # `lines` and `file_extensions` came after Ray 2.9
        extra = {k: v for k, v in (("lines", True), ("file_extensions", None)) if k in params}
        return ray.data.read_json(str(path), **extra), str(path), None
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        names = [str(c) for c in pq.read_schema(first).names]
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{first}: cannot read as PARQUET: {str(exc).strip().splitlines()[0]}", path=first
        ) from exc
    return ray.data.read_parquet(str(path)), str(path), names


def predict_dataset_on_ray(
    store: ContentStore,
    model_ref: str,
    dataset_or_path: Any,
    text_column: str = "text",
    branches: Sequence[str] | None = None,
    *,
    address: str | None = None,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    batch_size: int = 32,
    call_rows: int = CALL_ROWS,
    worker_store: str | os.PathLike[str] | None = None,
    input_fmt: str | None = None,
) -> RayPrediction:
    """Label every row of ``dataset_or_path`` on Ray with ``branches`` of ``model_ref``.

    ``dataset_or_path``: a ``ray.data.Dataset``, or a CSV/TSV/JSONL/Parquet file or folder.
    ``model_ref`` (``name``, ``name@VERSION`` or ``sha256:...``) is resolved now; every
    actor composes that manifest hash from ``worker_store`` (default ``store.root``) and
    refuses a mismatch. ``actors`` actors of ``cpus_per_actor`` CPUs each (torch threads
    the same); ``call_rows`` rows per actor call, ``batch_size`` texts per trunk pass.
    Joins the cluster at ``address`` unless Ray is already initialised; the caller shuts
    it down (``ray.shutdown()``) when done with the returned lazy dataset. Input order is
    kept.
    """
    for what, value in (("actors", actors), ("batch_size", batch_size), ("call_rows", call_rows)):
        if value < 1:
            raise ValueError(f"{what} must be at least 1, not {value}")
    name, h, names = pin_model(store, model_ref, branches)
    ray = import_ray()
    connect(address)
    ds, source, known = _read(ray, dataset_or_path, input_fmt)
    every = known if known is not None else list(ds.schema().names)
    columns = [c for c in every if not c.startswith("__index_level_")]
    if text_column not in columns:
        raise DataError(
            f"{source}: no text column {text_column!r} (columns: {', '.join(columns) or 'none'}); "
            "name it with --text-column"
        )
    clash = [c for n in names for c in (n, f"{n}_score") if c in columns]
    if clash:
        raise DataError(
            f"{source}: the input already has column(s) {', '.join(map(repr, clash))}, "
            "which the predictions would overwrite; rename them"
        )
    if len(columns) != len(every):
        ds = ds.select_columns(columns)
    reserve = _reservation(ray, actors, cpus_per_actor)
    if "target_num_rows_per_block" in _params(ds.repartition):
        ds = ds.repartition(target_num_rows_per_block=call_rows)  # a single file still feeds every actor
    out = ds.map_batches(
        RayBranchPredictor,
        fn_constructor_kwargs={
            "store_root": str(worker_store if worker_store is not None else store.root),
            "manifest_hash": h,
            "model": name,
            "branches": names,
            "text_column": text_column,
            "batch_size": batch_size,
            "threads": max(1, int(cpus_per_actor)),
            "source": source,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=reserve,
        batch_size=call_rows,
        batch_format="pyarrow",
        zero_copy_batch=True,
    )
    context = getattr(out, "context", None) or ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    return RayPrediction(out, name, h, names, columns + [c for n in names for c in (n, f"{n}_score")])


def _reservation(ray: Any, actors: int, cpus_per_actor: float) -> float:
    """CPUs each actor reserves: ``cpus_per_actor``, less when the pool would take every CPU
    of the cluster, so that one CPU stays for the read tasks (else Ray Data waits forever to
    read the blocks the actors wait for). Torch threads stay at ``cpus_per_actor``."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if total <= 0 or actors * cpus_per_actor <= total - 1:
        return cpus_per_actor
    return max(0.05, (total - 1) / actors) if total > 1 else max(0.05, total / (2 * actors))


def _params(fn: Callable[..., Any]) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def predict_file_on_ray(
    store: ContentStore,
    model_ref: str,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    text_column: str = "text",
    branches: Sequence[str] | None = None,
    address: str | None = None,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    batch_size: int = 32,
    call_rows: int = CALL_ROWS,
    worker_store: str | os.PathLike[str] | None = None,
    input_fmt: str | None = None,
    output_fmt: str | None = None,
    on_progress: Callable[[FileProgress], None] | None = None,
    quiet: bool = False,
) -> FileSummary:
    """``predict_dataset_on_ray`` into one file, written like ``predict_file`` writes it
    (same columns, order and formats; atomic). Starts Ray when it is not running (``quiet``
    as ``connect`` takes it), and then shuts it down at the end."""
    dst_path = Path(dst)
    out_fmt = output_format(dst_path, output_fmt)
    src_path = Path(src)
    if dst_path.is_dir():
        raise DataError(f"{dst_path}: is a folder; name an output file", path=dst_path)
    if src_path.exists() and dst_path.exists() and os.path.samefile(src_path, dst_path):
        raise DataError(f"{dst_path}: the output would overwrite the input; name another file", path=dst_path)
    pin_model(store, model_ref, branches)  # fail on a bad ref or branch before starting Ray
    ray = import_ray()
    started = connect(address, quiet=quiet)
    start = time.monotonic()
    rows = chunks = 0
    try:
        with worker_errors():
            job = predict_dataset_on_ray(
                store,
                model_ref,
                src_path,
                text_column,
                branches,
                actors=actors,
                cpus_per_actor=cpus_per_actor,
                batch_size=batch_size,
                call_rows=call_rows,
                worker_store=worker_store,
                input_fmt=input_fmt,
            )
            job.dataset.context.enable_progress_bars = False
            with atomic_writer(dst_path) as fh:
                writer = RowWriter(fh, out_fmt)
                for table in job.dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    records = table.to_pylist()
                    writer.write(job.columns, records, rows + 1)
                    rows += len(records)
                    chunks += 1
                    if on_progress is not None:
                        on_progress(FileProgress(rows, 0, 0, time.monotonic() - start))
                writer.close()
    finally:
        if started:
            ray.shutdown()
    return FileSummary(
        rows=rows,
        chunks=chunks,
        branches=job.branches,
        output=str(dst_path),
        input_format=input_format(src_path, input_fmt) if src_path.is_file() else (input_fmt or "?"),
        output_format=out_fmt,
        seconds=time.monotonic() - start,
    )


#: ``scaler_wizard.errors.<Name>: <message>`` in the text of an error Ray brings back
_WORKER_ERROR = re.compile(r"^scaler_wizard\.errors\.(\w+): (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _scaler_cause(exc: BaseException, ray_error: type, depth: int = 0) -> ScalerError | None:
    """The package's own error inside what Ray raised (``cause``, ``__cause__``, ``args``)."""
    if isinstance(exc, ScalerError) and not isinstance(exc, ray_error):
        return exc
    if depth > 8:
        return None
    inner = [getattr(exc, "cause", None), exc.__cause__, *getattr(exc, "args", ())]
    for e in inner:
        if isinstance(e, BaseException) and e is not exc:
            found = _scaler_cause(e, ray_error, depth + 1)
            if found is not None:
                return found
    return None


@contextmanager
def worker_errors() -> Iterator[None]:
    """Turn an error a worker raised (which Ray brings back wrapped in its own, many lines
    long) back into the package's one-line error of the same class."""
    ray = import_ray()
    try:
        yield
    except ray.exceptions.RayError as exc:
        original = _scaler_cause(exc, ray.exceptions.RayError)
        if original is not None:
            raise original.with_traceback(None) from None
        found = _WORKER_ERROR.search(_ANSI.sub("", str(exc)))
        cls = getattr(errors, found.group(1), None) if found else None
        if found is None or not (isinstance(cls, type) and issubclass(cls, ScalerError)):
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ScalerError(f"the Ray job failed: {_ANSI.sub('', first).strip()}") from exc
        raise cls(found.group(2).strip()) from None
