"""Sync a model with a Hub model repo: pull planning, and ``HubRepo`` (publish + pull).

The byte transport (repo layout, client, error mapping) is ``scaler_wizard.banks.hub``; this
module decides what to move: which manifest to store (the remote one, a new version of some
of its branches, or a new local version with branches added), which published ancestors to
bring along, whether a branch fits the local trunk, which objects the store lacks, and how
the model's ref moves (created, fast-forwarded, or refused).

Pulling downloads only the banks the local store lacks, into a staging folder inside the
store, and checks every sha256 before anything enters the store; the manifests go in next
and the model's ref moves last, under the store lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from scaler_wizard.banks.atomic import TMP_PREFIX
from scaler_wizard.banks.hashing import BankHash, is_bank_hash, sha256_file
from scaler_wizard.banks.hub import (
    BANKS_DIR,
    MANIFEST_FILE,
    MANIFESTS_DIR,
    bank_file,
    bank_files_in,
    download,
    hub_api,
    hub_call,
    manifest_file,
    parse_repo_spec,
    revision_files,
)
from scaler_wizard.banks.store import ContentStore, validate_name
from scaler_wizard.errors import (
    BankNotFoundError,
    BranchNotFoundError,
    ConflictError,
    IntegrityError,
    ScalerError,
    did_you_mean,
)
from scaler_wizard.manifests.facts import banks_of, trunk_id, trunk_ids
from scaler_wizard.manifests.model import BranchEntry, Manifest, parse_manifest
from scaler_wizard.remote.publishing import Progress, human_size, quiet
from scaler_wizard.versions.builder import new_version
from scaler_wizard.versions.history import history, next_version


@dataclass
class PullResult:
    repo_id: str
    revision: str
    commit: str
    name: str
    manifest: str
    version: int
    branches: list[str]
    action: str = ""  # created | fast-forward | added-branches | up-to-date
    downloaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    already_here: int = 0
    history: int = 0  # ancestor manifests added
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _staging_dir(store: ContentStore) -> Path:
    """A fresh staging folder in the store; adopts the downloads of a pull that died."""
    mine = store.scratch_dir("pull")
    for old in sorted((store.root / "tmp").glob(f"{TMP_PREFIX}pull-*")):
        parts = old.name.split("-")
        if old == mine or len(parts) < 4 or not parts[2].isdigit() or _pid_alive(int(parts[2])):
            continue
        with contextlib.suppress(OSError):  # another pull may be adopting it too
            if (old / "download").is_dir() and not (mine / "download").exists():
                os.rename(old / "download", mine / "download")
            shutil.rmtree(old)
    return mine


def _parse_manifest(raw: bytes, where: str) -> Manifest:
    """A downloaded manifest: limits, schema, semantics, and canonical bytes (its hash is its name)."""
    return parse_manifest(raw, where=where, canonical=True)


@dataclass
class _Remote:
    """One pinned commit of a repo: its listing, and a way to download from it."""

    label: str  # repo_id@revision, for messages
    files: dict[str, Any]  # path -> RepoSibling (size, lfs)
    fetch: Callable[[list[str]], dict[str, Path]]


@dataclass
class _Plan:
    target: Manifest
    name: str
    expected_ref: BankHash | None  # --into: the local head the new version builds on
    ancestors: list[tuple[BankHash, Manifest]] = field(default_factory=list)


def pull(
    store: ContentStore,
    spec: str,
    *,
    as_name: str | None = None,
    branches: list[str] | None = None,
    into: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Pull ``repo_id[@revision]`` (default ``main``) into a local store.

    * whole model: the manifest keeps its hash; the ref ``as_name`` (default: the manifest's
      name) is created, or fast-forwarded if it points at an ancestor;
    * ``branches``: a new model of just those branches plus the trunk (version 1 of its own);
    * ``into``: add the branches (default all) to an existing local model as a new version,
      accepted only if each branch was trained on that model's trunk.

    Nothing enters the store before every downloaded file hashes to its name; a pull killed
    at any point leaves the store as it was (a retry reuses what was downloaded).
    """
    t0 = time.perf_counter()
    say = progress or quiet
    repo_id, rev = parse_repo_spec(spec)
    rev = rev or "main"
    if into is not None and as_name is not None:
        raise ScalerError("--as names a new model and --into adds to an existing one: give one of them")
    if as_name is not None:
        validate_name(as_name)
    if into is not None:
        store.resolve(into)  # fail before downloading anything
    api = hub_api(endpoint, token)
    with hub_call("pull", repo_id, rev):
        commit, files = revision_files(api, repo_id, rev)
    label = f"{repo_id}@{rev}"
    if MANIFEST_FILE not in files:
        raise ScalerError(f"{label} is not a scaler-wizard model: it has no {MANIFEST_FILE}")
    say(f"{label} is commit {commit[:12]}")

    staging = _staging_dir(store)
    try:
        dl = staging / "download"
        remote = _Remote(
            label,
            files,
            lambda paths: download(
                repo_id, commit, paths, dl, endpoint=endpoint, token=token, revision_label=rev
            ),
        )
        raw = remote.fetch([MANIFEST_FILE])[MANIFEST_FILE].read_bytes()
        remote_h = BankHash.of_bytes(raw)
        manifest = _parse_manifest(raw, f"{label}: {MANIFEST_FILE}")
        plan = _plan(store, manifest, remote_h, remote, as_name=as_name, branches=branches, into=into)
        target_h = plan.target.hash
        _ref_move(store, plan, target_h, label, dry_run=True)  # refuse a conflict before downloading

        result = PullResult(
            repo_id,
            rev,
            commit,
            plan.name,
            str(target_h),
            plan.target.version,
            sorted(plan.target.branches),
        )
        stage = ContentStore.open(staging / "objects", create=True)
        new_objects = _fetch_objects(store, stage, plan.target, remote, result, say)

        with store.lock():
            for h in new_objects:  # verified in the staging store; put_file hashes the copy again
                store.put_file(stage.object_path(h), expected=h)
            for ah, am in reversed(plan.ancestors):
                if store.put_manifest(am) != ah:
                    raise IntegrityError(f"{label}: {manifest_file(ah)} changed while being stored")
            if store.put_manifest(plan.target) != target_h:
                raise IntegrityError(f"{label}: the manifest changed while being stored")
            _check_complete(store, target_h, label)
            result.action = _ref_move(store, plan, target_h, label)
        result.history = len(plan.ancestors)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


