"""``scaler publish`` / ``scaler pull`` against a real Hub API on 127.0.0.1 (tests/hubserver).

No mocks: the official huggingface_hub client talks HTTP to the test Hub (write server + olah),
and the CLI runs as real subprocesses. One repo with demo v1 and v2 is published once per
module (through the CLI); tests that change a repo publish their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SCALER, _copy_store, run_scaler
from hubserver import fixtures as hub_fixtures
from hubserver.fixtures import HubServer
from huggingface_hub import CommitOperationAdd, ModelCard, snapshot_download
from huggingface_hub.hf_api import RepoFile

from scaler_wizard.banks import BankHash, ContentStore, sha256_file
from scaler_wizard.banks.model_card import model_card
from scaler_wizard.errors import BranchNotFoundError, ConflictError, IntegrityError, ScalerError
from scaler_wizard.manifests import validate_manifest
from scaler_wizard.modeling.compose import compose, new_branch, save_version, trunk_id
from scaler_wizard.modeling.verify import verify_version
from scaler_wizard.remote import HubRepo, publish, pull
from scaler_wizard.versions.history import history, rollback

hub_server = hub_fixtures.hub_server  # the test Hub's fixtures, used by name below
hub_env = hub_fixtures.hub_env

# the client's own LFS PUT (data=fileobj) triggers this httpx deprecation warning
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

TEXTS = ["Free entry! Text WIN to 80086 now", "Who wrote Hamlet?", "see you at 6 then", "How far is Mars?"]


def cli_env(hub: HubServer, home: Path, tmp: Path) -> dict[str, str]:
    env = {**os.environ, **hub.env, "SCALER_HOME": str(home), "HF_HOME": str(tmp / "hf-home")}
    env.pop("SCALER_DEBUG", None)
    return env


def scaler_json(*args: str, env: dict[str, str]) -> Any:
    r = run_scaler(*args, "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def tree_state(root: Path) -> dict[str, str]:
    """Every file of a store except its staging area and caches: objects by size (they are named
    by their hash and read-only), everything else (refs, logs, manifests...) by content."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in ("tmp", "cache") and p.name != ".lock":
            out[rel.as_posix()] = str(p.stat().st_size) if rel.parts[0] == "objects" else sha256_file(p).hex
    return out


def logits_of(store: ContentStore, spec: str) -> dict[str, torch.Tensor]:
    model = compose(store, spec)
    with torch.no_grad():
        return dict(model(**model.base.tokenize(TEXTS)).logits)


@pytest.fixture(scope="module")
def published(
    hub_server: HubServer, session_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """demo v1 and v2 published with the CLI to a fresh repo (tags v1, v2)."""
    tmp = tmp_path_factory.mktemp("published")
    home = tmp / "store"
    _copy_store(session_store, home)
    env = cli_env(hub_server, home, tmp)
    repo_id = f"{hub_server.user}/demo-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    v1 = scaler_json("publish", "demo@1", repo_id, env=env)
    t1 = time.perf_counter()
    v2 = scaler_json("publish", "demo", repo_id, env=env)
    t2 = time.perf_counter()
    print(
        f"\n[timing] scaler publish demo v1: {t1 - t0:.1f}s wall ({v1['seconds']:.1f}s in publish), "
        f"v2: {t2 - t1:.1f}s wall ({v2['seconds']:.1f}s in publish)"
    )
    return {"repo_id": repo_id, "home": home, "v1": v1, "v2": v2}


# -- round trip -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_into_an_empty_store_in_another_process(
    published: dict[str, Any], hub_server: HubServer, tmp_path: Path
) -> None:
    v1, v2 = published["v1"], published["v2"]
    assert (v1["version"], v1["tag"], v2["version"], v2["tag"]) == (1, "v1", 2, "v2")
    # v1 uploaded the base and its files; v2 only what changed (trunk layers, two branches)
    assert len(v2["uploaded"]) == 6 and set(v2["reused"]) < set(v1["uploaded"])
    assert len(v2["reused"]) == len(v1["uploaded"]) - 2

    home = tmp_path / "pulled"
    env = cli_env(hub_server, home, tmp_path)
    t0 = time.perf_counter()
    result = scaler_json("pull", published["repo_id"], env=env)
    print(
        f"\n[timing] scaler pull demo v2 into an empty store: {time.perf_counter() - t0:.1f}s wall "
        f"({result['seconds']:.1f}s in pull, {result['downloaded_bytes'] / 1e6:.1f} MB)"
    )
    assert result["action"] == "created" and result["name"] == "demo"
    assert result["manifest"] == v2["manifest"] and result["history"] == 1  # v1's manifest came too

    verify = run_scaler("verify", "demo", env=env)
    assert verify.returncode == 0, verify.stderr

    source, pulled = ContentStore.open(published["home"]), ContentStore.open(home)
    assert pulled.resolve("demo") == source.resolve("demo")
    assert [h for h, _ in history(pulled, pulled.resolve("demo"))] == [
        h for h, _ in history(source, source.resolve("demo"))
    ]
    want, got = logits_of(source, "demo"), logits_of(pulled, "demo")
    assert set(got) == {"spam", "topic"}
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert not list((home / "tmp").glob(".tmp-pull-*"))  # staging cleaned up


