"""Check a change against every manifest rule before any training starts.

A branch whose label is 1,001 characters long, or whose name Windows reserves, must be
refused in the first second, not after minutes of training when the new manifest is
validated. :func:`preflight_branch` builds the version the change would make
(:func:`~scaler_wizard.versions.builder.with_branch`, which validates it), with placeholder
bank hashes. :func:`branch_for_run` is the same check for the new branches of a ``scaler train``
run, with the refusals of what such a run cannot train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scaler_wizard.branch import Branch
from scaler_wizard.errors import ScalerError
from scaler_wizard.manifests.model import BranchEntry, Manifest, parse_manifest
from scaler_wizard.modeling.compose import new_branch
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.names import validate_name
from scaler_wizard.plugin_manager import Registry, get_registry
from scaler_wizard.training.config import BranchSpec
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


def branch_for_run(model: ScalerModel, spec: BranchSpec, labels: list[str], *, existing: bool) -> Branch:
    """The branch a ``scaler train`` run trains: the model's own, or a new one (not yet added),
    checked against every manifest rule first (:func:`preflight_branch`, as ``branch add``
    does). Refuses, in one line, a branch the run cannot train."""
    if existing:
        branch = model.branch(spec.name)
    else:
        assert model.origin is not None
        preflight_branch(
            model.origin.manifest,
            spec.name,
            strategy=spec.strategy,
            strategy_config=spec.strategy_config,
            head=spec.head,
            head_config=spec.head_config,
            labels=labels,
        )
        branch = new_branch(
            hidden_size=model.trunk_hidden_size(),
            labels=labels,
            strategy=spec.strategy,
            strategy_config=spec.strategy_config,
            head=spec.head,
            head_config=spec.head_config,
        )
    if branch.adapter.needs_base_pass:
        raise ScalerError(
            f"branch {spec.name}: strategy {branch.entry['strategy']['plugin']!r} keeps its adapter inside the "
            "base encoder, which scaler train keeps frozen; train such branches with `scaler branch add`"
        )
    if branch.head.multilabel:
        raise ScalerError(f"branch {spec.name}: multi-label heads are not supported by scaler train yet")
    return branch
