"""Where ``scaler inspect BASE`` finds a config: package, folder, store model, or Hub id.

Only ``config.json`` is read: the module is built from it on the ``meta`` device, so no
weights are loaded (never pickle) and a big model allocates nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scaler_wizard.errors import HubError, ModelNotFoundError, ScalerError, StoreError
from scaler_wizard.inspection.architecture import Architecture, build_meta, detect


def _config_from_dict(data: dict[str, Any], where: str) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ScalerError(f"{where}: config.json has no model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # transformers raises ValueError/KeyError for unknown types
        raise ScalerError(f"{where}: transformers cannot read this config ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _read_config_file(path: Path, where: str) -> Any:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScalerError(f"{where}: cannot read config.json ({_first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise ScalerError(f"{where}: config.json is not a JSON object")
    return _config_from_dict(data, where)


def _store_model(spec: str, store_root: str | Path | None) -> tuple[Any, dict[str, Any]] | None:
    """The config of a store model's base, or None when ``spec`` names no model in the store."""
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.versions.history import resolve

    if "/" in spec:
        return None
    try:
        store = ContentStore.open(store_root)
        version = resolve(store, spec)
    except (StoreError, ModelNotFoundError):
        return None
    base = version.manifest["base"]
    h = base["files"].get("config.json")
    if h is None:
        raise ScalerError(f"model {spec}: its base has no config.json in the store")
    config = _read_config_file(store.verified_path(h), f"model {spec} base")
    source = {"type": "model", "model": version.name, "version": version.number, "base": base["source"]}
    if isinstance(base.get("inspection"), dict):  # (issue 13) what init / expand recorded
        source["recorded"] = version.manifest
    return config, source


def _hub_config(spec: str, *, models: bool) -> tuple[Any, dict[str, Any]]:
    """Only ``config.json`` from the Hub (``HF_HUB_OFFLINE`` is the client's to respect)."""
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "config.json", revision=revision or None)
    except Exception as exc:  # the hub client raises many types; one line is what matters
        raise HubError(
            f"cannot get base {spec!r}: not an installed package, a folder, "
            f"{'a model in the store, ' if models else ''}or a reachable Hub repo ({_first_line(exc)})",
            repo=repo_id,
            revision=revision or None,
        ) from exc
    return _read_config_file(Path(path), f"Hub repo {repo_id}"), {
        "type": "hub",
        "repo_id": repo_id,
        "revision": Path(path).parent.name,
    }


def find_config(
    spec: str | None, store_root: str | Path | None = None, *, models: bool = True
) -> tuple[Any, dict[str, Any]]:
    """(transformers config, where it came from) for a package, folder, store model or Hub id."""
    from scaler_wizard.modeling.base_encoder import locate_base, package_model_dir

    if spec is None or Path(spec).expanduser().is_dir() or package_model_dir(spec) is not None:
        located = locate_base(spec)
        return _read_config_file(located.path / "config.json", f"base {located.path}"), located.source
    found = _store_model(spec, store_root) if models else None
    if found is not None:
        return found
    return _hub_config(spec, models=models)


def inspect_base(
    spec: str | None, store_root: str | Path | None = None, *, models: bool = True
) -> tuple[Architecture, dict[str, Any]]:
    """Detect the architecture of a base (see ``find_config``), built on ``meta``."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config, source = find_config(spec, store_root, models=models)
    recorded = source.pop("recorded", None)
    if recorded is not None:  # a composed model: what its manifest records, nothing rebuilt
        arch = recorded_inspection(recorded)
        if arch is not None:
            source["from"] = "manifest"
            return arch, source
    try:
        module = build_meta(config)
    except Exception as exc:
        raise ScalerError(f"transformers cannot build {config.model_type}: {_first_line(exc)}") from exc
    return detect(config, module), source


def check_composable(spec: str | None) -> Architecture:
    """Refuse (one line) a base the composition cannot use, saying why (``scaler init``);
    return what was detected (``scaler init`` records it in the manifest, ``base.inspection``)."""
    arch, _ = inspect_base(spec, models=False)
    if not arch.supported:
        raise ScalerError(f"cannot compose on base {spec}: {arch.reason}")
    return arch


def recorded_inspection(manifest: Any) -> Architecture | None:
    """The architecture a manifest's ``base.inspection`` records (None when it has none: a
    manifest written before issue 13). ``evidence`` says where it came from."""
    from scaler_wizard.manifests.model import as_manifest

    m = as_manifest(manifest)
    rec = m.base.inspection
    if rec is None:
        return None
    fields = rec.to_dict()
    where = f"recorded in the manifest (base.inspection, base bank {m.base.bank[7:19]})"
    return Architecture(
        model_type=m.base.model_type or m.base.architecture,
        evidence={k: where for k in fields},
        **fields,
    )