@pytest.mark.slow
def test_plain_snapshot_download_reads_the_repo_and_the_card(
    published: dict[str, Any], hub_env: HubServer, tmp_path: Path
) -> None:
    repo_id = published["repo_id"]
    folder = Path(snapshot_download(repo_id, revision="v2", cache_dir=tmp_path / "cache"))
    raw = (folder / "manifest.json").read_bytes()
    manifest = validate_manifest(json.loads(raw))
    assert str(BankHash.of_bytes(raw)) == published["v2"]["manifest"]
    assert (folder / f"manifests/{BankHash.of_bytes(raw).hex}.json").read_bytes() == raw
    assert (folder / f"manifests/{BankHash(manifest['parent']).hex}.json").is_file()
    banks = sorted((folder / "banks").iterdir())
    assert banks, "no banks"
    for path in banks:  # every bank file is named by the sha256 of its bytes
        assert sha256_file(path).hex == path.name.split(".")[0], path.name
    assert (folder / f"banks/{BankHash(manifest['base']['bank']).hex}.safetensors").is_file()

    card = ModelCard.load(repo_id)
    assert card.data.library_name == "scaler-wizard"
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.pipeline_tag == "text-classification"
    assert "scaler-wizard" in card.data.tags
    assert card.data.scaler_wizard["manifest"] == published["v2"]["manifest"]
    assert "| branch | labels |" in card.text
    assert "| `spam` | `ham`, `spam` | lora | linear |" in card.text
    assert "| `topic` |" in card.text
    assert hub_env.token not in (folder / "README.md").read_text() + raw.decode()


def test_card_carries_branch_metrics_as_model_index(store: ContentStore) -> None:
    manifest = store.get_manifest(store.resolve("demo"))
    manifest["branches"]["spam"]["metrics"] = {"accuracy": 0.975, "macro_f1": 0.9, "eval_rows": 1115}
    manifest["branches"]["spam"]["provenance"] = {"data": {"file": "sms_spam.csv"}}
    text = model_card(manifest, "sha256:" + "a" * 64, repo_id="me/demo", tag="v2")
    card = ModelCard(text)
    results = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("branch spam", "accuracy"): 0.975, ("branch spam", "f1"): 0.9}
    assert "| `spam` | `ham`, `spam` | lora | linear | 0.975 | 0.900 | 1115 |" in text
    assert card.data.scaler_wizard["branches"]["spam"]["metrics"]["accuracy"] == 0.975


# -- versions and deduplication ---------------------------------------------------------------------


def files_at(api: Any, repo_id: str, revision: str) -> dict[str, str]:
    """{path: blob id or LFS sha256} of a revision."""
    return {
        f.path: (f.lfs.sha256 if f.lfs else f.blob_id)
        for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
        if isinstance(f, RepoFile)
    }


