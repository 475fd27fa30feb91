"""The ``peft-lora`` strategy's implementation: LoRA adapters inside the base encoder, via PEFT.

Imported only when the strategy is used (``peft_lora.register_branch_strategies``), so listing
plugins or ``scaler --help`` never loads torch or PEFT. Everything here goes through the public
encoder-host protocol (``scaler_wizard.encoder_host``): the adapters are injected into
``host.model`` with ``peft.get_peft_model``/``add_adapter``, and one ``PeftSwitch`` per host
turns them on for their branch's own pass and off for every other pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from scaler_wizard.branch import BranchAdapter, TrunkOutput
from scaler_wizard.encoder_host import EncoderHost
from scaler_wizard.errors import IntegrityError, PluginError, ScalerError
from scaler_wizard.plugins.peft_lora import PeftLoRAConfig
from scaler_wizard.plugins.peft_safety import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_adapter_config,
    check_members,
    load_adapter_weights,
    lora_config,
    read_adapter_config,
)

#: The key of the PEFT switch on an encoder host.
SWITCH_KEY = "peft-lora"


def adapter_name(branch: str) -> str:
    """The PEFT adapter name of ``branch`` (PEFT keeps adapters in ModuleDicts, whose keys may
    not contain '.', as branch names may)."""
    return "sw_" + hashlib.sha1(branch.encode()).hexdigest()[:16]


class PeftSwitch:
    """The ``AdapterSwitch`` of one host: the ``PeftModel`` wrapping ``host.model``."""

    def __init__(self, peft: Any) -> None:
        self.peft = peft

    def holds(self, branch: str) -> bool:
        return adapter_name(branch) in self.peft.peft_config

    def active(self, branch: str | None) -> contextlib.AbstractContextManager[Any]:
        if branch is None:
            # every adapter off for the pass (PEFT turns them back on when it ends)
            return self.peft.disable_adapter() if self.peft.peft_config else contextlib.nullcontext()
        self.peft.set_adapter(adapter_name(branch))  # this one on, every other off
        return contextlib.nullcontext()


def peft_model(host: EncoderHost) -> Any:
    """The ``PeftModel`` wrapping the host's encoder once any PEFT adapter exists, else None."""
    switch = host.adapter_switch(SWITCH_KEY)
    return switch.peft if isinstance(switch, PeftSwitch) else None


def freeze_all_but(host: EncoderHost, name: str | None) -> None:
    """Only the named PEFT adapter's parameters require grad (none when ``name`` is None)."""
    for n, p in host.model.named_parameters():
        p.requires_grad_(name is not None and f".{name}." in n)


