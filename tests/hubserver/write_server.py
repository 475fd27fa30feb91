#!/usr/bin/env python3
"""Test-only Hugging Face Hub *front door*: serves the Hub write API, proxies reads to olah.

Stdlib only (runs with any Python >= 3.10). Listens on 127.0.0.1 only.

Layout on disk (shared with olah, whose ``mirrors-path`` is ``--root``)::

    ROOT/{models,datasets,spaces}/<namespace>/<name>/      non-bare git repo, branch ``main``
    ROOT/.../<name>/.git/lfs/objects/<o[0:2]>/<o[2:4]>/<oid>  LFS objects (the git-lfs layout)

Git history is written with git plumbing (``update-index``/``write-tree``/``commit-tree``/
``update-ref``) against a temporary index, so the repos' work trees are never checked out.
LFS files are committed as standard git-lfs pointer files, and their content is kept in the
repo's ``.git/lfs/objects`` store, which is exactly what olah reads.

Everything this server does not handle itself is reverse-proxied to olah (``--upstream-port``).
See README.md next to this file for the list of endpoints and the known gaps.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
import urllib.parse
import zlib
from collections.abc import Iterator
from typing import Any

# --------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------

REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}  # payload "type" -> dir/API
URL_PREFIX = {"models": "", "datasets": "datasets/", "spaces": "spaces/"}  # web/LFS URL prefix
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._\-]*"
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
OID_RE = re.compile(r"^[0-9a-f]{64}$")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # files >= 10 MiB always go through LFS (as on the Hub)
EMPTY_SHA = "0" * 40

POINTER_RE = re.compile(
    rb"^version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize ([0-9]+)\n$"
)

# The .gitattributes the Hub puts in the initial commit of a new repo.
_LFS_PATTERNS = """
    *.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz
    *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar
    *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*
"""
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS.split())

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
}


class HubError(Exception):
    """An error answered to the client in the Hub's format (X-Error-Code / X-Error-Message + JSON)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


# --------------------------------------------------------------------------------------
# git helpers
# --------------------------------------------------------------------------------------


def _git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,  # ignore the user's config (e.g. commit.gpgsign)
        GIT_TERMINAL_PROMPT="0",
        LC_ALL="C",
    )
    if extra:
        env.update(extra)
    return env