def test_second_version_uploads_only_new_banks_and_tags_are_immutable(
    published: dict[str, Any], hub_env: HubServer, tmp_path: Path
) -> None:
    home = tmp_path / "store"
    _copy_store(published["home"], home)
    store = ContentStore.open(home)
    repo_id = f"{hub_env.user}/dedup-{uuid.uuid4().hex[:8]}"
    api = hub_env.api()
    first = publish(store, "demo", repo_id)
    assert first.tag == "v2" and first.uploaded and not first.reused

    # v3 adds a peft-lora branch: its adapter is a folder bank (a tree object naming two files)
    model = compose(store, "demo")
    model.add_branch("intent", new_branch(hidden_size=384, labels=["no", "yes"], strategy="peft-lora"))
    with torch.no_grad():
        for pname, p in model.base.model.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.05)
    v3 = save_version(store, model, message="add intent")
    entry = store.get_manifest(v3)["branches"]["intent"]
    tree = BankHash(entry["adapter_bank"])
    members = store.tree_members(tree)
    assert set(members) == {"adapter_config.json", "adapter_model.safetensors"}
    new_banks = {
        f"banks/{tree.hex}",
        f"banks/{members['adapter_config.json'].hex}",
        f"banks/{members['adapter_model.safetensors'].hex}.safetensors",
        f"banks/{BankHash(entry['head_bank']).hex}.safetensors",
    }
    before = hub_env.stats()
    second = publish(store, "demo", repo_id)
    delta = {k: v - before.get(k, 0) for k, v in hub_env.stats().items()}
    assert (second.tag, second.version, set(second.uploaded)) == ("v3", 3, new_banks)
    assert delta["lfs_uploads"] == 2 and delta["commits"] == 1 and delta["tags_created"] == 1

    # what the v3 commit changed, as the Hub reports it
    old, new = files_at(api, repo_id, "v2"), files_at(api, repo_id, "v3")
    changed = {p for p in new if old.get(p) != new[p]}
    assert changed == new_banks | {"README.md", "manifest.json", f"manifests/{v3.hex}.json"}
    assert set(old) <= set(new)

    # re-publishing a version is a no-op; another manifest cannot take an existing tag
    before = hub_env.stats()
    again = publish(store, "demo", repo_id)
    assert again.already_published and again.commit == second.commit
    assert hub_env.stats()["commits"] == before["commits"]
    with pytest.raises(ConflictError, match=r"tag v3 already holds manifest"):
        publish(store, "demo@1", repo_id, tag="v3")

    # pulling v3 where the folder bank is missing fetches the tree, then the files it names
    other = tmp_path / "other"
    _copy_store(published["home"], other)
    pulled = pull(ContentStore.open(other), f"{repo_id}@v3", as_name="demo3")
    assert set(pulled.downloaded) == new_banks and pulled.manifest == v3
    want = logits_of(store, "demo")
    got = logits_of(ContentStore.open(other), "demo3")
    assert all(torch.equal(want[n], got[n]) for n in ("spam", "topic", "intent"))


def test_pull_at_an_old_tag_gives_that_version_exactly(
    published: dict[str, Any], hub_env: HubServer, tmp_path: Path
) -> None:
    repo_id = published["repo_id"]
    _copy_store(published["home"], tmp_path / "store")
    store = ContentStore.open(tmp_path / "store")
    v1 = published["v1"]["manifest"]
    result = pull(store, f"{repo_id}@v1", as_name="old")
    assert (result.manifest, result.version, result.action) == (v1, 1, "created")
    assert store.resolve("old") == v1 and not result.downloaded  # every bank was already here

    # pulling v2 on top fast-forwards; pulling v1 again onto v2 is refused (it would go back)
    assert pull(store, repo_id, as_name="old").action == "fast-forward"
    assert store.resolve("old") == published["v2"]["manifest"]
    with pytest.raises(ConflictError, match="is ahead of"):
        pull(store, f"{repo_id}@v1", as_name="old")
    assert pull(store, f"{repo_id}@v2", as_name="old").action == "up-to-date"


# -- branches ---------------------------------------------------------------------------------------


