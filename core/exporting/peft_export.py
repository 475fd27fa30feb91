"""``scaler export --format peft``: each in-encoder branch as a stock PEFT adapter folder + its head.

For each exported branch ``B`` the export holds::

    DEST/B/adapter/adapter_config.json        stock PEFT (base_model_name_or_path: the base)
    DEST/B/adapter/adapter_model.safetensors  the branch's LoRA weights, byte for byte
    DEST/B/head.safetensors                   the head's weights (the head bank's bytes)
    DEST/B/head.json                          labels, head plugin + config, pooling, manifest hash
    DEST/B/README.md                          how to load both with transformers + peft

Only branches whose strategy keeps a stock PEFT folder bank (``bank_format == "folder"`` and
``bank_layout == "peft"``, e.g. ``peft-lora``) can be exported so; the others live after the
encoder in scaler's own modules. The MoE trunk is not exported: outputs equal scaler's only
when the trunk is the identity (a freshly initialised trunk is exactly that: zero output
projections), which ``head.json`` records as ``trunk_is_identity``.

Everything is read from verified store objects, copied as real files (never symlinks) into a
temporary folder next to ``DEST``, and renamed into place at the end. No pickle is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import BranchNotFoundError, ExportError, ScalerError, did_you_mean
from scaler_wizard.exporting.staging import check_dest, staged
from scaler_wizard.manifests.facts import base_display_name, base_hub_id, branch_trunk_problem, trunk_id
from scaler_wizard.manifests.model import Manifest
from scaler_wizard.modeling.base_encoder import package_model_dir
from scaler_wizard.modeling.tensor_banks import load_bank_tensors
from scaler_wizard.plugin_manager import Registry, get_registry
from scaler_wizard.plugins.peft_safety import CONFIG_FILE, WEIGHTS_FILE, check_members, read_adapter_config
from scaler_wizard.versions.history import resolve_version

#: The version of this export's layout (``head.json``'s ``export_format``).
EXPORT_FORMAT = 1


@dataclass(frozen=True)
class ExportedBranch:
    """One branch written under ``folder`` (``folder/adapter``, ``folder/head.safetensors``...)."""

    name: str
    strategy: str
    folder: Path


@dataclass(frozen=True)
class SkippedBranch:
    """A branch left out (``--branches`` not given) and why."""

    name: str
    strategy: str
    reason: str


@dataclass(frozen=True)
class ExportResult:
    dest: Path
    model: str
    manifest_hash: str
    exported: tuple[ExportedBranch, ...]
    skipped: tuple[SkippedBranch, ...]
    trunk_is_identity: bool
    base: str


def _not_exportable(manifest: Manifest, name: str, registry: Registry) -> str | None:
    """Why branch ``name`` cannot be a stock PEFT folder, or None if it can."""
    entry = manifest.branches[name]
    strategy = entry.strategy.plugin
    try:
        factory = registry.get("strategy", strategy).factory
    except ScalerError as exc:
        return str(exc)
    if getattr(factory, "bank_format", None) != "folder" or getattr(factory, "bank_layout", None) != "peft":
        return (
            f"branch {name!r} uses strategy {strategy!r}, which adapts after the encoder: "
            "it cannot be a stock PEFT adapter (only in-encoder strategies such as peft-lora can)"
        )
    problem = branch_trunk_problem(manifest, name)
    if problem is not None:
        return problem
    return None


def _trunk_is_identity(store: ContentStore, manifest: Manifest) -> bool:
    """Every MoE layer adds exactly 0 (zero output projections and biases, as freshly built)."""
    for layer in manifest.trunk.layers:
        tensors = load_bank_tensors(store.verified_path(layer.bank), name=layer.bank)
        for key in ("w_out", "b_out"):
            t = tensors.get(key)
            if t is None or bool(t.count_nonzero()):
                return False
    return True


def _write_adapter(store: ContentStore, bank: str, folder: Path, *, base: str, where: str) -> None:
    """Copy a folder bank's files (verified) into ``folder``, the config naming ``base``."""
    tree = store.read_tree(bank)
    if tree is None or tree.get("kind") != "adapter" or tree.get("layout") != "peft":
        raise ExportError(f"{where}: bank {bank} is not a PEFT adapter folder bank")
    members = store.tree_members(bank)
    check_members(members, where=where)
    folder.mkdir(parents=True)
    config_path = store.verified_path(members[CONFIG_FILE])
    read_adapter_config(config_path, where=where)  # the allow-list: plain LoRA, nothing touching the base
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    if raw.get("base_model_name_or_path") == base and raw.get("revision") is None:
        shutil.copyfile(config_path, folder / CONFIG_FILE)  # the bank's bytes
    else:
        raw["base_model_name_or_path"] = base
        raw["revision"] = None
        text = json.dumps(raw, indent=2, sort_keys=True) + "\n"
        (folder / CONFIG_FILE).write_text(text, encoding="utf-8")
    shutil.copyfile(store.verified_path(members[WEIGHTS_FILE]), folder / WEIGHTS_FILE)


