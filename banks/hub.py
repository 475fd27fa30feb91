"""Hub transport: the thin client over ``huggingface_hub`` that publish and pull run on.

A published repo is an ordinary Hub model repo that any Hub client can read::

    README.md                   model card: YAML metadata + a table of the branches
    manifest.json               the manifest of the version this revision holds (its exact bytes)
    manifests/<hex>.json        every version published to the repo, named by its sha256
    banks/<hex>.safetensors     the safetensors bank sha256:<hex> (base, trunk layers, adapters, heads)
    banks/<hex>                 any other object sha256:<hex> (tokenizer/config files, folder-bank trees)

This module knows that layout, repo ids and revisions, the client (``HfApi`` and the download
functions), and turns the client's errors into one-line ``HubError``\\ s. It knows nothing of
versions, ancestors or trunks: what to publish or pull is planned by the runtime
(``scaler_wizard.remote``).

``huggingface_hub`` is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaler_wizard.banks.hashing import BankHash, sha256_file
from scaler_wizard.banks.model_card import LIBRARY_NAME
from scaler_wizard.banks.store import ContentStore
from scaler_wizard.errors import HubError, ScalerError
from scaler_wizard.version import __version__

if TYPE_CHECKING:
    from huggingface_hub import HfApi

MANIFEST_FILE = "manifest.json"
MANIFESTS_DIR = "manifests"
BANKS_DIR = "banks"
CARD_FILE = "README.md"
_BANK_FILE_RE = re.compile(r"^banks/([0-9a-f]{64})(\.safetensors)?$")
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


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


def check_revision(value: str, what: str) -> str:
    """``value`` if it is a valid tag or branch name, else a one-line ScalerError."""
    if not _REVISION_RE.match(value) or ".." in value or value.endswith((".lock", "/")):
        raise ScalerError(f"invalid {what} {value!r}: letters, digits, '.', '_', '-', '/'")
    return value


def manifest_file(h: str) -> str:
    """Where manifest ``h`` lives in a published repo."""
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


# -- talking to the Hub ----------------------------------------------------------------------
def hub_api(endpoint: str | None, token: str | None) -> HfApi:
    """The client, identified as this library (the token stays inside it)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


@contextlib.contextmanager
def hub_call(what: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
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


def download(
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

    with hub_call("download", repo_id, revision_label):
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


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (git names blobs by sha1 of a header and the bytes)."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remote_copy_ok(remote: Any, h: BankHash, local: Path) -> bool:
    """Does a file listed in the repo hold ``h``'s bytes? (LFS: its sha256; else its git blob id.)"""
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return bool(lfs.sha256 == h.hex and lfs.size == local.stat().st_size)
    return bool(getattr(remote, "blob_id", None) == git_blob_sha1(local))


def manifest_hash_at(
    repo_id: str, revision: str, store: ContentStore, *, endpoint: str | None, token: str | None
) -> BankHash:
    """The hash of ``manifest.json`` at a revision (downloaded into a scratch folder of ``store``)."""
    scratch = store.scratch_dir("publish")
    try:
        from huggingface_hub import hf_hub_download

        with hub_call("publish", repo_id, revision):
            path = hf_hub_download(
                repo_id, MANIFEST_FILE, revision=revision, local_dir=scratch, endpoint=endpoint, token=token
            )
        return sha256_file(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def ensure_repo(api: HfApi, repo_id: str, *, private: bool) -> tuple[list[str], dict[str, str]]:
    """Create the repo unless it exists; its (tag names, {branch: head commit})."""
    api.create_repo(repo_id, private=private or None, exist_ok=True)
    refs = api.list_repo_refs(repo_id)
    return [t.name for t in refs.tags], {b.name: b.target_commit for b in refs.branches}


def list_files(api: HfApi, repo_id: str, revision: str) -> dict[str, Any]:
    """Every file of a revision: {path: RepoFile (size, lfs, blob_id)}."""
    from huggingface_hub.hf_api import RepoFile

    return {
        f.path: f
        for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
        if isinstance(f, RepoFile)
    }


def revision_files(api: HfApi, repo_id: str, revision: str) -> tuple[str, dict[str, Any]]:
    """The commit a revision names, and its files: {path: RepoSibling (size, lfs)}."""
    info = api.repo_info(repo_id, revision=revision, files_metadata=True)
    return str(info.sha), {s.rfilename: s for s in (getattr(info, "siblings", None) or [])}


def commit_files(
    api: HfApi,
    repo_id: str,
    files: list[tuple[str, str | bytes]],
    *,
    message: str,
    description: str,
    revision: str,
    parent_commit: str,
) -> str:
    """One commit adding ``files`` (repo path, local path or bytes) on top of ``parent_commit``."""
    from huggingface_hub import CommitInfo, CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files]
    info = api.create_commit(
        repo_id,
        ops,
        commit_message=message,
        commit_description=description,
        revision=revision,
        parent_commit=parent_commit,
    )
    assert isinstance(info, CommitInfo)  # not run_as_future
    return str(info.oid)


def create_tag(api: HfApi, repo_id: str, *, tag: str, commit: str, message: str) -> bool:
    """Tag ``commit``: True, or False when the tag exists already (HTTP 409)."""
    try:
        api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message)
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status != 409:
            raise
        return False
    return True


__all__ = [
    "BANKS_DIR",
    "CARD_FILE",
    "MANIFESTS_DIR",
    "MANIFEST_FILE",
    "HubError",
    "bank_file",
    "bank_files_in",
    "check_revision",
    "commit_files",
    "create_tag",
    "download",
    "ensure_repo",
    "git_blob_sha1",
    "hub_api",
    "hub_call",
    "list_files",
    "manifest_file",
    "manifest_hash_at",
    "parse_repo_spec",
    "remote_copy_ok",
    "revision_files",
]
