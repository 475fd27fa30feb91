"""Check a change against every manifest rule before any training starts.

A branch whose label is 1,001 characters long, or whose name Windows reserves, must be
refused in the first second, not after minutes of training when the new manifest is
validated. :func:`preflight_branch` builds the version the change would make
(:func:`~scaler_wizard.versions.builder.with_branch`, which validates it), with placeholder
bank hashes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scaler_wizard.manifests.model import BranchEntry, Manifest, parse_manifest
from scaler_wizard.names import validate_name
from scaler_wizard.plugin_manager import Registry, get_registry
from scaler_wizard.versions.builder import with_branch

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
    manifest: Manifest | Mapping[str, Any],
    name: str,
    *,
    strategy: str,
    strategy_config: dict[str, Any] | None = None,
    head: str = "linear",
    head_config: dict[str, Any] | None = None,
    labels: list[str],
    registry: Registry | None = None,
) -> None:
    """ManifestError (naming the field) if adding this branch would make an invalid manifest
    (``manifest``: the current version, typed, or its JSON object, validated here)."""
    validate_name(name, what="branch")
    current = (
        manifest if isinstance(manifest, Manifest) else parse_manifest(manifest, where="current manifest")
    )
    entry = dry_run_entry(
        registry or get_registry(),
        strategy=strategy,
        strategy_config=strategy_config,
        head=head,
        head_config=head_config,
        labels=labels,
    )
    with_branch(
        current, name, BranchEntry.from_dict(entry), where=f"branch {name!r} (checked before training)"
    )