def _plan(
    store: ContentStore,
    remote: Manifest,
    remote_h: BankHash,
    source: _Remote,
    *,
    as_name: str | None,
    branches: list[str] | None,
    into: str | None,
) -> _Plan:
    """Which manifest to store and which ref to move."""
    label = source.label
    remote_branches = remote.branches
    wanted = list(dict.fromkeys(branches)) if branches else None
    for b in wanted or []:
        if b not in remote_branches:
            raise BranchNotFoundError(f"{label} has no branch {b!r} {did_you_mean(b, list(remote_branches))}")
    remote_tid = trunk_id(remote)
    about = f"{label} ({remote.name} v{remote.version}"

    if into is not None:
        local_h = store.resolve(into)
        local = store.manifest(local_h, where=f"manifest {local_h.short} ({into})")
        local_tid = trunk_id(local)
        local_ids = trunk_ids(local)  # scheme 2, or 1 for branches recorded before
        added: dict[str, BranchEntry] = {}
        for b in wanted or sorted(remote_branches):
            entry = replace(remote_branches[b], trunk=remote_branches[b].trunk or remote_tid)
            assert entry.trunk is not None
            if entry.trunk not in local_ids:
                raise ConflictError(
                    f"branch {b!r} of {label} was trained on trunk {BankHash(entry.trunk).short}, but "
                    f"{into!r} has trunk {BankHash(local_tid).short}: its outputs would be wrong there; "
                    f"pull it as a model of its own with --branches {b} --as NAME"
                )
            have = local.branches.get(b)
            if have is not None:
                if replace(have, trunk=have.trunk or local_tid) == entry:
                    continue  # already here
                raise ConflictError(
                    f"{into!r} already has a different branch {b!r}; remove it first "
                    f"(`scaler branch remove {into} {b}`) or pull into another model"
                )
            added[b] = entry
        if not added:
            return _Plan(local, into, local_h)
        target = new_version(
            local,
            message=f"pull {', '.join(sorted(added))} from {about})",
            version=next_version(store, into, local.version),  # unique after a rollback
            library=local.library,  # the local model's writer, as before (byte identity)
            branches={**local.branches, **added},
            mark_stale=False,
        )
        return _Plan(target, into, local_h)

    if wanted is not None and set(wanted) != set(remote_branches):
        name = as_name or remote.name
        target = new_version(
            None,
            name=name,
            message=f"branches {', '.join(wanted)} of {about}, {remote_h})",
            created=remote.created,
            library=remote.library,
            base=remote.base,
            trunk=remote.trunk,
            branches={
                b: replace(remote_branches[b], trunk=remote_branches[b].trunk or remote_tid) for b in wanted
            },
            mark_stale=False,
        )
        return _Plan(target, name, None)

    return _Plan(remote, as_name or remote.name, None, _ancestors(store, remote, source))