def test_pull_some_branches_and_into_a_model_with_the_same_trunk(
    published: dict[str, Any], hub_env: HubServer, tmp_path: Path
) -> None:
    repo_id = published["repo_id"]
    home = tmp_path / "store"
    _copy_store(published["home"], home)
    store = ContentStore.open(home)

    only = pull(store, f"{repo_id}@v2", branches=["spam"], as_name="spam-only")
    m = store.get_manifest(store.resolve("spam-only"))
    assert (only.branches, m["version"], m["parent"], m["name"]) == (["spam"], 1, None, "spam-only")
    assert m["branches"]["spam"]["trunk"] == trunk_id(m)

    grown = pull(store, f"{repo_id}@v2", branches=["topic"], into="spam-only")
    assert grown.action == "added-branches" and grown.version == 2
    assert sorted(store.get_manifest(store.resolve("spam-only"))["branches"]) == ["spam", "topic"]
    want, got = logits_of(store, "demo"), logits_of(store, "spam-only")
    assert all(torch.equal(want[n], got[n]) for n in ("spam", "topic"))
    assert pull(store, f"{repo_id}@v2", branches=["topic"], into="spam-only").action == "up-to-date"

    with pytest.raises(BranchNotFoundError, match=r"has no branch 'nope' \(have: spam, topic\)"):
        pull(store, f"{repo_id}@v2", branches=["nope"], as_name="x")
    # demo v1 has the untrained trunk: branches trained on v2's trunk do not fit it
    rollback(store, "demo", "1")
    with pytest.raises(
        ConflictError, match=r"branch 'spam' of .* was trained on trunk .* but 'demo' has trunk"
    ):
        pull(store, f"{repo_id}@v2", branches=["spam"], into="demo")
    with pytest.raises(ConflictError, match="does not descend from it"):
        pull(store, f"{repo_id}@v2", as_name="spam-only")


# -- integrity ----------------------------------------------------------------------------------------


def test_pull_refuses_a_tampered_file_and_names_it(
    published: dict[str, Any], hub_env: HubServer, tmp_path: Path
) -> None:
    home = tmp_path / "store"
    _copy_store(published["home"], home)
    store = ContentStore.open(home)
    repo_id = f"{hub_env.user}/tamper-{uuid.uuid4().hex[:8]}"
    publish(store, "demo", repo_id)
    manifest = store.get_manifest(store.resolve("demo"))
    head = BankHash(manifest["branches"]["spam"]["head_bank"])
    config = BankHash(manifest["base"]["files"]["config.json"])

    # 1) the bytes of an LFS object rewritten on the server (its pointer still claims the name)
    lfs = hub_env.repo_dir(repo_id) / ".git" / "lfs" / "objects" / head.hex[:2] / head.hex[2:4] / head.hex
    data = bytearray(lfs.read_bytes())
    data[-1] ^= 0x01
    os.chmod(lfs, 0o644)
    lfs.write_bytes(bytes(data))
    store.object_path(head).unlink()  # so the pull must download it
    before = tree_state(home)
    with pytest.raises(IntegrityError, match=rf"file banks/{head.hex}\.safetensors does not match its name"):
        pull(store, f"{repo_id}@v2", as_name="copy")
    assert tree_state(home) == before and store.get_ref("copy") is None

    # 2) other bytes committed under a (regular, non-LFS) bank's name
    hub_env.api().create_commit(
        repo_id,
        [CommitOperationAdd(f"banks/{config.hex}", b'{"hidden_size": 1}\n')],
        commit_message="swap config",
    )
    store.object_path(config).unlink()
    before = tree_state(home)
    with pytest.raises(IntegrityError, match=rf"file banks/{config.hex} does not match its name"):
        pull(store, repo_id, branches=["topic"], as_name="copy")
    assert tree_state(home) == before and store.get_ref("copy") is None

    # publishing again notices the wrong bytes under that name (git blob id) and uploads the right ones
    for h in (config, head):
        store.put_file(ContentStore.open(published["home"]).object_path(h), expected=h)
    fixed = publish(store, "demo", repo_id, tag="v2-fixed")
    assert fixed.uploaded == [f"banks/{config.hex}"]
    assert pull(store, f"{repo_id}@v2-fixed", branches=["topic"], as_name="copy").action == "created"


