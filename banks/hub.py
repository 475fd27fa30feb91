"""Hub transport: publish a model version to a Hugging Face Hub model repo, pull one back.

A published repo is an ordinary Hub model repo that any Hub client can read::

    README.md                   model card: YAML metadata + a table of the branches
    manifest.json               the manifest of the version this revision holds (its exact bytes)
    manifests/<hex>.json        every version published to the repo, named by its sha256
    banks/<hex>.safetensors     the safetensors bank sha256:<hex> (base, trunk layers, adapters, heads)
    banks/<hex>                 any other object sha256:<hex> (tokenizer/config files, folder-bank trees)

Each publish is one commit, tagged ``v<version>`` (tags are immutable). Publishing uploads
only the banks the revision lacks; pulling downloads only the banks the local store lacks,
into a staging folder inside the store, and checks every sha256 before anything enters the
store; the manifests go in next and the model's ref moves last, under the store lock.

``huggingface_hub`` is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaler_wizard.banks.atomic import TMP_PREFIX
from scaler_wizard.banks.hashing import BankHash, is_bank_hash, sha256_file
from scaler_wizard.banks.model_card import LIBRARY_NAME, model_card
from scaler_wizard.banks.store import ContentStore, canonical_json, validate_name
from scaler_wizard.errors import (
    BankNotFoundError,
    BranchNotFoundError,
    ConflictError,
    IntegrityError,
    ManifestError,
    ScalerError,
    did_you_mean,
)
from scaler_wizard.manifests import validate_manifest
from scaler_wizard.manifests.validation import parse_manifest_bytes
from scaler_wizard.version import __version__
from scaler_wizard.versions.history import history, next_version, resolve_version

if TYPE_CHECKING:
    from huggingface_hub import HfApi

MANIFEST_FILE = "manifest.json"
MANIFESTS_DIR = "manifests"
BANKS_DIR = "banks"
CARD_FILE = "README.md"
_BANK_FILE_RE = re.compile(r"^banks/([0-9a-f]{64})(\.safetensors)?$")
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")

Progress = Callable[[str], None]


class HubError(ScalerError):
    """The Hub refused or failed a request (one line, never the token)."""


def _quiet(_message: str) -> None:
    pass


# -- names and paths -----------------------------------------------------------------------
def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """``[hf://]namespace/name[@revision]`` -> (repo_id, revision or None)."""
    text = spec.removeprefix("hf://")
    repo_id, sep, revision = text.partition("@")
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ScalerError(
            f"invalid Hub repo id {repo_id!r}: want namespace/name (letters, digits, '.', '_', '-')"
        )
    if sep and not _REVISION_RE.match(revision):
        raise ScalerError(
            f"invalid revision {revision!r} in {spec!r}: want a tag, branch or commit after '@'"
        )
    return repo_id, (revision if sep else None)


def _check_revision(value: str, what: str) -> str:
    if not _REVISION_RE.match(value) or ".." in value or value.endswith((".lock", "/")):
        raise ScalerError(f"invalid {what} {value!r}: letters, digits, '.', '_', '-', '/'")
    return value


def manifest_file(h: str) -> str:
    return f"{MANIFESTS_DIR}/{BankHash(h).hex}.json"


def _is_safetensors(path: Path) -> bool:
    """An 8-byte little-endian header length, then the JSON header: safetensors."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def bank_file(h: str, path: Path) -> str:
    """Where object ``h`` (whose bytes are at ``path``) lives in a published repo."""
    hexd = BankHash(h).hex
    return f"{BANKS_DIR}/{hexd}.safetensors" if _is_safetensors(path) else f"{BANKS_DIR}/{hexd}"


def bank_files_in(paths: list[str]) -> dict[str, str]:
    """``{hex: repo path}`` for every bank file in a repo listing."""
    out: dict[str, str] = {}
    for p in sorted(paths):
        m = _BANK_FILE_RE.match(p)
        if m:
            out.setdefault(m.group(1), p)
    return out


def objects_of(store: ContentStore, manifest: dict[str, Any]) -> list[tuple[str, BankHash]]:
    """``(field, object)`` for every object a version needs: ``banks_of`` plus folder-bank members
    (read from the tree objects ``store`` holds)."""
    from scaler_wizard.modeling.verify import banks_of

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
            pending += [(f"{where}/{rel}", m) for rel, m in sorted(_members(store, h).items())]
    return out


def _members(store: ContentStore, h: str) -> dict[str, BankHash]:
    """Members of a folder bank (a tree object, e.g. a PEFT adapter folder); empty for a plain bank."""
    return store.tree_members(h)


# -- talking to the Hub ----------------------------------------------------------------------
def _api(endpoint: str | None, token: str | None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


@contextlib.contextmanager
def _hub_call(what: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn the client's many exception types into one-line HubErrors."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except ScalerError:
        raise
    except OfflineModeIsEnabled as exc:
        raise HubError(
            f"{what}: HF_HUB_OFFLINE is set, and this needs the Hub (run with HF_HUB_OFFLINE=0)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"{what}: no repo {repo_id} on the Hub (or the token cannot see it)") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{what}: {repo_id} has no revision {revision!r}") from exc
    except EntryNotFoundError as exc:
        raise HubError(f"{what}: {repo_id}@{revision}: {_first_line(str(exc))}") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        hint = {
            401: " (check the token: HF_TOKEN, `hf auth login` or --token)",
            403: " (check the token: HF_TOKEN, `hf auth login` or --token)",
            412: " (the repo moved on meanwhile: run the command again)",
        }.get(status if isinstance(status, int) else 0, "")
        raise HubError(f"{what}: the Hub answered HTTP {status}: {_first_line(str(exc))}{hint}") from exc
    except Exception as exc:  # network and protocol failures of any client transport
        if isinstance(exc, TypeError | AttributeError | NameError | KeyError | AssertionError):
            raise  # a bug, not the network: keep the traceback
        raise HubError(f"{what}: {type(exc).__name__}: {_first_line(str(exc))}") from exc


def _download(
    repo_id: str,
    commit: str,
    paths: list[str],
    folder: Path,
    *,
    endpoint: str | None,
    token: str | None,
    revision_label: str,
) -> dict[str, Path]:
    """Download repo files at a pinned commit into ``folder``; {path: local file}."""
    if not paths:
        return {}
    from huggingface_hub import hf_hub_download, snapshot_download

    with _hub_call("download", repo_id, revision_label):
        if len(paths) == 1:
            hf_hub_download(
                repo_id,
                paths[0],
                revision=commit,
                local_dir=folder,
                endpoint=endpoint,
                token=token,
                library_name=LIBRARY_NAME,
                library_version=__version__,
            )
        else:
            snapshot_download(
                repo_id,
                revision=commit,
                local_dir=folder,
                allow_patterns=list(paths),
                endpoint=endpoint,
                token=token,
                library_name=LIBRARY_NAME,
                library_version=__version__,
            )
    out = {}
    for p in paths:
        local = folder / p
        if not local.is_file():
            raise HubError(f"download: {repo_id}@{revision_label}: {p} did not arrive")
        out[p] = local
    return out


# -- publish ----------------------------------------------------------------------------------
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


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)  # git names blobs by sha1
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _remote_copy_ok(remote: Any, h: BankHash, local: Path) -> bool:
    """Does a file listed in the repo hold ``h``'s bytes? (LFS: its sha256; else its git blob id.)"""
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return bool(lfs.sha256 == h.hex and lfs.size == local.stat().st_size)
    return bool(getattr(remote, "blob_id", None) == _git_blob_sha1(local))


def _manifest_hash_at(
    repo_id: str, revision: str, store: ContentStore, *, endpoint: str | None, token: str | None
) -> BankHash:
    scratch = store.scratch_dir("publish")
    try:
        from huggingface_hub import hf_hub_download

        with _hub_call("publish", repo_id, revision):
            path = hf_hub_download(
                repo_id, MANIFEST_FILE, revision=revision, local_dir=scratch, endpoint=endpoint, token=token
            )
        return sha256_file(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
    say = progress or _quiet
    repo_id, at = parse_repo_spec(repo_id)
    if at is not None:
        raise ScalerError(
            f"publish to {repo_id}, not {repo_id}@{at}: choose the branch with --revision, the tag with --tag"
        )
    name, h = resolve_version(store, model)
    raw = store.manifest_path(h).read_bytes()
    if BankHash.of_bytes(raw) != h:
        raise IntegrityError(f"manifest {h} is corrupt or tampered ({store.manifest_path(h)})")
    manifest = validate_manifest(json.loads(raw), where=f"manifest {h.short} ({name})")
    version = int(manifest["version"])
    tag = _check_revision(tag or f"v{version}", "tag")
    branch = _check_revision(revision or "main", "branch")

    objects = objects_of(store, manifest)
    missing = next(((where, obj) for where, obj in objects if not store.has(obj)), None)
    if missing is not None:
        raise BankNotFoundError(
            f"cannot publish {name} v{version}: {missing[0]}: bank {missing[1]} is missing from the "
            f"store {store.root} (a partial pull? pull the whole model first)"
        )

    from huggingface_hub import CommitInfo, CommitOperationAdd
    from huggingface_hub.hf_api import RepoFile

    api = _api(endpoint, token)
    with _hub_call("publish", repo_id, branch):
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        refs = api.list_repo_refs(repo_id)
    result = PublishResult(repo_id, name, version, str(h), tag, branch, "")
    if any(t.name == tag for t in refs.tags):
        remote_h = _manifest_hash_at(repo_id, tag, store, endpoint=endpoint, token=token)
        if remote_h != h:
            raise ConflictError(
                f"{repo_id}: tag {tag} already holds manifest {remote_h}, not {name} v{version} ({h}); "
                "tags are immutable: publish with another --tag, or to another repo"
            )
        with _hub_call("publish", repo_id, tag):
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
    with _hub_call("publish", repo_id, branch):
        heads = {b.name: b.target_commit for b in refs.branches}
        if branch not in heads:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = str(api.repo_info(repo_id, revision=branch).sha)
        listing = {
            f.path: f
            for f in api.list_repo_tree(repo_id, recursive=True, revision=head)
            if isinstance(f, RepoFile)
        }
    ops = []
    for obj, (rpath, path) in sorted(local.items(), key=lambda kv: kv[1][0]):
        if rpath in listing and _remote_copy_ok(listing[rpath], obj, path):
            result.reused.append(rpath)
            continue
        ops.append(CommitOperationAdd(path_in_repo=rpath, path_or_fileobj=str(path)))
        result.uploaded.append(rpath)
        result.uploaded_bytes += path.stat().st_size
    card = model_card(manifest, h, repo_id=repo_id, tag=tag).encode()
    ops.append(CommitOperationAdd(path_in_repo=manifest_file(h), path_or_fileobj=raw))
    ops.append(CommitOperationAdd(path_in_repo=MANIFEST_FILE, path_or_fileobj=raw))
    ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
    say(
        f"uploading {len(result.uploaded)} banks ({_human(result.uploaded_bytes)}); "
        f"{len(result.reused)} already in {repo_id}@{branch}"
    )
    with _hub_call("publish", repo_id, branch):
        info = api.create_commit(
            repo_id,
            ops,
            commit_message=f"{name} v{version}",
            commit_description=f"scaler-wizard manifest {h}\n\n{manifest.get('message', '')}".strip(),
            revision=branch,
            parent_commit=head,
        )
        assert isinstance(info, CommitInfo)  # not run_as_future
        result.commit = str(info.oid)
        try:
            api.create_tag(repo_id, tag=tag, revision=result.commit, tag_message=f"{name} v{version} {h}")
        except Exception as exc:  # lost a race for the tag: fine only if it holds this version
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status != 409:
                raise
            if _manifest_hash_at(repo_id, tag, store, endpoint=endpoint, token=token) != h:
                raise ConflictError(
                    f"{repo_id}: tag {tag} was created by another publisher meanwhile"
                ) from exc
    result.seconds = time.perf_counter() - t0
    say(f"published {name} v{version} to {repo_id}@{tag} (commit {result.commit[:12]})")
    return result


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- pull ---------------------------------------------------------------------------------------
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


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    obj = parse_manifest_bytes(raw, where)  # size, depth and integer limits first
    manifest = validate_manifest(obj, where=where)
    if canonical_json(manifest) != raw:
        raise ManifestError(f"{where} is not in canonical form, so its hash would not be its name")
    return manifest


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _trunk_id(manifest: dict[str, Any]) -> str:
    from scaler_wizard.modeling.compose import trunk_id

    return trunk_id(manifest)


def _trunk_ids(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The trunk's id under every scheme a branch may have recorded (docs/manifests.md)."""
    from scaler_wizard.modeling.bank_checks import trunk_ids

    return trunk_ids(manifest)


@dataclass
class _Remote:
    """One pinned commit of a repo: its listing, and a way to download from it."""

    label: str  # repo_id@revision, for messages
    files: dict[str, Any]  # path -> RepoSibling (size, lfs)
    fetch: Callable[[list[str]], dict[str, Path]]


@dataclass
class _Plan:
    target: dict[str, Any]
    name: str
    expected_ref: BankHash | None  # --into: the local head the new version builds on
    ancestors: list[tuple[BankHash, dict[str, Any]]] = field(default_factory=list)


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
    say = progress or _quiet
    repo_id, rev = parse_repo_spec(spec)
    rev = rev or "main"
    if into is not None and as_name is not None:
        raise ScalerError("--as names a new model and --into adds to an existing one: give one of them")
    if as_name is not None:
        validate_name(as_name)
    if into is not None:
        store.resolve(into)  # fail before downloading anything
    api = _api(endpoint, token)
    with _hub_call("pull", repo_id, rev):
        info = api.repo_info(repo_id, revision=rev, files_metadata=True)
    commit = str(info.sha)
    label = f"{repo_id}@{rev}"
    files = {s.rfilename: s for s in (getattr(info, "siblings", None) or [])}
    if MANIFEST_FILE not in files:
        raise ScalerError(f"{label} is not a scaler-wizard model: it has no {MANIFEST_FILE}")
    say(f"{label} is commit {commit[:12]}")

    staging = _staging_dir(store)
    try:
        dl = staging / "download"
        remote = _Remote(
            label,
            files,
            lambda paths: _download(
                repo_id, commit, paths, dl, endpoint=endpoint, token=token, revision_label=rev
            ),
        )
        raw = remote.fetch([MANIFEST_FILE])[MANIFEST_FILE].read_bytes()
        remote_h = BankHash.of_bytes(raw)
        manifest = _parse_manifest(raw, f"{label}: {MANIFEST_FILE}")
        plan = _plan(store, manifest, remote_h, remote, as_name=as_name, branches=branches, into=into)
        target_h = BankHash.of_bytes(canonical_json(plan.target))
        _ref_move(store, plan, target_h, label, dry_run=True)  # refuse a conflict before downloading

        result = PullResult(
            repo_id,
            rev,
            commit,
            plan.name,
            str(target_h),
            int(plan.target["version"]),
            sorted(plan.target["branches"]),
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
    remote: dict[str, Any],
    remote_h: BankHash,
    source: _Remote,
    *,
    as_name: str | None,
    branches: list[str] | None,
    into: str | None,
) -> _Plan:
    """Which manifest to store and which ref to move."""
    label = source.label
    remote_branches: dict[str, Any] = remote["branches"]
    wanted = list(dict.fromkeys(branches)) if branches else None
    for b in wanted or []:
        if b not in remote_branches:
            raise BranchNotFoundError(f"{label} has no branch {b!r} {did_you_mean(b, list(remote_branches))}")
    remote_tid = _trunk_id(remote)

    if into is not None:
        local_h = store.resolve(into)
        local = validate_manifest(store.get_manifest(local_h), where=f"manifest {local_h.short} ({into})")
        local_tid = _trunk_id(local)
        added: dict[str, Any] = {}
        for b in wanted or sorted(remote_branches):
            entry = {**remote_branches[b], "trunk": remote_branches[b].get("trunk", remote_tid)}
            if entry["trunk"] not in _trunk_ids(local):  # scheme 2, or 1 for branches recorded before
                raise ConflictError(
                    f"branch {b!r} of {label} was trained on trunk {BankHash(entry['trunk']).short}, but "
                    f"{into!r} has trunk {BankHash(local_tid).short}: its outputs would be wrong there; "
                    f"pull it as a model of its own with --branches {b} --as NAME"
                )
            have = local["branches"].get(b)
            if have is not None:
                if {**have, "trunk": have.get("trunk", local_tid)} == entry:
                    continue  # already here
                raise ConflictError(
                    f"{into!r} already has a different branch {b!r}; remove it first "
                    f"(`scaler branch remove {into} {b}`) or pull into another model"
                )
            added[b] = entry
        if not added:
            return _Plan(local, into, local_h)
        target = {
            **local,
            "version": next_version(store, into, int(local["version"])),  # unique after a rollback
            "parent": str(local_h),
            "created": _now(),
            "message": f"pull {', '.join(sorted(added))} from {label} ({remote['name']} v{remote['version']})",
            "branches": {**local["branches"], **added},
        }
        return _Plan(validate_manifest(target, where="new manifest"), into, local_h)

    if wanted is not None and set(wanted) != set(remote_branches):
        name = as_name or str(remote["name"])
        target = {
            **remote,
            "name": name,
            "version": 1,
            "parent": None,
            "message": f"branches {', '.join(wanted)} of {label} ({remote['name']} v{remote['version']}, {remote_h})",
            "branches": {
                b: {**remote_branches[b], "trunk": remote_branches[b].get("trunk", remote_tid)}
                for b in wanted
            },
        }
        return _Plan(validate_manifest(target, where="new manifest"), name, None)

    return _Plan(remote, as_name or str(remote["name"]), None, _ancestors(store, remote, source))


def _ancestors(
    store: ContentStore, remote: dict[str, Any], source: _Remote
) -> list[tuple[BankHash, dict[str, Any]]]:
    """Published ancestor manifests the store lacks, newest first (stops at the first one absent)."""
    if not remote.get("parent"):
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
    out: list[tuple[BankHash, dict[str, Any]]] = []
    parent = remote.get("parent")
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
        parent = m.get("parent")
    return out


def _fetch_objects(
    store: ContentStore,
    stage: ContentStore,
    target: dict[str, Any],
    source: _Remote,
    result: PullResult,
    say: Progress,
) -> list[BankHash]:
    """Download every object of ``target`` the store lacks and verify it into ``stage``."""
    from scaler_wizard.modeling.verify import banks_of

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
                members += [(f"{where}/{rel}", m) for rel, m in sorted(_members(store, h).items())]
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
            say(f"downloading {len(paths)} files ({_human(size)})")
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
                members += [(f"{where}/{rel}", m) for rel, m in sorted(_members(stage, h).items())]
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
    parent = last.get("parent")
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


# -- the Hub as a bank-store backend ---------------------------------------------------------------
class HubRepo:
    """A Hub model repo as a bank-store backend: ``hf://namespace/name[@revision]``."""

    scheme = "hf"

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
    ) -> None:
        self.repo_id, at = parse_repo_spec(repo_id)
        self.revision = revision or at
        self.endpoint = endpoint
        self._token = token

    @classmethod
    def open(cls, location: str, *, endpoint: str | None = None, token: str | None = None) -> HubRepo:
        """``hf://namespace/name[@revision]`` (or a bare ``namespace/name``)."""
        return cls(location, endpoint=endpoint, token=token)

    def __repr__(self) -> str:  # never the token
        at = f"@{self.revision}" if self.revision else ""
        return f"HubRepo('hf://{self.repo_id}{at}', endpoint={self.endpoint!r})"

    def publish(
        self,
        store: ContentStore,
        model: str,
        *,
        tag: str | None = None,
        revision: str | None = None,
        private: bool = False,
        progress: Progress | None = None,
    ) -> PublishResult:
        return publish(
            store,
            model,
            self.repo_id,
            tag=tag,
            revision=revision or self.revision,
            private=private,
            endpoint=self.endpoint,
            token=self._token,
            progress=progress,
        )

    def pull(
        self,
        store: ContentStore,
        *,
        revision: str | None = None,
        as_name: str | None = None,
        branches: list[str] | None = None,
        into: str | None = None,
        progress: Progress | None = None,
    ) -> PullResult:
        rev = revision or self.revision
        return pull(
            store,
            f"{self.repo_id}@{rev}" if rev else self.repo_id,
            as_name=as_name,
            branches=branches,
            into=into,
            endpoint=self.endpoint,
            token=self._token,
            progress=progress,
        )


__all__ = [
    "HubError",
    "HubRepo",
    "PublishResult",
    "PullResult",
    "bank_file",
    "model_card",
    "objects_of",
    "parse_repo_spec",
    "publish",
    "pull",
]