def _ancestors(store: ContentStore, remote: Manifest, source: _Remote) -> list[tuple[BankHash, Manifest]]:
    """Published ancestor manifests the store lacks, newest first (stops at the first one absent)."""
    if not remote.parent:
        return []
    wanted = []
    for f in sorted(source.files):
        stem = f.removeprefix(f"{MANIFESTS_DIR}/").removesuffix(".json")
        if (
            f == f"{MANIFESTS_DIR}/{stem}.json"
            and is_bank_hash(f"sha256:{stem}")
            and not store.has_manifest(f"sha256:{stem}")
        ):
            wanted.append(f)
    got = source.fetch(wanted)
    out: list[tuple[BankHash, Manifest]] = []
    parent: str | None = remote.parent
    seen: set[str] = set()
    while parent and parent not in seen and not store.has_manifest(parent):
        seen.add(parent)
        path = manifest_file(parent)
        if path not in got:
            break  # a shallow history: the repo does not have it either
        raw = got[path].read_bytes()
        if BankHash.of_bytes(raw) != parent:
            raise IntegrityError(
                f"refusing {source.label}: file {path} does not match its name: "
                f"its bytes hash to {BankHash.of_bytes(raw)}; nothing was stored"
            )
        m = _parse_manifest(raw, f"{source.label}: {path}")
        out.append((BankHash(parent), m))
        parent = m.parent
    return out