@pytest.mark.slow
def test_sigkill_during_a_pull_leaves_the_store_unchanged_and_a_retry_completes(
    published: dict[str, Any], hub_server: HubServer, tmp_path: Path
) -> None:
    home = tmp_path / "store"
    _copy_store(published["home"], home)
    store = ContentStore.open(home)
    base = BankHash(store.get_manifest(store.resolve("demo"))["base"]["bank"])
    store.object_path(base).unlink()  # 90 MB to download: a wide window to kill it in
    before = tree_state(home)
    env = cli_env(hub_server, home, tmp_path)
    proc = subprocess.Popen(
        [str(SCALER), "pull", published["repo_id"], "--as", "again"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_mid_download = False
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            partial = [p for p in (home / "tmp").rglob("*.incomplete") if p.stat().st_size > 1_000_000]
            if partial:
                proc.send_signal(signal.SIGKILL)
                killed_mid_download = True
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not killed_mid_download:
            proc.kill()
        proc.wait(30)
    assert killed_mid_download, "the pull finished before it could be killed mid-download"
    assert proc.returncode == -signal.SIGKILL
    assert tree_state(home) == before
    assert store.get_ref("again") is None
    assert list((home / "tmp").glob(".tmp-pull-*"))  # the dead pull's downloads, for the retry

    result = scaler_json("pull", published["repo_id"], "--as", "again", env=env)
    assert result["action"] == "created" and result["manifest"] == published["v2"]["manifest"]
    assert all(c.ok for c in verify_version(store, store.resolve("again")))
    assert not list((home / "tmp").glob(".tmp-pull-*"))


# -- plumbing -------------------------------------------------------------------------------------------


def test_the_hub_is_a_built_in_store_backend() -> None:
    from scaler_wizard.cli.hub_commands import open_remote
    from scaler_wizard.plugin_manager import get_registry

    reg = get_registry().get("store", "hf")
    assert reg.plugin == "scaler_wizard.plugins.stores"
    repo = reg.factory("hf://me/demo@v3", endpoint="http://127.0.0.1:9", token="hf_secret")
    assert isinstance(repo, HubRepo)
    assert (repo.repo_id, repo.revision, repo.endpoint) == ("me/demo", "v3", "http://127.0.0.1:9")
    assert "hf_secret" not in repr(repo)
    assert isinstance(open_remote("me/demo"), HubRepo)
    with pytest.raises(ScalerError, match="unknown store backend 's3'"):
        open_remote("s3://bucket/models")
    with pytest.raises(ScalerError, match="invalid Hub repo id"):
        HubRepo("../etc/passwd")


def test_errors_are_one_line_and_never_show_the_token(
    published: dict[str, Any], hub_env: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = cli_env(hub_env, tmp_path / "cli-store", tmp_path)
    r = run_scaler("pull", f"{hub_env.user}/no-such-repo", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "no repo hubtest/no-such-repo" in r.stderr and hub_env.token not in r.stderr

    store = ContentStore.open(tmp_path / "store", create=True)
    with pytest.raises(ScalerError, match=r"has no revision 'v9'"):
        pull(store, f"{published['repo_id']}@v9")
    with pytest.raises(ScalerError, match=r"HTTP 401.*check the token") as bad_token:
        publish(
            ContentStore.open(published["home"]),
            "demo",
            f"{hub_env.user}/x-{uuid.uuid4().hex[:6]}",
            token="hf_wrong",
        )
    assert "hf_wrong" not in str(bad_token.value)
    _copy_store(published["home"], tmp_path / "partial")
    partial = ContentStore.open(tmp_path / "partial")
    head = partial.get_manifest(partial.resolve("demo"))["branches"]["topic"]["head_bank"]
    partial.object_path(head).unlink()
    with pytest.raises(
        ScalerError, match=r"cannot publish demo v2: branches.topic.head_bank: bank .* is missing"
    ):
        publish(partial, "demo", f"{hub_env.user}/never-created")
    assert not hub_env.repo_dir(f"{hub_env.user}/never-created").exists()

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ScalerError, match="HF_HUB_OFFLINE is set"):
        pull(store, published["repo_id"])