def add_adapter(host: EncoderHost, branch: str, config: Any) -> None:
    """Inject a fresh PEFT adapter for ``branch``: ``config`` is a dict of plain LoRA settings
    (LoraConfig arguments: r, lora_alpha, lora_dropout, target_modules), checked against the
    allow-list the bank loader uses, so a branch that would not load back is refused before
    it trains; or a LoraConfig built by this module."""
    from peft import get_peft_model

    if isinstance(config, dict):
        args = check_adapter_config(
            {"peft_type": "LORA", **config},
            where=f"branch {branch!r}: peft-lora",
            source="LoRA setting",
            error=PluginError,
        )
        config = lora_config(args)
    name = adapter_name(branch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = peft_model(host)
        if peft is None:
            host.add_adapter_switch(
                SWITCH_KEY, PeftSwitch(get_peft_model(host.model, config, adapter_name=name))
            )
        else:
            peft.add_adapter(name, config)
    freeze_all_but(host, name)


def load_adapter(
    host: EncoderHost,
    branch: str,
    folder: Path,
    *,
    expect: dict[str, Any] | None = None,
    where: str | None = None,
) -> None:
    """Load a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    Not through ``PeftModel.from_pretrained``/``load_adapter``: those fall back to
    ``torch.load`` (pickle) on ``adapter_model.bin`` and honour options that rewrite the
    shared base (PiSSA-style inits, ``modules_to_save``, biases...). The folder's members
    and config are checked against allow-lists first (``peft_safety``), a plain LoRA adapter
    is injected, and only its own weights are copied in from safetensors. ``expect``
    (LoraConfig arguments, e.g. from the manifest) must match the folder's config.
    """
    where = where or f"branches.{branch}.adapter_bank"
    check_members((p.name for p in folder.iterdir()) if folder.is_dir() else (), where=where)
    args = read_adapter_config(folder / CONFIG_FILE, where=where)
    for key, value in (expect or {}).items():
        got = args[key]
        same = sorted(got) == sorted(value) if key == "target_modules" else got == value
        if not same:
            raise IntegrityError(
                f"{where}: {CONFIG_FILE} says {key}={got!r:.60}, "
                f"the branch's strategy config says {value!r:.60}"
            )
    name = adapter_name(branch)
    peft = peft_model(host)
    if peft is not None and name in peft.peft_config:
        raise ScalerError(f"branch {branch!r} already has an adapter in the base encoder")
    try:
        add_adapter(host, branch, lora_config(args))
    except ValueError as exc:  # PEFT: a target module the base does not have
        raise IntegrityError(f"{where}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    try:
        load_adapter_weights(peft_model(host), name, folder / WEIGHTS_FILE, where=where)
    except BaseException:
        delete_adapter(host, branch)
        raise
    finally:
        freeze_all_but(host, None)


def save_adapter(host: EncoderHost, branch: str, dest: Path, *, base_name: str) -> Path:
    """Write ``branch``'s adapter as a stock PEFT folder under ``dest``; returns the folder."""
    name = adapter_name(branch)
    peft = peft_model(host)
    if peft is None or name not in peft.peft_config:
        raise ScalerError(f"branch {branch!r} has no adapter in the base encoder")
    cfg = peft.peft_config[name]
    # Stable bytes: the config must not carry the temporary folder the base was loaded from.
    cfg.base_model_name_or_path = base_name
    cfg.revision = None
    # PEFT keeps target_modules as a set and writes it in set order, which changes from one
    # process to the next (string hashing): sorted, the same adapter gives the same bank bytes.
    modules = cfg.target_modules
    if isinstance(modules, (set, frozenset)):
        cfg.target_modules = sorted(modules)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.save_pretrained(str(dest), selected_adapters=[name])
    finally:
        cfg.target_modules = modules
    folder = dest / name
    card = folder / "README.md"
    if card.exists():
        card.unlink()
    # Never store a bank the loader would refuse (checked with the same allow-lists).
    check_folder(folder, where=f"branches.{branch}.adapter_bank")
    return folder


def check_folder(folder: Path, *, where: str) -> None:
    """The folder holds exactly a plain-LoRA ``adapter_config.json`` and the safetensors weights."""
    check_files({p.name: p for p in folder.iterdir()}, where=where)


def check_files(files: Mapping[str, Path], *, where: str) -> None:
    """``check_folder`` for a folder bank's members given as ``{name: path}``."""
    check_members(files, where=where)
    read_adapter_config(files[CONFIG_FILE], where=where)


def delete_adapter(host: EncoderHost, branch: str) -> None:
    name = adapter_name(branch)
    peft = peft_model(host)
    if peft is not None and name in peft.peft_config:
        peft.delete_adapter(name)


def adapter_parameters(host: EncoderHost, branch: str) -> list[nn.Parameter]:
    """The parameters of ``branch``'s adapter (made trainable, every other frozen)."""
    name = adapter_name(branch)
    freeze_all_but(host, name)
    return [p for n, p in host.model.named_parameters() if f".{name}." in n]


class PeftLoRA(BranchAdapter):
    # No docstring on purpose: `scaler plugins` shows a factory's first docstring line, and
    # this strategy has always shown none there.
    needs_base_pass = True
    bank_format = "folder"
    bank_layout = "peft"

    def __init__(self, config: PeftLoRAConfig, *, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.out_features = hidden_size
        self._params: list[nn.Parameter] = []

    def lora_args(self) -> dict[str, Any]:
        """The LoraConfig arguments this branch's config stands for (and its bank must state)."""
        return {
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": list(self.config.target_modules),
        }

    def forward(self, trunk: TrunkOutput) -> Tensor:
        return trunk.pooled  # the adaptation happened inside the encoder, in this branch's own pass

    def attach(self, base: EncoderHost, branch: str) -> None:
        try:
            # plain settings, not a LoraConfig: checked against the same allow-list as the
            # bank loader (refused now, not after training)
            add_adapter(base, branch, self.lora_args())
        except ValueError as exc:  # PEFT: target modules not found in the base model
            raise ValueError(f"peft-lora cannot adapt this base: {str(exc).splitlines()[0]}") from exc

    def detach(self, base: EncoderHost, branch: str) -> None:
        delete_adapter(base, branch)

    def export_folder(self, base: EncoderHost, branch: str, dest: Path, *, base_name: str) -> Path:
        return save_adapter(base, branch, dest, base_name=base_name)

    def import_folder(self, base: EncoderHost, branch: str, folder: Path) -> None:
        # Loaded through peft_safety's allow-lists (never PEFT's .bin fallback); the folder's
        # own LoRA settings must be the ones the manifest's strategy entry states.
        load_adapter(base, branch, folder, expect=self.lora_args())

    def check_folder(self, files: Mapping[str, Path], *, where: str) -> None:
        check_files(files, where=where)

    def trainable_parameters(self, base: EncoderHost, branch: str) -> list[nn.Parameter]:
        return adapter_parameters(base, branch)


__all__ = [
    "SWITCH_KEY",
    "PeftLoRA",
    "PeftSwitch",
    "adapter_name",
    "adapter_parameters",
    "add_adapter",
    "check_folder",
    "delete_adapter",
    "load_adapter",
    "peft_model",
    "save_adapter",
]
