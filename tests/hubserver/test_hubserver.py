"""The test Hub against the official huggingface_hub client only (no mocking)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .fixtures import HubServer

# the client's own LFS PUT (data=fileobj) triggers this httpx2 deprecation warning
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

BIG = 10 * 1024 * 1024 + 123_457  # > 10 MB: must take the LFS path


def unique(prefix: str = "repo") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def safetensors_like(n_bytes: int, seed: int = 0) -> bytes:
    """A structurally valid safetensors file (8-byte header length + JSON header + data)."""
    n_floats = n_bytes // 4
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "weight": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    data = hashlib.shake_256(f"seed-{seed}".encode()).digest(4 * n_floats)
    return struct.pack("<Q", len(header)) + header + data


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_folder(path: Path, weights: bytes, config: dict, notes: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "README.md").write_text("---\nlicense: mit\ntags:\n- test\n---\n# A test model\n")
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text(notes)
    return path


def read_snapshot(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


# --------------------------------------------------------------------------------------


def test_create_repo_exist_ok_twice(hub_env: HubServer):
    api = hub_env.api()
    repo_id = f"org-a/{unique()}"
    url1 = api.create_repo(repo_id, exist_ok=True)
    url2 = api.create_repo(repo_id, exist_ok=True)
    assert url1 == url2 == f"{hub_env.endpoint}/{repo_id}"
    assert url1.repo_id == repo_id
    assert api.repo_exists(repo_id)
    # without exist_ok the Hub answers 409
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409
    # a fresh repo has the Hub's initial commit with .gitattributes on main
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]
    # no namespace -> the token owner's namespace
    bare = unique()
    assert api.create_repo(bare).repo_id == f"{hub_env.user}/{bare}"
    assert api.whoami()["name"] == hub_env.user


def test_publish_tag_and_read_back(hub_env: HubServer, tmp_path: Path):
    api = hub_env.api()
    ep, token = hub_env.endpoint, hub_env.token
    repo_id = f"org-a/{unique('model')}"
    api.create_repo(repo_id, exist_ok=True)

    weights_v1 = safetensors_like(BIG, seed=1)
    folder = make_folder(tmp_path / "v1", weights_v1, {"hidden": 8, "version": 1}, "first\n")
    before = hub_env.stats()
    info1 = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v1 weights")
    d = delta(before, hub_env.stats())
    assert d["lfs_uploads"] == 1 and d["lfs_upload_bytes"] == len(weights_v1)  # only the big file is LFS
    assert d["commits"] == 1
    assert info1.oid == api.list_repo_refs(repo_id).branches[0].target_commit
    assert info1.commit_url == f"{ep}/{repo_id}/commit/{info1.oid}"

    # stored like the Hub: a git-lfs pointer in git, the bytes in the repo's LFS store
    repo_dir = hub_env.repo_dir(repo_id)
    pointer = subprocess.run(
        ["git", "-C", str(repo_dir), "show", f"{info1.oid}:model.safetensors"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    oid = sha256(weights_v1)
    assert (
        pointer == f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(weights_v1)}\n"
    )
    assert (repo_dir / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes() == weights_v1

    expected_files = [".gitattributes", "README.md", "config.json", "model.safetensors", "sub/notes.txt"]
    assert sorted(api.list_repo_files(repo_id)) == expected_files
    tree = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True) if hasattr(f, "size")}
    assert tree["model.safetensors"].lfs.sha256 == oid
    assert tree["model.safetensors"].size == len(weights_v1)
    assert tree["config.json"].lfs is None
    assert tree["config.json"].blob_id == git_blob_sha1((folder / "config.json").read_bytes())

    api.create_tag(repo_id, tag="v1.0", tag_message="first release")
    api.create_tag(repo_id, tag="v1.0", exist_ok=True)
    refs = api.list_repo_refs(repo_id)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": info1.oid}
    assert sorted(api.list_repo_files(repo_id, revision="v1.0")) == expected_files
    assert api.repo_info(repo_id, revision="v1.0").sha == info1.oid
    siblings = {
        f.rfilename: f for f in api.model_info(repo_id, revision="v1.0", files_metadata=True).siblings
    }
    assert siblings["model.safetensors"].size == len(weights_v1)
    assert siblings["model.safetensors"].lfs.sha256 == oid
    assert siblings["config.json"].lfs is None

    # downloads: bytes, etag (sha256 for LFS, git sha1 otherwise), commit hash
    cache = tmp_path / "cache"
    for rev in ("main", "v1.0", info1.oid):
        path = hf_hub_download(
            repo_id, "model.safetensors", revision=rev, endpoint=ep, token=token, cache_dir=cache
        )
        assert Path(path).read_bytes() == weights_v1
        assert Path(os.path.realpath(path)).name == oid  # blob named by the server's etag
    meta = get_hf_file_metadata(hf_hub_url(repo_id, "model.safetensors", endpoint=ep), token=token)
    assert (meta.etag, meta.size, meta.commit_hash) == (oid, len(weights_v1), info1.oid)
    cfg = hf_hub_download(repo_id, "config.json", endpoint=ep, token=token, cache_dir=cache)
    assert Path(os.path.realpath(cfg)).name == git_blob_sha1((folder / "config.json").read_bytes())

    # second commit: new weights, changed config, deleted file, added file
    weights_v2 = safetensors_like(BIG, seed=2)
    ops = [
        CommitOperationAdd("model.safetensors", weights_v2),
        CommitOperationAdd("config.json", json.dumps({"hidden": 8, "version": 2}).encode()),
        CommitOperationAdd("extra/added.txt", b"new in v2\n"),
        CommitOperationDelete("sub/notes.txt"),
    ]
    info2 = api.create_commit(repo_id, ops, commit_message="v2", parent_commit=info1.oid)
    assert info2.oid != info1.oid
    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "extra/added.txt",
        "model.safetensors",
    ]
    assert sorted(api.list_repo_files(repo_id, revision="v1.0")) == expected_files
    assert [c.title for c in api.list_repo_commits(repo_id)] == ["v2", "v1 weights", "initial commit"]

    # snapshot at the tag (and at the first sha) still returns the OLD content
    old = {p: (folder / p).read_bytes() for p in expected_files if p != ".gitattributes"}
    for rev in ("v1.0", info1.oid):
        snap = read_snapshot(
            snapshot_download(repo_id, revision=rev, endpoint=ep, token=token, cache_dir=cache)
        )
        assert {k: v for k, v in snap.items() if k != ".gitattributes"} == old
    new = read_snapshot(
        snapshot_download(repo_id, revision="main", endpoint=ep, token=token, cache_dir=cache)
    )
    assert new["model.safetensors"] == weights_v2
    assert json.loads(new["config.json"])["version"] == 2
    assert "sub/notes.txt" not in new and new["extra/added.txt"] == b"new in v2\n"


def test_identical_lfs_file_is_not_uploaded_again(hub_env: HubServer, tmp_path: Path):
    api = hub_env.api()
    repo_id = f"org-b/{unique()}"
    api.create_repo(repo_id)
    weights = safetensors_like(BIG, seed=3)
    first = api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=repo_id)

    # 1) same bytes, same path: preupload reports the remote oid, LFS batch says "already present"
    #    (no upload action), and the client drops the no-op -> no new commit at all.
    before = hub_env.stats()
    same = api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=repo_id)
    d = delta(before, hub_env.stats())
    assert d.get("lfs_objects_already_present") == 1
    assert d.get("lfs_uploads", 0) == 0 and d.get("lfs_objects_to_upload", 0) == 0
    assert d.get("commits", 0) == 0
    assert same.oid == first.oid

    # 2) same bytes under another path plus a small change: the object is still not re-sent,
    #    and the commit references it by oid.
    before = hub_env.stats()
    info = api.create_commit(
        repo_id,
        [CommitOperationAdd("copy/model.safetensors", weights), CommitOperationAdd("note.txt", b"x\n")],
        commit_message="copy",
    )
    d = delta(before, hub_env.stats())
    assert d.get("lfs_objects_already_present") == 1 and d.get("lfs_uploads", 0) == 0
    assert d.get("commits") == 1
    path = hf_hub_download(
        repo_id,
        "copy/model.safetensors",
        revision=info.oid,
        endpoint=hub_env.endpoint,
        token=hub_env.token,
        cache_dir=tmp_path / "c",
    )
    assert Path(path).read_bytes() == weights


def test_plain_snapshot_download_with_env(hub_env: HubServer, tmp_path: Path):
    """huggingface_hub.snapshot_download with no endpoint/token arguments (HF_ENDPOINT style)."""
    api = hub_env.api()
    repo_id = f"org-c/{unique()}"
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"hello\n", path_in_repo="hello.txt", repo_id=repo_id)
    api.upload_file(
        path_or_fileobj=safetensors_like(4096, seed=4), path_in_repo="w.safetensors", repo_id=repo_id
    )
    api.create_tag(repo_id, tag="v1")

    local = huggingface_hub.snapshot_download(repo_id, revision="v1")
    snap = read_snapshot(local)
    assert snap["hello.txt"] == b"hello\n"
    assert snap["w.safetensors"] == safetensors_like(4096, seed=4)
    assert Path(local).is_relative_to(Path(os.environ["HF_HUB_CACHE"]))
    # and the same from a fresh interpreter that only gets the environment variables
    code = (
        "import huggingface_hub, pathlib, sys;"
        "p = huggingface_hub.snapshot_download(sys.argv[1], revision='v1');"
        "print((pathlib.Path(p) / 'hello.txt').read_text(), end='')"
    )
    env = {**os.environ, **hub_env.env, "HF_HOME": str(tmp_path / "sub_home")}
    env.pop("HF_HUB_CACHE")
    out = subprocess.run(
        [sys.executable, "-c", code, repo_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\n"


def test_dataset_repo_roundtrip(hub_env: HubServer, tmp_path: Path):
    api = hub_env.api()
    repo_id = f"org-d/{unique('data')}"
    url = api.create_repo(repo_id, repo_type="dataset")
    assert url == f"{hub_env.endpoint}/datasets/{repo_id}"
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id=repo_id, repo_type="dataset"
    )
    api.upload_file(
        path_or_fileobj=os.urandom(2048) + b"\0",
        path_in_repo="data/blob.bin",
        repo_id=repo_id,
        repo_type="dataset",
    )
    assert sorted(api.list_repo_files(repo_id, repo_type="dataset")) == [
        ".gitattributes",
        "data/blob.bin",
        "data/train.csv",
    ]
    path = hf_hub_download(
        repo_id, "data/train.csv", repo_type="dataset", endpoint=hub_env.endpoint, cache_dir=tmp_path
    )
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert hub_env.repo_dir(repo_id, "dataset").is_dir()


def test_refs_commits_and_errors(hub_env: HubServer, tmp_path: Path):
    api = hub_env.api()
    ep = hub_env.endpoint
    repo_id = f"org-e/{unique()}"
    api.create_repo(repo_id)
    c1 = api.upload_file(path_or_fileobj=b"one\n", path_in_repo="a.txt", repo_id=repo_id)

    # branches and tags
    api.create_branch(repo_id, branch="dev", revision=c1.oid)
    c2 = api.upload_file(path_or_fileobj=b"two\n", path_in_repo="a.txt", repo_id=repo_id, revision="dev")
    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c1.oid, "dev": c2.oid}
    api.create_tag(repo_id, tag="t", revision="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(repo_id, tag="t")
    assert err.value.response.status_code == 409
    api.delete_tag(repo_id, tag="t")
    assert api.list_repo_refs(repo_id).tags == []
    api.delete_branch(repo_id, branch="dev")

    # the Hub's error types
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", endpoint=ep, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "a.txt", revision="no-such-branch", endpoint=ep, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo_id, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files(f"org-e/{unique('missing')}")
    assert not api.repo_exists(f"org-e/{unique('missing')}")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision="no-such-branch"
        )
    with pytest.raises(EntryNotFoundError):
        api.delete_file("not-there.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as err:  # stale parent_commit
        api.create_commit(
            repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="x", parent_commit="0" * 40
        )
    assert err.value.response.status_code == 412

    # writes need the token
    with pytest.raises(HfHubHTTPError) as err:
        hub_env.api(token="hf_wrong").create_repo(f"org-e/{unique()}")
    assert err.value.response.status_code == 401

    # delete_file / delete_folder / delete_repo
    api.upload_folder(
        repo_id=repo_id, folder_path=make_folder(tmp_path / "f", b"w", {}, "n\n"), path_in_repo="f"
    )
    api.delete_folder("f/sub", repo_id=repo_id)
    api.delete_file("a.txt", repo_id=repo_id)
    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes",
        "f/README.md",
        "f/config.json",
        "f/model.safetensors",
    ]
    moved = f"org-e/{unique('moved')}"
    api.move_repo(repo_id, moved)
    assert not api.repo_exists(repo_id)
    assert "f/config.json" in api.list_repo_files(moved)
    api.delete_repo(moved)
    assert not api.repo_exists(moved)
    api.delete_repo(moved, missing_ok=True)

    # what the test Hub does not implement fails loudly (501), never silently
    with pytest.raises(HfHubHTTPError) as err:
        api.super_squash_history(f"org-e/{unique()}")
    assert err.value.response.status_code == 501