def _readme(name: str, info: dict[str, Any], base_folder: str | None) -> str:
    pooling = info["pooling"]
    pool_code = (
        "pooled = hidden[:, 0]"
        if pooling == "cls"
        else "m = batch['attention_mask'].unsqueeze(-1).float()\n"
        "pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)"
    )
    decode = (
        "probs = logits.sigmoid()  # multilabel: a label is predicted when its probability >= threshold"
        if info["head"]["plugin"] == "multilabel"
        else "probs = logits.softmax(-1)"
    )
    local = (
        f"\n  Offline: the packaged folder this base was banked from, `{base_folder}`."
        if base_folder and base_folder != info["base"]
        else ""
    )
    if info["trunk_is_identity"]:
        trunk = (
            "The model's MoE trunk is the identity (freshly initialised: it adds exactly 0), so "
            "this reproduces scaler's logits for this branch."
        )
    else:
        trunk = (
            f"NOT included: the scaler MoE trunk ({info['trunk']['layers']} layers, trunk id "
            f"`{info['trunk']['id']}`) this branch was trained on, in manifest `{info['manifest_hash']}`. "
            "That trunk is not the identity, so the logits computed below differ from scaler's; use scaler "
            "itself for the exact model."
        )
    if set(info["head_tensors"]) == {"linear.weight", "linear.bias"}:
        head_code = 'logits = pooled @ head["linear.weight"].T + head["linear.bias"]'
    else:  # a third-party head: its tensors are listed, its forward is its plugin's
        head_code = f"logits = ...  # the {info['head']['plugin']!r} head plugin's forward over pooled"
    return f"""# Branch `{name}` of scaler model `{info["model"]}` (version {info["version"]})

Exported by `scaler export --format peft` from manifest `{info["manifest_hash"]}`.

* `adapter/`: a stock PEFT LoRA adapter for the base `{info["base"]}` (its
  `base_model_name_or_path`).{local}
* `head.safetensors` + `head.json`: the `{info["head"]["plugin"]}` head over the {pooling}-pooled
  last hidden state; labels in `head.json` (`labels`, in logit order).
* MoE trunk: {trunk}

```python
import json, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

base = AutoModel.from_pretrained("{info["base"]}", use_safetensors=True)
tok = AutoTokenizer.from_pretrained("{info["base"]}")
model = PeftModel.from_pretrained(base, "adapter").eval()
head = load_file("head.safetensors")
labels = json.load(open("head.json"))["labels"]

batch = tok(["some text"], padding=True, truncation=True, max_length={info["max_length"]}, return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
    {pool_code.replace(chr(10), chr(10) + "    ")}
    {head_code}
    {decode}
```
"""


