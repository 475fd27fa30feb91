"""Recognising the version a ``scaler train`` run saved itself.

A run saves its version (the ref moves) and only then writes ``result.json``. A run killed
between the two is complete: its version is the model's head. ``--resume`` must then finish
the run (write ``result.json`` for that version), not refuse because "the model moved".

The run binds its version to itself: every branch it trained records, in
``provenance.training``, the run's ``start_manifest`` and the sha256 of the run's own
``run.json`` (which holds the start manifest, the data hashes and the creation time, so no
other run has the same one).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.hashing import sha256_file
from scaler_wizard.errors import ScalerError
from scaler_wizard.manifests.model import Manifest
from scaler_wizard.training.plan import RunPlan


def plan_digest(run_file: Path) -> str:
    """The id a run records in the versions it saves: the sha256 of its ``run.json``."""
    return str(sha256_file(run_file))


def saved_by_run(manifest: Manifest, *, start_manifest: str, digest: str, branches: list[str]) -> bool:
    """True if ``manifest`` is the version the run (``digest``, from ``start_manifest``,
    training ``branches``) saved: its parent is the run's start and every branch the run
    trained says it was trained by this very run."""
    if manifest.parent != start_manifest or not branches:
        return False
    for name in branches:
        entry = manifest.branches.get(name)
        prov = entry.provenance if entry is not None else None
        training = prov.get("training") if isinstance(prov, Mapping) else None
        if not isinstance(training, Mapping):
            return False
        if training.get("plan_sha256") != digest or training.get("start_manifest") != start_manifest:
            return False
    return True


def finished_version(
    store: ContentStore, head: str, *, start_manifest: str, digest: str, branches: list[str]
) -> str | None:
    """``head`` if it is the version this run saved (the run was killed before writing its
    result), else None."""
    manifest = store.manifest(head)
    ok = saved_by_run(manifest, start_manifest=start_manifest, digest=digest, branches=branches)
    return str(head) if ok else None


def check_head(
    store: ContentStore, plan: RunPlan, digest: str, *, resume: bool
) -> tuple[str | None, str | None]:
    """(the model's head, the version this run already saved or None). A run killed after
    saving its version but before ``result.json`` finds its own version as the head; any other
    head than the run's start is refused."""
    head = store.get_ref(plan.model)
    saved = None
    if resume and head is not None and head != plan.start_manifest:
        trained = [b.name for b in plan.branches]
        saved = finished_version(
            store, head, start_manifest=plan.start_manifest, digest=digest, branches=trained
        )
    if head != plan.start_manifest and saved is None:
        raise ScalerError(
            f"model {plan.model!r} moved to {head} since this run started from {plan.start_manifest}; "
            "start a new run on the current version"
        )
    return head, saved