def git(
    repo: str, *args: str, input: bytes | None = None, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["git", "-C", repo, *args],
        input=input,
        capture_output=True,
        env=_git_env(env),
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    return proc


def write_blob(repo: str, data: bytes) -> str:
    """Write a loose git blob object (standard zlib-compressed format) and return its sha1."""
    header = b"blob %d\0" % len(data)
    sha = hashlib.sha1(header + data).hexdigest()
    obj_dir = os.path.join(repo, ".git", "objects", sha[:2])
    obj_path = os.path.join(obj_dir, sha[2:])
    if not os.path.exists(obj_path):
        os.makedirs(obj_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=obj_dir, prefix="tmp_obj_")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(zlib.compress(header + data, 1))
            os.chmod(tmp, 0o444)
            os.replace(tmp, obj_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return sha


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def git_user_env(name: str) -> dict[str, str]:
    email = f"{name}@users.noreply.hubserver.invalid"
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
    }


# --------------------------------------------------------------------------------------
# glob matching for .gitattributes / .gitignore (good-enough subset of git's wildmatch)
# --------------------------------------------------------------------------------------


def _glob_to_regex(pattern: str) -> re.Pattern:
    i, out = 0, []
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def path_matches(pattern: str, path: str) -> bool:
    """Match like git: patterns without '/' match the basename at any depth; others are anchored."""
    pattern = pattern.strip()
    if not pattern:
        return False
    dir_only = pattern.endswith("/")
    pattern = pattern.rstrip("/")
    if "/" in pattern:
        regex = _glob_to_regex(pattern.lstrip("/"))
        candidates = [path]
    else:
        regex = _glob_to_regex(pattern)
        candidates = path.split("/")
    if dir_only:  # "logs/" matches any file below a directory called logs
        parents = path.split("/")[:-1]
        return any(
            regex.match("/".join(parents[: k + 1]) if "/" in pattern else parents[k])
            for k in range(len(parents))
        )
    if "/" in pattern:
        # an anchored pattern also matches everything below a matching directory
        parts = path.split("/")
        return any(regex.match("/".join(parts[: k + 1])) for k in range(len(parts)))
    return any(regex.match(c) for c in candidates)


def lfs_patterns(gitattributes: str) -> list[str]:
    patterns = []
    for line in gitattributes.splitlines():
        parts = line.strip().split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def is_ignored(gitignore: str, path: str) -> bool:
    ignored = False
    for line in gitignore.splitlines():
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        if path_matches(line, path):
            ignored = not negate
    return ignored


# --------------------------------------------------------------------------------------
# the store: repos on disk
# --------------------------------------------------------------------------------------


class Store:
    def __init__(self, root: str, user: str):
        self.root = os.path.abspath(root)
        self.user = user
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.stats_lock = threading.Lock()
        self.stats: dict[str, int] = {
            "repos_created": 0,
            "repos_deleted": 0,
            "preupload_requests": 0,
            "lfs_batch_requests": 0,
            "lfs_objects_already_present": 0,
            "lfs_objects_to_upload": 0,
            "lfs_uploads": 0,
            "lfs_upload_bytes": 0,
            "lfs_verifies": 0,
            "commits": 0,
            "tags_created": 0,
            "proxied_requests": 0,
        }
        for d in REPO_TYPES.values():
            os.makedirs(os.path.join(self.root, d), exist_ok=True)

    def bump(self, key: str, n: int = 1) -> None:
        with self.stats_lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def lock(self, repo_dir: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(repo_dir, threading.Lock())

    # ---- paths -------------------------------------------------------------------------

    def repo_dir(self, type_dir: str, namespace: str, name: str) -> str:
        return os.path.join(self.root, type_dir, namespace, name)

    def existing_repo(self, type_dir: str, namespace: str, name: str) -> str:
        path = self.repo_dir(type_dir, namespace, name)
        if not os.path.isdir(os.path.join(path, ".git")):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return path

    @staticmethod
    def lfs_object_path(repo: str, oid: str) -> str:
        return os.path.join(repo, ".git", "lfs", "objects", oid[:2], oid[2:4], oid)

    def lfs_has(self, repo: str, oid: str, size: int | None = None) -> bool:
        path = self.lfs_object_path(repo, oid)
        if not os.path.isfile(path):
            return False
        return size is None or os.path.getsize(path) == size

    # ---- refs --------------------------------------------------------------------------

    @staticmethod
    def _check_rev_syntax(rev: str) -> None:
        if not rev or rev.startswith("-") or ".." in rev or any(ord(c) < 33 for c in rev) or "\\" in rev:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def resolve(self, repo: str, rev: str) -> str:
        """Resolve a branch, tag, full ref, or (abbreviated) commit sha to a commit sha."""
        self._check_rev_syntax(rev)
        candidates = [f"refs/heads/{rev}", f"refs/tags/{rev}"]
        if rev.startswith("refs/"):
            candidates.insert(0, rev)
        if re.fullmatch(r"[0-9a-f]{4,40}", rev):
            candidates.append(rev)
        for cand in candidates:
            proc = git(repo, "rev-parse", "--verify", "--quiet", f"{cand}^{{commit}}", check=False)
            if proc.returncode == 0:
                return proc.stdout.decode().strip()
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def branch_head(self, repo: str, branch: str) -> str:
        self._check_rev_syntax(branch)
        proc = git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}", check=False)
        if proc.returncode != 0:
            raise HubError(
                404,
                f"Invalid rev id: {branch} (commits can only be pushed to an existing branch)",
                "RevisionNotFound",
            )
        return proc.stdout.decode().strip()

    def ref_exists(self, repo: str, ref: str) -> bool:
        return git(repo, "show-ref", "--verify", "--quiet", ref, check=False).returncode == 0

    @staticmethod
    def check_ref_name(repo: str, ref: str) -> None:
        if git(repo, "check-ref-format", ref, check=False).returncode != 0:
            raise HubError(400, f"Invalid reference name: {ref}")

    # ---- trees -------------------------------------------------------------------------

    def tree_entries(self, repo: str, commit: str) -> dict[str, tuple[str, str, int]]:
        """path -> (mode, blob sha, size) for every blob/symlink of the commit's tree."""
        out = git(repo, "ls-tree", "-r", "-z", "-l", commit).stdout
        entries: dict[str, tuple[str, str, int]] = {}
        for rec in out.split(b"\0"):
            if not rec:
                continue
            meta, path = rec.split(b"\t", 1)
            mode, otype, sha, size = meta.split()
            if otype != b"blob":
                continue  # submodules are not supported
            entries[path.decode()] = (mode.decode(), sha.decode(), int(size))
        return entries

    def read_blob(self, repo: str, sha: str) -> bytes:
        return git(repo, "cat-file", "blob", sha).stdout

    def read_file_at(self, repo: str, commit: str, path: str) -> str | None:
        proc = git(repo, "cat-file", "blob", f"{commit}:{path}", check=False)
        return proc.stdout.decode("utf-8", errors="replace") if proc.returncode == 0 else None

    def remote_oid(self, repo: str, entry: tuple[str, str, int]) -> str:
        """The Hub's 'oid' of a file: sha256 for LFS pointers, git blob sha1 otherwise."""
        _, sha, size = entry
        if 100 < size < 200:
            m = POINTER_RE.match(self.read_blob(repo, sha))
            if m:
                return m.group(1).decode()
        return sha

    # ---- repo lifecycle ----------------------------------------------------------------

    def create_repo(self, type_dir: str, namespace: str, name: str) -> bool:
        """Create repo with an initial commit. Returns False if it already exists."""
        final = self.repo_dir(type_dir, namespace, name)
        if os.path.isdir(os.path.join(final, ".git")):
            return False
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".creating-{name}-", dir=parent)
        try:
            git(tmp, "init", "-q", "-b", "main")
            os.makedirs(os.path.join(tmp, ".git", "lfs", "objects"), exist_ok=True)
            os.makedirs(os.path.join(tmp, ".git", "lfs", "tmp"), exist_ok=True)
            blob = write_blob(tmp, DEFAULT_GITATTRIBUTES.encode())
            tree = (
                git(tmp, "mktree", input=f"100644 blob {blob}\t.gitattributes\n".encode())
                .stdout.decode()
                .strip()
            )
            commit = (
                git(tmp, "commit-tree", tree, "-m", "initial commit", env=git_user_env(self.user))
                .stdout.decode()
                .strip()
            )
            git(tmp, "update-ref", "refs/heads/main", commit, "")
            try:
                os.rename(tmp, final)  # atomic: olah never sees a half-created repo
            except OSError:
                if os.path.isdir(os.path.join(final, ".git")):
                    return False  # lost a race against a concurrent create
                raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        self.bump("repos_created")
        return True

    def delete_repo(self, type_dir: str, namespace: str, name: str) -> None:
        repo = self.existing_repo(type_dir, namespace, name)
        with self.lock(repo):
            trash = tempfile.mkdtemp(prefix=f".deleting-{name}-", dir=os.path.dirname(repo))
            os.rename(repo, os.path.join(trash, "repo"))
            shutil.rmtree(trash, ignore_errors=True)
        self.bump("repos_deleted")

    def move_repo(self, type_dir: str, src: tuple[str, str], dst: tuple[str, str]) -> None:
        repo = self.existing_repo(type_dir, *src)
        target = self.repo_dir(type_dir, *dst)
        with self.lock(repo):
            if os.path.exists(target):
                raise HubError(409, f"Repository {dst[0]}/{dst[1]} already exists")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(repo, target)

    # ---- commits -----------------------------------------------------------------------

    def commit(
        self,
        repo: str,
        branch: str,
        ops: list[tuple[str, dict]],
        summary: str,
        description: str,
        parent_commit: str | None,
    ) -> str:
        with self.lock(repo):
            head = self.branch_head(repo, branch)
            if parent_commit and parent_commit != head:
                raise HubError(
                    412,
                    f"A commit has happened since. Please refresh and try again "
                    f"(parentCommit {parent_commit} is not the head {head} of {branch}).",
                )
            entries = {p: (mode, sha) for p, (mode, sha, _) in self.tree_entries(repo, head).items()}
            for key, value in ops:
                path = validate_repo_path(value.get("path"))
                if key == "file":
                    encoding = value.get("encoding", "base64")
                    content = value.get("content", "")
                    if encoding == "base64":
                        data = base64.b64decode(content)
                    elif encoding in ("utf-8", "utf8", "text"):
                        data = content.encode()
                    else:
                        raise HubError(400, f"Unsupported encoding {encoding!r} for {path}")
                    entries[path] = ("100644", write_blob(repo, data))
                elif key == "lfsFile":
                    oid = str(value.get("oid", ""))
                    if value.get("algo", "sha256") != "sha256" or not OID_RE.match(oid):
                        raise HubError(400, f"Invalid LFS oid for {path}: {oid!r}")
                    obj = self.lfs_object_path(repo, oid)
                    if not os.path.isfile(obj):
                        raise HubError(
                            422,
                            f"LFS object {oid} for {path} was not uploaded to this repo "
                            f"(call the LFS batch API and upload it first)",
                        )
                    size = os.path.getsize(obj)
                    if value.get("size") is not None and int(value["size"]) != size:
                        raise HubError(422, f"LFS object {oid} has size {size}, commit says {value['size']}")
                    entries[path] = ("100644", write_blob(repo, lfs_pointer(oid, size)))
                elif key == "deletedFile":
                    if path not in entries:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del entries[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in entries if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del entries[p]
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            _check_file_dir_conflicts(entries)
            fd, index = tempfile.mkstemp(prefix="index-", dir=os.path.join(repo, ".git"))
            os.close(fd)
            os.unlink(index)  # git wants to create the index file itself
            try:
                env = {"GIT_INDEX_FILE": index}
                git(repo, "read-tree", "--empty", env=env)
                info = b"".join(
                    f"{mode} {sha}\t{p}".encode() + b"\0" for p, (mode, sha) in sorted(entries.items())
                )
                git(repo, "update-index", "--add", "-z", "--index-info", input=info, env=env)
                tree = git(repo, "write-tree", env=env).stdout.decode().strip()
            finally:
                if os.path.exists(index):
                    os.unlink(index)
            message = summary if not description else f"{summary}\n\n{description}"
            new = (
                git(
                    repo,
                    "commit-tree",
                    tree,
                    "-p",
                    head,
                    "-F",
                    "-",
                    input=message.encode(),
                    env=git_user_env(self.user),
                )
                .stdout.decode()
                .strip()
            )
            git(repo, "update-ref", f"refs/heads/{branch}", new, head)  # compare-and-swap
        self.bump("commits")
        return new


def _check_file_dir_conflicts(entries: dict[str, Any]) -> None:
    dirs = set()
    for p in entries:
        parts = p.split("/")
        for k in range(1, len(parts)):
            dirs.add("/".join(parts[:k]))
    clash = sorted(dirs.intersection(entries))
    if clash:
        raise HubError(409, f"Path conflict: {clash[0]!r} would be both a file and a folder")


def validate_repo_path(path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    if path.startswith("./"):
        path = path[2:]
    path = path.lstrip("/")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git" or "\0" in path or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


# --------------------------------------------------------------------------------------
# HTTP handler
# --------------------------------------------------------------------------------------

API_REPO = rf"/api/(?P<type>models|datasets|spaces)/(?P<ns>{NAME_RE})/(?P<name>{NAME_RE})"
GIT_REPO = rf"/(?:(?P<type>datasets|spaces)/)?(?P<ns>{NAME_RE})/(?P<name>{NAME_RE})\.git/info/lfs/objects"

ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(p + r"\Z"), h)
    for m, p, h in [
        ("GET", r"/_hubserver/health", "health"),
        ("GET", r"/_hubserver/stats", "stats"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/repos/move", "move_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("PUT", API_REPO + r"/settings", "repo_settings"),
        ("POST", API_REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", API_REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", API_REPO + r"/tag/(?P<rev>[^/]+)", "create_tag"),
        ("DELETE", API_REPO + r"/tag/(?P<tag>[^/]+)", "delete_tag"),
        ("POST", API_REPO + r"/branch/(?P<branch>[^/]+)", "create_branch"),
        ("DELETE", API_REPO + r"/branch/(?P<branch>[^/]+)", "delete_branch"),
        ("GET", API_REPO + r"/commits/(?P<rev>[^/]+)", "list_commits"),
        ("GET", API_REPO, "repo_info"),
        ("GET", API_REPO + r"/revision/(?P<rev>[^/]+)", "repo_info"),
        ("GET", API_REPO + r"/(?:xet-write-token|xet-read-token)/.*", "xet_unsupported"),
        ("POST", GIT_REPO + r"/batch", "lfs_batch"),
        ("POST", GIT_REPO + r"/verify", "lfs_verify"),
        ("PUT", GIT_REPO + r"/(?P<oid>[0-9a-f]{64})/(?P<size>[0-9]+)", "lfs_put"),
        ("GET", GIT_REPO + r"/(?P<oid>[0-9a-f]{64})", "lfs_get"),
    ]
]

# read routes whose upstream (olah) errors we refine into the Hub's real error codes
RESOLVE_RE = re.compile(
    rf"/(?:(?P<type>datasets|spaces)/)?(?P<ns>{NAME_RE})/(?P<name>{NAME_RE})"
    r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)\Z"
)
PROXIED_POST_RE = re.compile(API_REPO + r"/paths-info/[^/]+\Z")  # olah's only POST read route
REVISION_RE = re.compile(API_REPO + r"/(?:revision|tree|paths-info)/(?P<rev>[^/]+)(?:/(?P<path>.*))?\Z")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubserver-test/1"
    server: HubServer

    # ---- plumbing ----------------------------------------------------------------------

    def log_message(self, fmt: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"[hubserver] {self.address_string()} - {fmt % args}\n")

    @property
    def store(self) -> Store:
        return self.server.store

    @property
    def base_url(self) -> str:
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        return f"http://{host}"

    def _body_iter(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        if getattr(self, "_body_consumed", False):
            return
        self._body_consumed = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("truncated chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, chunk))
                    if not data:
                        raise ConnectionError("truncated chunked body")
                    left -= len(data)
                    yield data
                self.rfile.readline()  # CRLF after each chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, chunk))
                if not data:
                    raise ConnectionError("truncated body")
                left -= len(data)
                yield data

    def _has_unread_body(self) -> bool:
        if getattr(self, "_body_consumed", False):
            return False
        return (
            bool(int(self.headers.get("Content-Length") or 0))
            or "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        )

    def end_headers(self) -> None:
        self._headers_sent = True
        super().end_headers()

    def read_body(self) -> bytes:
        return b"".join(self._body_iter())

    def read_json(self) -> Any:
        raw = self.read_body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error_json(self, err: HubError, extra: dict[str, Any] | None = None) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " ")[:1000]}
        if err.code:
            headers["X-Error-Code"] = err.code
        self.send_json(err.status, {"error": err.message, **(extra or {})}, headers)

    def require_auth(self) -> None:
        token = self.server.token
        if not token:
            return
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HubError(401, "Invalid credentials in Authorization header")

    def dispatch(self) -> None:
        self._body_consumed = False
        self._headers_sent = False
        parsed = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(parsed.query)
        path = parsed.path
        try:
            for method, regex, handler in ROUTES:
                if method != self.command and not (method == "GET" and self.command == "HEAD"):
                    continue
                m = regex.match(path)
                if m:
                    params = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items() if v is not None}
                    getattr(self, "h_" + handler)(**params)
                    break
            else:
                if self.command in ("GET", "HEAD") or PROXIED_POST_RE.match(path):
                    self.proxy()
                else:
                    raise HubError(501, f"{self.command} {path} is not implemented by this test Hub")
        except HubError as err:
            if self._has_unread_body():
                self.close_connection = True  # we answer before reading the body: do not reuse the socket
            if getattr(self, "_headers_sent", False):
                self.close_connection = True
            else:
                self.send_error_json(err)
        except (TimeoutError, ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception as exc:  # a bug here: log it, and tell the client if still possible
            self.close_connection = True
            sys.stderr.write(
                f"[hubserver] internal error on {self.command} {self.path}\n{traceback.format_exc()}"
            )
            if not self._headers_sent:
                with contextlib.suppress(Exception):
                    self.send_error_json(HubError(500, f"hubserver internal error: {exc!r}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    # ---- misc --------------------------------------------------------------------------

    def h_health(self) -> None:
        ok = self.server.upstream_alive()
        self.send_json(200 if ok else 503, {"ok": ok, "upstream": f"127.0.0.1:{self.server.upstream_port}"})

    def h_stats(self) -> None:
        with self.store.stats_lock:
            self.send_json(200, dict(self.store.stats))

    def h_whoami(self) -> None:
        self.require_auth()
        user = self.store.user
        self.send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": f"{user} (hubserver test user)",
                "email": f"{user}@users.noreply.hubserver.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": "hubserver-test-token",
                        "role": "write",
                        "createdAt": "2024-01-01T00:00:00.000Z",
                    },
                },
            },
        )

    def h_validate_yaml(self) -> None:
        self.read_body()
        self.send_json(200, {"errors": [], "warnings": []})

    def h_xet_unsupported(self, **_: str) -> None:
        raise HubError(
            501,
            "This test Hub does not support Xet storage: set HF_HUB_DISABLE_XET=1 so that "
            "huggingface_hub uses the LFS protocol.",
        )

    def h_repo_settings(self, type: str, ns: str, name: str) -> None:
        self.require_auth()
        self.read_body()
        self.store.existing_repo(type, ns, name)
        self.send_json(200, {})  # visibility / gating are accepted and ignored

    # ---- repos -------------------------------------------------------------------------

    def _repo_target(self, payload: dict) -> tuple[str, str, str]:
        rtype = payload.get("type") or "model"
        if rtype not in REPO_TYPES:
            raise HubError(400, f"Unsupported repo type {rtype!r}")
        name = payload.get("name")
        ns = payload.get("organization") or self.store.user
        if not all(
            isinstance(part, str) and re.fullmatch(NAME_RE, part) and not part.endswith(".git")
            for part in (ns, name)
        ):
            raise HubError(400, f"Invalid repo name: {ns}/{name}")
        return REPO_TYPES[rtype], str(ns), str(name)

    def _repo_url(self, type_dir: str, ns: str, name: str) -> str:
        return f"{self.base_url}/{URL_PREFIX[type_dir]}{ns}/{name}"

    def h_create_repo(self) -> None:
        self.require_auth()
        payload = self.read_json()
        type_dir, ns, name = self._repo_target(payload)
        url = self._repo_url(type_dir, ns, name)
        if not self.store.create_repo(type_dir, ns, name):
            kind = {"models": "model", "datasets": "dataset", "spaces": "space"}[type_dir]
            return self.send_error_json(
                HubError(409, f"You already created this {kind} repo"), extra={"url": url}
            )
        self.send_json(
            200, {"url": url, "name": f"{ns}/{name}", "id": hashlib.sha1(url.encode()).hexdigest()[:24]}
        )

    def h_delete_repo(self) -> None:
        self.require_auth()
        type_dir, ns, name = self._repo_target(self.read_json())
        self.store.delete_repo(type_dir, ns, name)
        self.send_json(200, {})

    def h_move_repo(self) -> None:
        self.require_auth()
        payload = self.read_json()
        rtype = payload.get("type") or "model"
        if rtype not in REPO_TYPES:
            raise HubError(400, f"Unsupported repo type {rtype!r}")
        ids = []
        for key in ("fromRepo", "toRepo"):
            parts = str(payload.get(key, "")).split("/")
            if len(parts) != 2 or not all(re.fullmatch(NAME_RE, p) for p in parts):
                raise HubError(400, f"Invalid {key}: {payload.get(key)!r}")
            ids.append((parts[0], parts[1]))
        self.store.move_repo(REPO_TYPES[rtype], ids[0], ids[1])
        self.send_json(200, {"url": self._repo_url(REPO_TYPES[rtype], *ids[1])})

    # ---- preupload ---------------------------------------------------------------------

    def h_preupload(self, type: str, ns: str, name: str, rev: str) -> None:
        self.require_auth()
        payload = self.read_json()
        repo = self.store.existing_repo(type, ns, name)
        if self.query.get("create_pr"):
            raise HubError(501, "create_pr is not supported by this test Hub")
        head = self.store.branch_head(repo, rev)
        self.store.bump("preupload_requests")
        entries = self.store.tree_entries(repo, head)
        attributes = self.store.read_file_at(repo, head, ".gitattributes") or ""
        patterns = lfs_patterns(attributes)
        gitignore = payload.get("gitIgnore")
        if gitignore is None:
            gitignore = self.store.read_file_at(repo, head, ".gitignore") or ""
        files = []
        for f in payload.get("files", []):
            path = validate_repo_path(f.get("path"))
            size = int(f.get("size", 0))
            sample = base64.b64decode(f.get("sample", "") or "")
            lfs = (
                size >= LFS_SIZE_THRESHOLD or b"\0" in sample or any(path_matches(p, path) for p in patterns)
            )
            entry = entries.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": bool(gitignore) and is_ignored(gitignore, path),
                    "oid": self.store.remote_oid(repo, entry) if entry else None,
                }
            )
        self.send_json(200, {"files": files, "commitOid": head})

    # ---- LFS batch API -----------------------------------------------------------------

    def _git_repo_dir(self, type: str | None, ns: str, name: str) -> tuple[str, str]:
        type_dir = type or "models"
        return type_dir, self.store.existing_repo(type_dir, ns, name)

    def _signature(self, type_dir: str, ns: str, name: str, oid: str, size: int) -> str:
        msg = f"{type_dir}/{ns}/{name}/{oid}/{size}".encode()
        return hmac.new(self.server.secret, msg, hashlib.sha256).hexdigest()

    def h_lfs_batch(self, ns: str, name: str, type: str | None = None) -> None:
        self.require_auth()
        payload = self.read_json()
        type_dir, repo = self._git_repo_dir(type, ns, name)
        operation = payload.get("operation")
        if operation not in ("upload", "download"):
            raise HubError(400, f"Unsupported LFS operation {operation!r}")
        transfers = payload.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise HubError(422, "Only the 'basic' LFS transfer adapter is supported")
        self.store.bump("lfs_batch_requests")
        base = f"{self.base_url}/{URL_PREFIX[type_dir]}{ns}/{name}.git/info/lfs/objects"
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not OID_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": oid,
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            present = self.store.lfs_has(repo, oid, size)
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if operation == "upload":
                if present:
                    self.store.bump("lfs_objects_already_present")  # no "actions": client skips the upload
                else:
                    self.store.bump("lfs_objects_to_upload")
                    sig = self._signature(type_dir, ns, name, oid, size)
                    item["actions"] = {
                        "upload": {"href": f"{base}/{oid}/{size}?sig={sig}", "expires_in": 3600},
                        "verify": {"href": f"{base}/verify", "expires_in": 3600},
                    }
            else:
                if present:
                    item["actions"] = {"download": {"href": f"{base}/{oid}", "expires_in": 3600}}
                else:
                    item = {
                        "oid": oid,
                        "size": size,
                        "error": {"code": 404, "message": "Object does not exist"},
                    }
            objects.append(item)
        self.send_json(
            200,
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def h_lfs_put(self, ns: str, name: str, oid: str, size: str, type: str | None = None) -> None:
        # Like a presigned S3 URL: authorised by the signature in the href, not by a token.
        type_dir, repo = self._git_repo_dir(type, ns, name)
        expected = self._signature(type_dir, ns, name, oid, int(size))
        if not hmac.compare_digest((self.query.get("sig") or [""])[0], expected):
            raise HubError(403, "Invalid or missing upload signature")
        tmp_dir = os.path.join(repo, ".git", "lfs", "tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{oid}-", dir=tmp_dir)
        digest, total = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self._body_iter():
                    digest.update(chunk)
                    total += len(chunk)
                    f.write(chunk)
            if total != int(size) or digest.hexdigest() != oid:
                raise HubError(
                    400,
                    f"Uploaded content does not match: got sha256={digest.hexdigest()} "
                    f"size={total}, expected sha256={oid} size={size}",
                )
            final = self.store.lfs_object_path(repo, oid)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.store.bump("lfs_uploads")
        self.store.bump("lfs_upload_bytes", total)
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.md5(oid.encode()).hexdigest()}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def h_lfs_verify(self, ns: str, name: str, type: str | None = None) -> None:
        self.require_auth()
        payload = self.read_json()
        _, repo = self._git_repo_dir(type, ns, name)
        self.store.bump("lfs_verifies")
        oid, size = str(payload.get("oid", "")), payload.get("size")
        if not OID_RE.match(oid) or not self.store.lfs_has(
            repo, oid, size if isinstance(size, int) else None
        ):
            raise HubError(404, f"LFS object {oid} not found (or wrong size)")
        self.send_json(200, {"oid": oid, "size": size})

    def h_lfs_get(self, ns: str, name: str, oid: str, type: str | None = None) -> None:
        _, repo = self._git_repo_dir(type, ns, name)
        path = self.store.lfs_object_path(repo, oid)
        if not os.path.isfile(path):
            raise HubError(404, "Object does not exist")
        size = os.path.getsize(path)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(path, "rb") as f:
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    # ---- commit ------------------------------------------------------------------------

    def h_commit(self, type: str, ns: str, name: str, rev: str) -> None:
        self.require_auth()
        raw = self.read_body()
        repo = self.store.existing_repo(type, ns, name)
        if self.query.get("create_pr"):
            raise HubError(501, "create_pr is not supported by this test Hub")
        header: dict | None = None
        ops: list[tuple[str, dict]] = []
        ctype = self.headers.get("Content-Type", "")
        # legacy JSON body {summary, files, lfsFiles, deletedFiles}; today's client sends NDJSON
        if "json" in ctype and "ndjson" not in ctype:
            body = json.loads(raw or b"{}")
            header = {
                "summary": body.get("summary", ""),
                "description": body.get("description", ""),
                "parentCommit": body.get("parentCommit"),
            }
            ops += [("file", f) for f in body.get("files", [])]
            ops += [("lfsFile", f) for f in body.get("lfsFiles", [])]
            ops += [("deletedFile", f) for f in body.get("deletedFiles", [])]
        else:
            for n, line in enumerate(raw.splitlines()):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                except (ValueError, KeyError, TypeError):
                    raise HubError(400, f"Malformed NDJSON line {n + 1}") from None
                if key == "header":
                    header = value
                else:
                    ops.append((key, value))
        if header is None:
            raise HubError(400, "Commit payload has no header line")
        summary = (header.get("summary") or "").strip() or "Upload files"
        new = self.store.commit(
            repo, rev, ops, summary, header.get("description") or "", header.get("parentCommit")
        )
        self.send_json(
            200,
            {
                "success": True,
                "commitOid": new,
                "commitMessage": summary,
                "commitUrl": f"{self._repo_url(type, ns, name)}/commit/{new}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    # ---- refs --------------------------------------------------------------------------

    def h_create_tag(self, type: str, ns: str, name: str, rev: str) -> None:
        self.require_auth()
        payload = self.read_json()
        repo = self.store.existing_repo(type, ns, name)
        tag = payload.get("tag")
        if not isinstance(tag, str) or not tag:
            raise HubError(400, "Missing 'tag'")
        ref = f"refs/tags/{tag}"
        self.store.check_ref_name(repo, ref)
        with self.store.lock(repo):
            commit = self.store.resolve(repo, rev)
            if self.store.ref_exists(repo, ref):
                raise HubError(409, f"Tag {tag} already exists")
            message = payload.get("message")
            if message:
                git(repo, "tag", "-a", "-m", message, "--", tag, commit, env=git_user_env(self.store.user))
            else:
                git(repo, "update-ref", ref, commit, "")
        self.store.bump("tags_created")
        self.send_json(200, {"name": tag, "ref": ref, "targetCommit": commit})

    def h_delete_tag(self, type: str, ns: str, name: str, tag: str) -> None:
        self.require_auth()
        self.read_body()
        repo = self.store.existing_repo(type, ns, name)
        ref = f"refs/tags/{tag}"
        with self.store.lock(repo):
            if not self.store.ref_exists(repo, ref):
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            git(repo, "update-ref", "-d", ref)
        self.send_json(200, {})

    def h_create_branch(self, type: str, ns: str, name: str, branch: str) -> None:
        self.require_auth()
        payload = self.read_json()
        repo = self.store.existing_repo(type, ns, name)
        ref = f"refs/heads/{branch}"
        self.store.check_ref_name(repo, ref)
        with self.store.lock(repo):
            commit = self.store.resolve(repo, payload.get("startingPoint") or "main")
            if self.store.ref_exists(repo, ref):
                raise HubError(409, f"Branch {branch} already exists")
            git(repo, "update-ref", ref, commit, "")
        self.send_json(200, {"name": branch, "ref": ref, "targetCommit": commit})

    def h_delete_branch(self, type: str, ns: str, name: str, branch: str) -> None:
        self.require_auth()
        self.read_body()
        repo = self.store.existing_repo(type, ns, name)
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        ref = f"refs/heads/{branch}"
        with self.store.lock(repo):
            if not self.store.ref_exists(repo, ref):
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            git(repo, "update-ref", "-d", ref)
        self.send_json(200, {})

    # ---- read gaps of olah -------------------------------------------------------------

    def h_list_commits(self, type: str, ns: str, name: str, rev: str) -> None:
        repo = self.store.existing_repo(type, ns, name)
        commit = self.store.resolve(repo, rev)
        out = git(repo, "log", "-z", "--format=%H%x1f%an%x1f%aI%x1f%B", commit).stdout.decode(
            errors="replace"
        )
        items = []
        for rec in out.split("\0"):
            if not rec.strip():
                continue
            sha, author, date, body = rec.lstrip("\n").split("\x1f", 3)
            title, _, message = body.strip().partition("\n")
            message = message.strip()
            when = _dt.datetime.fromisoformat(date).astimezone(_dt.timezone.utc)
            items.append(
                {
                    "id": sha,
                    "title": title,
                    "message": message,
                    "authors": [{"user": author, "avatar": None}],
                    "date": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                    "formatted": {"title": title, "message": message},
                }
            )
        self.send_json(200, items)

    def h_repo_info(self, type: str, ns: str, name: str, rev: str = "main") -> None:
        """Repo info is olah's; two gaps are filled here:
        * ``GET /api/{type}/{ns}/{name}`` (no revision) is served as the ``main`` revision;
        * with ``blobs=true`` (``files_metadata=True``) siblings get size / blobId / lfs from git."""
        query = urllib.parse.urlsplit(self.path).query
        target = f"/api/{type}/{ns}/{name}/revision/{urllib.parse.quote(rev, safe='')}"
        target += f"?{query}" if query else ""
        if self.query.get("blobs", [""])[0].lower() not in ("1", "true"):
            return self.proxy(target)
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=120)
        try:
            conn.request("GET", target, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
        finally:
            conn.close()
        if status != 200:
            return self.proxy(target)  # replays the (refined) error
        info = json.loads(body)
        repo = self.store.existing_repo(type, ns, name)
        entries = self.store.tree_entries(repo, info["sha"])
        for sibling in info.get("siblings", []):
            entry = entries.get(sibling.get("rfilename"))
            if entry is None:
                continue
            _, blob, size = entry
            sibling.update(blobId=blob, size=size)
            oid = self.store.remote_oid(repo, entry)
            if oid != blob:  # LFS pointer
                real = os.path.getsize(self.store.lfs_object_path(repo, oid))
                sibling.update(size=real, lfs={"sha256": oid, "size": real, "pointerSize": size})
        self.send_json(200, info)

    # ---- reverse proxy to olah ---------------------------------------------------------

    def proxy(self, path: str | None = None) -> None:
        self.store.bump("proxied_requests")
        path = path or self.path
        body = self.read_body()
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "host"
        }
        headers["Host"] = self.headers.get("Host", f"127.0.0.1:{self.server.server_address[1]}")
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=300)
        try:
            conn.request(self.command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            if resp.status >= 400 and self._refine_read_error(urllib.parse.urlsplit(path).path, resp):
                return
            self.send_response(resp.status)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                kl = k.lower()
                if kl in HOP_BY_HOP or kl in ("server", "date", "content-length"):
                    continue
                if kl == "location":
                    v = v.replace(f"http://127.0.0.1:{self.server.upstream_port}", self.base_url)
                self.send_header(k, v)
            no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            if length is not None:
                self.send_header("Content-Length", length)
            elif not no_body:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if no_body:
                return
            if length is not None:
                shutil.copyfileobj(resp, self.wfile, 1 << 20)
            else:
                while True:
                    chunk = resp.read1(1 << 20) if hasattr(resp, "read1") else resp.read(1 << 20)
                    if not chunk:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
        except (TimeoutError, ConnectionRefusedError, http.client.HTTPException) as exc:
            if self._headers_sent:
                self.close_connection = True  # cannot report an error in the middle of a body
            else:
                self.send_error_json(HubError(502, f"upstream (olah) unavailable: {exc!r}"))
        finally:
            conn.close()

    def _refine_read_error(self, path: str, resp: http.client.HTTPResponse) -> bool:
        """olah answers 401 RepoNotFound (or 500) for a missing revision or file of an existing repo.
        Answer what the Hub answers instead: 404 RevisionNotFound / 404 EntryNotFound."""
        m = RESOLVE_RE.match(path)
        if m:
            type_dir = m.group("type") or "models"
        else:
            m = REVISION_RE.match(path)
            if not m:
                return False
            type_dir = m.group("type")
        ns, name = m.group("ns"), m.group("name")
        rev = urllib.parse.unquote(m.group("rev"))
        file_path = urllib.parse.unquote(m.group("path") or "")
        repo = self.store.repo_dir(type_dir, ns, name)
        if not os.path.isdir(os.path.join(repo, ".git")):
            return False
        try:
            commit = self.store.resolve(repo, rev)
        except HubError as err:
            resp.read()
            self.send_error_json(err)
            return True
        if file_path.strip("/"):
            if git(repo, "cat-file", "-e", f"{commit}:{file_path.strip('/')}", check=False).returncode != 0:
                resp.read()
                self.send_error_json(HubError(404, "Entry not found", "EntryNotFound"))
                return True
        return False


class HubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self, addr: tuple[str, int], store: Store, upstream_port: int, token: str | None, quiet: bool
    ):
        super().__init__(addr, Handler)
        self.store = store
        self.upstream_port = upstream_port
        self.token = token
        self.quiet = quiet
        self.secret = secrets.token_bytes(32)

    def upstream_alive(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=2)
        try:
            conn.request("GET", "/api/models/hubserver-probe/hubserver-probe/revision/main")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--root", required=True, help="folder holding {models,datasets,spaces}/<ns>/<name> git repos"
    )
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0: pick a free one)")
    ap.add_argument("--upstream-port", type=int, required=True, help="port of olah on 127.0.0.1")
    ap.add_argument(
        "--token",
        default=os.environ.get("HUBSERVER_TOKEN"),
        help="bearer token required for write calls (default: $HUBSERVER_TOKEN; none = no auth)",
    )
    ap.add_argument(
        "--user", default="hubtest", help="user name returned by whoami and used as default namespace"
    )
    ap.add_argument("--port-file", help="write the bound port to this file once listening")
    ap.add_argument("--quiet", action="store_true", help="do not log each request")
    args = ap.parse_args(argv)

    if shutil.which("git") is None:
        print("hubserver: git is required", file=sys.stderr)
        return 2
    store = Store(args.root, args.user)
    server = HubServer(("127.0.0.1", args.port), store, args.upstream_port, args.token, args.quiet)
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    print(
        f"hubserver listening on http://127.0.0.1:{port} (upstream olah on 127.0.0.1:{args.upstream_port})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