def export_peft(
    store: ContentStore,
    model_ref: str,
    dest: str | os.PathLike[str],
    *,
    branches: Sequence[str] | None = None,
    registry: Registry | None = None,
) -> ExportResult:
    """Export ``model_ref``'s in-encoder branches (all, or ``branches``) as PEFT folders under ``dest``.

    A named branch that cannot be exported is a one-line ``ExportError``; without ``branches``
    such branches are skipped (``ExportResult.skipped`` says why), and it is an error only when
    none is left. ``dest`` must not exist or be an empty folder; it is written atomically.
    """
    registry = registry or get_registry()
    dest_path = Path(dest).expanduser().absolute()
    check_dest(dest_path)
    name, h = resolve_version(store, model_ref)
    manifest = store.manifest(h, where=f"manifest {h.short} ({name})")
    chosen: list[str] = []
    skipped: list[SkippedBranch] = []
    if branches:
        for b in branches:
            if b not in manifest.branches:
                raise BranchNotFoundError(
                    f"no branch named {b!r} in {name}@{manifest.version} "
                    f"{did_you_mean(b, list(manifest.branches))}",
                    branch=b,
                    model=name,
                    available=list(manifest.branches),
                )
            why = _not_exportable(manifest, b, registry)
            if why is not None:
                raise ExportError(f"cannot export {why}")
            if b not in chosen:
                chosen.append(b)
    else:
        for b, entry in manifest.branches.items():
            why = _not_exportable(manifest, b, registry)
            if why is None:
                chosen.append(b)
            else:
                skipped.append(SkippedBranch(b, entry.strategy.plugin, why))
        if not chosen:
            what = "it has no branches" if not manifest.branches else "none of its branches is in-encoder"
            raise ExportError(
                f"nothing to export as PEFT from {name}@{manifest.version}: {what} "
                "(only in-encoder strategies such as peft-lora can)"
            )

    # The adapter names its base as scaler's banks do (the Hub id where there is one: the
    # packaged MiniLM is sentence-transformers/all-MiniLM-L6-v2); a packaged base with no
    # known Hub id is named by its installed folder, which transformers can load.
    src = manifest.base.source.to_dict()
    base_folder = None
    if src.get("type") == "package":
        found = package_model_dir(str(src.get("package")))
        base_folder = str(found) if found is not None else None
    base = base_hub_id(manifest) or base_folder or base_display_name(manifest)
    identity = _trunk_is_identity(store, manifest)
    tid = trunk_id(manifest)

    exported: list[ExportedBranch] = []
    with staged(dest_path) as staging:
        for b in chosen:
            entry = manifest.branches[b]
            where = f"branches.{b}.adapter_bank"
            folder = staging / b
            _write_adapter(store, entry.adapter_bank, folder / "adapter", base=base, where=where)
            head_path = store.verified_path(entry.head_bank)
            shutil.copyfile(head_path, folder / "head.safetensors")
            head_tensors = load_bank_tensors(head_path, name=entry.head_bank)
            info: dict[str, Any] = {
                "export_format": EXPORT_FORMAT,
                "model": name,
                "version": manifest.version,
                "manifest_hash": str(h),
                "branch": b,
                "strategy": entry.strategy.to_dict(),
                "head": entry.head.to_dict(),
                "labels": list(entry.labels),
                "head_tensors": {k: list(t.shape) for k, t in sorted(head_tensors.items())},
                "pooling": manifest.trunk.pooling,
                "max_length": manifest.base.max_length,
                "base": base,
                "trunk": {"id": tid, "layers": len(manifest.trunk.layers)},
                "trunk_is_identity": identity,
            }
            (folder / "head.json").write_text(
                json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            (folder / "README.md").write_text(_readme(b, info, base_folder), encoding="utf-8")
            exported.append(ExportedBranch(b, entry.strategy.plugin, dest_path / b))
    return ExportResult(
        dest=dest_path,
        model=name,
        manifest_hash=str(h),
        exported=tuple(exported),
        skipped=tuple(skipped),
        trunk_is_identity=identity,
        base=base,
    )


__all__ = ["EXPORT_FORMAT", "ExportError", "ExportResult", "ExportedBranch", "SkippedBranch", "export_peft"]
