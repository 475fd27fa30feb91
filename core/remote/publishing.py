"""Publish one version of a model to a Hub model repo (the plan; ``scaler_wizard.banks.hub`` talks).

Each publish is one commit, tagged ``v<version>`` (tags are immutable). Publishing uploads only
the banks the revision lacks (a remote copy counts when its LFS sha256 or git blob id matches),
the manifest under its hash and as ``manifest.json``, and the model card.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scaler_wizard.banks.hashing import BankHash
from scaler_wizard.banks.hub import (
    CARD_FILE,
    MANIFEST_FILE,
    bank_file,
    check_revision,
    commit_files,
    create_tag,
    ensure_repo,
    hub_api,
    hub_call,
    list_files,
    manifest_file,
    manifest_hash_at,
    parse_repo_spec,
    remote_copy_ok,
)
from scaler_wizard.banks.model_card import model_card
from scaler_wizard.banks.store import ContentStore
from scaler_wizard.errors import BankNotFoundError, ConflictError, IntegrityError, ScalerError
from scaler_wizard.manifests.facts import banks_of
from scaler_wizard.manifests.model import Manifest, parse_manifest
from scaler_wizard.versions.history import resolve_version

Progress = Callable[[str], None]


def quiet(_message: str) -> None:
    """A progress callback that says nothing."""


def human_size(n: float) -> str:
    """``1.5 MB``: a byte count for people."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def objects_of(store: ContentStore, manifest: Manifest) -> list[tuple[str, BankHash]]:
    """``(field, object)`` for every object a version needs: ``banks_of`` plus folder-bank members
    (read from the tree objects ``store`` holds)."""
    out: list[tuple[str, BankHash]] = []
    seen: set[str] = set()
    pending = [(f, BankHash(h)) for f, h, _kind in banks_of(manifest)]
    while pending:
        where, h = pending.pop(0)
        if h in seen:
            continue
        seen.add(h)
        out.append((where, h))
        if store.has(h):  # a missing bank is the caller's to report
            pending += [(f"{where}/{rel}", m) for rel, m in sorted(store.tree_members(h).items())]
    return out


@dataclass
class PublishResult:
    repo_id: str
    model: str
    version: int
    manifest: str
    tag: str
    revision: str
    commit: str
    uploaded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    already_published: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def publish(
    store: ContentStore,
    model: str,
    repo_id: str,
    *,
    tag: str | None = None,
    revision: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
) -> PublishResult:
    """Publish one version of a model (``name``, ``name@N`` or a manifest hash) as one Hub commit.

    Uploads the manifest (exact bytes), the banks the branch lacks, and a model card, then tags
    the commit (default ``v<version>``). Re-publishing a version that its tag already holds is
    a no-op; a different manifest claiming an existing tag is a ConflictError.
    """
    t0 = time.perf_counter()
    say = progress or quiet
    repo_id, at = parse_repo_spec(repo_id)
    if at is not None:
        raise ScalerError(
            f"publish to {repo_id}, not {repo_id}@{at}: choose the branch with --revision, the tag with --tag"
        )
    name, h = resolve_version(store, model)
    raw = store.manifest_path(h).read_bytes()
    if BankHash.of_bytes(raw) != h:
        raise IntegrityError(f"manifest {h} is corrupt or tampered ({store.manifest_path(h)})")
    manifest = parse_manifest(raw, where=f"manifest {h.short} ({name})")
    version = manifest.version
    tag = check_revision(tag or f"v{version}", "tag")
    branch = check_revision(revision or "main", "branch")

    objects = objects_of(store, manifest)
    missing = next(((where, obj) for where, obj in objects if not store.has(obj)), None)
    if missing is not None:
        raise BankNotFoundError(
            f"cannot publish {name} v{version}: {missing[0]}: bank {missing[1]} is missing from the "
            f"store {store.root} (a partial pull? pull the whole model first)"
        )

    api = hub_api(endpoint, token)
    with hub_call("publish", repo_id, branch):
        tags, heads = ensure_repo(api, repo_id, private=private)
    result = PublishResult(repo_id, name, version, str(h), tag, branch, "")
    if tag in tags:
        remote_h = manifest_hash_at(repo_id, tag, store, endpoint=endpoint, token=token)
        if remote_h != h:
            raise ConflictError(
                f"{repo_id}: tag {tag} already holds manifest {remote_h}, not {name} v{version} ({h}); "
                "tags are immutable: publish with another --tag, or to another repo"
            )
        with hub_call("publish", repo_id, tag):
            result.commit = str(api.repo_info(repo_id, revision=tag).sha)
        result.already_published = True
        result.seconds = time.perf_counter() - t0
        say(f"{repo_id}@{tag} already holds {name} v{version}: nothing to do")
        return result

    # Every bank intact (re-hashed, the cache not trusted) before anything is sent.
    say(f"checking {len(objects)} banks of {name} v{version}")
    local: dict[BankHash, tuple[str, Path]] = {}
    for _where, obj in objects:
        path = store.verified_path(obj, trust_cache=False)
        local[obj] = (bank_file(obj, path), path)
    with hub_call("publish", repo_id, branch):
        if branch not in heads:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = str(api.repo_info(repo_id, revision=branch).sha)
        listing = list_files(api, repo_id, head)
    files: list[tuple[str, str | bytes]] = []
    for obj, (rpath, path) in sorted(local.items(), key=lambda kv: kv[1][0]):
        if rpath in listing and remote_copy_ok(listing[rpath], obj, path):
            result.reused.append(rpath)
            continue
        files.append((rpath, str(path)))
        result.uploaded.append(rpath)
        result.uploaded_bytes += path.stat().st_size
    card = model_card(manifest, h, repo_id=repo_id, tag=tag).encode()
    files += [(manifest_file(h), raw), (MANIFEST_FILE, raw), (CARD_FILE, card)]
    say(
        f"uploading {len(result.uploaded)} banks ({human_size(result.uploaded_bytes)}); "
        f"{len(result.reused)} already in {repo_id}@{branch}"
    )
    with hub_call("publish", repo_id, branch):
        result.commit = commit_files(
            api,
            repo_id,
            files,
            message=f"{name} v{version}",
            description=f"scaler-wizard manifest {h}\n\n{manifest.message or ''}".strip(),
            revision=branch,
            parent_commit=head,
        )
        tagged = create_tag(api, repo_id, tag=tag, commit=result.commit, message=f"{name} v{version} {h}")
        # lost a race for the tag: fine only if it holds this version
        if not tagged and manifest_hash_at(repo_id, tag, store, endpoint=endpoint, token=token) != h:
            raise ConflictError(f"{repo_id}: tag {tag} was created by another publisher meanwhile")
    result.seconds = time.perf_counter() - t0
    say(f"published {name} v{version} to {repo_id}@{tag} (commit {result.commit[:12]})")
    return result


__all__ = ["Progress", "PublishResult", "human_size", "objects_of", "publish", "quiet"]