def _fetch_objects(
    store: ContentStore,
    stage: ContentStore,
    target: Manifest,
    source: _Remote,
    result: PullResult,
    say: Progress,
) -> list[BankHash]:
    """Download every object of ``target`` the store lacks and verify it into ``stage``."""
    label = source.label
    index = bank_files_in(list(source.files))
    new: list[BankHash] = []
    seen: set[str] = set()
    pending = [(f, BankHash(h)) for f, h, _ in banks_of(target)]
    while pending:  # a wave per level of folder banks (their members are listed in them)
        wave: dict[BankHash, str] = {}
        members: list[tuple[str, BankHash]] = []
        for where, h in pending:
            if h in seen:
                continue
            seen.add(h)
            if _have(store, h):
                result.already_here += 1
                members += [(f"{where}/{rel}", m) for rel, m in sorted(store.tree_members(h).items())]
                continue
            path = index.get(h.hex)
            if path is None:
                raise BankNotFoundError(
                    f"{label} lacks {BANKS_DIR}/{h.hex}[.safetensors], the bank of {where}"
                )
            lfs = getattr(source.files[path], "lfs", None)
            if lfs is not None and lfs.sha256 != h.hex:  # the repo itself says the bytes differ
                raise IntegrityError(
                    f"refusing {label}: file {path} does not match its name: the repo records its "
                    f"sha256 as {lfs.sha256} ({where}); nothing was stored"
                )
            wave[h] = where
        if wave:
            paths = sorted(index[h.hex] for h in wave)
            size = sum(int(getattr(source.files[p], "size", 0) or 0) for p in paths)
            say(f"downloading {len(paths)} files ({human_size(size)})")
            got = source.fetch(paths)
            for h, where in wave.items():
                path = index[h.hex]
                try:
                    stage.put_file(got[path], expected=h)
                except IntegrityError:
                    raise IntegrityError(
                        f"refusing {label}: file {path} does not match its name: its bytes hash to "
                        f"{sha256_file(got[path])} ({where}); nothing was stored"
                    ) from None
                result.downloaded.append(path)
                result.downloaded_bytes += got[path].stat().st_size
                new.append(h)
                members += [(f"{where}/{rel}", m) for rel, m in sorted(stage.tree_members(h).items())]
        pending = members
    say(f"verified {len(new)} downloaded files; {result.already_here} banks were already here")
    return new


def _have(store: ContentStore, h: BankHash) -> bool:
    try:
        store.verified_path(h)
        return True
    except (BankNotFoundError, IntegrityError):
        return False  # absent, or a corrupt copy that the pull replaces


def _check_complete(store: ContentStore, h: BankHash, label: str) -> None:
    from scaler_wizard.modeling.verify import verify_version

    bad = [c for c in verify_version(store, h, trust_cache=True) if not c.ok]
    if bad:
        raise IntegrityError(
            f"{label}: the pulled version is incomplete: {bad[0].what} {bad[0].bank}: {bad[0].detail}"
        )


def _lineage(store: ContentStore, plan: _Plan, h: BankHash) -> set[str]:
    """``h`` and every ancestor known here or being pulled."""
    out = {str(h)} | {str(ah) for ah, _ in plan.ancestors}
    last = plan.ancestors[-1][1] if plan.ancestors else plan.target
    parent = last.parent
    if parent and store.has_manifest(parent):
        out |= {str(vh) for vh, _ in history(store, parent)}
    return out


def _ref_move(store: ContentStore, plan: _Plan, h: BankHash, label: str, *, dry_run: bool = False) -> str:
    """Create, fast-forward or keep the ref (under the store lock unless ``dry_run``)."""
    name = plan.name
    current = store.get_ref(name)
    reason = f"pull {label}"
    if plan.expected_ref is not None:  # --into: a new version on top of the local head
        if h == plan.expected_ref:
            return "up-to-date"
        if current != plan.expected_ref:
            raise ConflictError(f"model {name!r} moved while pulling into it; pull again")
        if not dry_run:
            store.set_ref(name, h, expected=plan.expected_ref, reason=reason)
        return "added-branches"
    if current is None:
        if not dry_run:
            store.set_ref(name, h, expected=None, reason=reason)
        return "created"
    if current == h:
        return "up-to-date"
    if current in _lineage(store, plan, h):
        if not dry_run:
            store.set_ref(name, h, expected=current, reason=f"{reason} (fast-forward)")
        return "fast-forward"
    ahead = store.has_manifest(current) and h in {vh for vh, _ in history(store, current)}
    raise ConflictError(
        f"model {name!r} already exists here "
        + (f"and is ahead of {label}" if ahead else f"and {label} does not descend from it")
        + "; pull under another name with --as NAME"
        + ("" if ahead else f", or add branches to it with --into {name}")
    )


# bank_file: where pull's objects live in a repo, re-exported for callers of the old banks.hub
__all__ = ["PullResult", "bank_file", "pull"]
