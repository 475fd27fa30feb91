"""Check a change against every manifest rule before any training starts.

A branch whose label is 1,001 characters long, or whose name Windows reserves, must be
refused in the first second, not after minutes of training when the new manifest is
validated. :func:`preflight_branch` builds the manifest the change would make, with
placeholder bank hashes, and validates it.
"""

from __future__ import annotations

from typing import Any

from scaler_wizard.manifests import validate_manifest
from scaler_wizard.names import validate_name
from scaler_wizard.plugin_manager import Registry, get_registry
from scaler_wizard.training.clock import utc_now_iso

#: Stands for a bank not written yet (well-formed, so only the other fields are judged).
PLACEHOLDER = "sha256:" + "0" * 64


def dry_run_entry(
    registry: Registry,
    *,
    strategy: str,
    strategy_config: dict[str, Any] | None,
    head: str,
    head_config: dict[str, Any] | None,
    labels: list[str],
) -> dict[str, Any]:
    """The manifest entry a new branch would get, its banks not yet written."""
    refs = {}
    for kind, name, raw, where in (
        ("strategy", strategy, strategy_config, "strategy"),
        ("head", head, head_config, "head"),
    ):
        reg = registry.get(kind, name, where=f"--{where}")
        _, complete = reg.build_config(raw, where=f"{where}.config")
        refs[kind] = {"plugin": name, "config": complete, "provider": reg.provider()}
    return {
        "strategy": refs["strategy"],
        "adapter_bank": PLACEHOLDER,
        "head": refs["head"],
        "head_bank": PLACEHOLDER,
        "labels": list(labels),
        "trunk": PLACEHOLDER,
    }


def preflight_branch(
    manifest: dict[str, Any],
    name: str,
    *,
    strategy: str,
    strategy_config: dict[str, Any] | None = None,
    head: str = "linear",
    head_config: dict[str, Any] | None = None,
    labels: list[str],
    registry: Registry | None = None,
) -> None:
    """ManifestError (naming the field) if adding this branch would make an invalid manifest."""
    validate_name(name, what="branch")
    validate_manifest(manifest, where="current manifest")
    entry = dry_run_entry(
        registry or get_registry(),
        strategy=strategy,
        strategy_config=strategy_config,
        head=head,
        head_config=head_config,
        labels=labels,
    )
    version = manifest.get("version")
    dry = {
        **manifest,
        "version": version + 1 if isinstance(version, int) else version,
        "parent": PLACEHOLDER,
        "created": utc_now_iso(),
        "branches": {**(manifest.get("branches") or {}), name: entry},
    }
    validate_manifest(dry, where=f"branch {name!r} (checked before training)")
