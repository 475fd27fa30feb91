"""``scaler serve``: the real server as a subprocess on 127.0.0.1, driven by httpx."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import SCALER, _copy_store, run_scaler

pytestmark = pytest.mark.slow

TEXTS = ["win a free cruise now", "what is the capital of france", "meeting moved to 3pm"]
TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, env: dict[str, str]) -> None:
        self.proc = proc
        self.url = url
        self.env = env


def _start(env: dict[str, str], *args: str) -> Iterator[Server]:
    port = _free_port()
    proc = subprocess.Popen(
        [str(SCALER), "serve", "demo", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not answer /healthz within 60 s")
            time.sleep(0.2)
        yield Server(proc, url, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def module_env(session_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    dst = tmp_path_factory.mktemp("serve") / "store"
    _copy_store(session_store, dst)
    env = dict(os.environ)
    env["SCALER_HOME"] = str(dst)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("SCALER_DEBUG", None)
    env.pop("SCALER_SERVE_TOKEN", None)
    return env


@pytest.fixture(scope="module")
def server(module_env: dict[str, str]) -> Iterator[Server]:
    yield from _start(
        module_env, "--max-wait-ms", "200", "--max-texts-per-request", "8", "--max-text-chars", "100"
    )


@pytest.fixture(scope="module")
def tight_server(module_env: dict[str, str]) -> Iterator[Server]:
    env = dict(module_env, SCALER_SERVE_TOKEN=TOKEN)
    yield from _start(env, "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0")


def _one_line_error(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}
    assert "\n" not in body["error"] and "internal error" not in body["error"].lower()
    assert "Traceback" not in response.text
    return str(body["error"])


def test_predictions_equal_scaler_predict(server: Server) -> None:
    r = httpx.post(
        f"{server.url}/v1/predict", json={"texts": TEXTS, "branches": ["spam", "topic"]}, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "demo"
    assert body["version"].startswith("sha256:")
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["version"] == body["version"]
    cli = run_scaler("predict", "demo", *TEXTS, "-b", "spam", "-b", "topic", "--json", env=server.env)
    assert cli.returncode == 0, cli.stderr
    assert body["results"] == json.loads(cli.stdout)


def test_row_branches_and_branch_list(server: Server) -> None:
    r = httpx.post(
        f"{server.url}/v1/predict",
        json={"texts": TEXTS, "row_branches": ["spam", "topic", "spam"]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert [list(x["predictions"]) for x in r.json()["results"]] == [["spam"], ["topic"], ["spam"]]
    assert r.json()["results"][1]["predictions"]["topic"]["label"] in {
        "ABBR",
        "DESC",
        "ENTY",
        "HUM",
        "LOC",
        "NUM",
    }
    b = httpx.get(f"{server.url}/v1/branches").json()
    assert [x["name"] for x in b["branches"]] == ["spam", "topic"]
    assert b["branches"][0]["labels"] == ["ham", "spam"]


def test_concurrent_requests_are_merged(server: Server) -> None:
    def one(i: int) -> int:
        branch = "spam" if i % 2 else "topic"
        return httpx.post(
            f"{server.url}/v1/predict", json={"texts": [TEXTS[i % 3]], "branch": branch}, timeout=60
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(16))) == [200] * 16
    metrics = httpx.get(f"{server.url}/metrics").text
    buckets = dict(re.findall(r'scaler_batch_size_bucket\{le="([^"]+)"\} (\d+)', metrics))
    count = int(re.search(r"scaler_batch_size_count (\d+)", metrics).group(1))  # type: ignore[union-attr]
    assert int(buckets["1"]) < count, metrics  # some batch held more than one text
    assert 'scaler_branch_rows_total{branch="spam"}' in metrics
    assert "scaler_queue_depth" in metrics and "scaler_request_latency_seconds_bucket" in metrics


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"texts": ["a"], "branch": "nope"}', 404, "no branch named 'nope'"),
        (b'{"texts": [], "branch": "spam"}', 422, "empty"),
        (json.dumps({"texts": ["x" * 101], "branch": "spam"}).encode(), 413, "limit is 100"),
        (json.dumps({"texts": ["x"] * 9, "branch": "spam"}).encode(), 413, "limit is 8"),
        (b'{"texts": "abc", "branch": "spam"}', 422, "list of strings"),
        (b'{"texts": ["a", "b"], "row_branches": ["spam"]}', 422, "1 entries for 2 texts"),
        (b'{"texts": ["a"]}', 400, "name a branch"),
    ],
)
def test_bad_requests_get_one_line_4xx(server: Server, payload: bytes, status: int, fragment: str) -> None:
    r = httpx.post(f"{server.url}/v1/predict", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment in _one_line_error(r)


def test_token_is_required(tight_server: Server) -> None:
    url = f"{tight_server.url}/v1/predict"
    payload = {"texts": ["hello"], "branch": "spam"}
    assert httpx.post(url, json=payload).status_code == 401
    wrong = httpx.post(url, json=payload, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    assert "token" in _one_line_error(wrong)
    assert httpx.post(url, json=payload, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_overload_gets_429_not_a_hang(tight_server: Server) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    payload = {"texts": [TEXTS[1] * 5] * 200, "branch": "topic"}

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{tight_server.url}/v1/predict", json=payload, headers=headers, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert 429 in codes and 200 in codes, codes
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    assert "busy" in _one_line_error(busy)


def test_watch_switches_versions_under_load_with_no_failed_request(scaler_env: dict[str, str]) -> None:
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, new_branch, save_version

    env = dict(scaler_env)
    env.pop("SCALER_SERVE_TOKEN", None)
    running = _start(env, "--watch", "--watch-interval", "0.2", "--max-wait-ms", "2")
    server = next(running)
    try:
        first = httpx.get(f"{server.url}/healthz").json()["version"]
        stop = threading.Event()
        seen: list[tuple[int, str]] = []

        def load() -> None:
            while not stop.is_set():
                r = httpx.post(
                    f"{server.url}/v1/predict", json={"texts": TEXTS, "branch": "spam"}, timeout=60
                )
                seen.append((r.status_code, r.json().get("version", r.text)))

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load) for _ in range(4)]
            try:
                store = ContentStore.open(env["SCALER_HOME"])
                model = compose(store, "demo")
                model.add_branch("extra", new_branch(hidden_size=384, labels=["x", "y"]))
                save_version(store, model, message="add extra")
                deadline = time.monotonic() + 60
                while httpx.get(f"{server.url}/healthz").json()["version"] == first:
                    assert time.monotonic() < deadline, "the server did not switch within 60 s"
                    time.sleep(0.1)
                after = len(seen)
                while len(seen) < after + 4 and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                stop.set()
                for f in futures:
                    f.result()
        second = httpx.get(f"{server.url}/healthz").json()["version"]
        assert second != first
        assert {code for code, _ in seen} == {200}, seen
        assert {v for _, v in seen} == {first, second}
        names = [b["name"] for b in httpx.get(f"{server.url}/v1/branches").json()["branches"]]
        assert sorted(names) == ["extra", "spam", "topic"]
    finally:
        running.close()  # stops the server


def test_watch_refuses_a_pinned_version(scaler_env: dict[str, str]) -> None:
    r = run_scaler("serve", "demo@1", "--watch", env=scaler_env)
    assert r.returncode != 0
    assert "--watch follows a model's ref" in r.stderr
    assert "Traceback" not in r.stderr


def test_slow_answer_gets_503(scaler_env: dict[str, str]) -> None:
    running = _start(scaler_env, "--request-timeout", "0.1")
    server = next(running)
    try:
        payload = {"texts": [TEXTS[1] * 20] * 200, "branches": ["spam", "topic"]}
        r = httpx.post(f"{server.url}/v1/predict", json=payload, timeout=60)
        assert r.status_code == 503, r.text
        assert "took over 0.1 s" in _one_line_error(r)
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    finally:
        running.close()


@pytest.mark.parametrize(
    "lengths",
    [[], [5], [40] * 16, [3, 300, 4, 290, 5, 310, 6, 280], list(range(1, 200, 7)), [10, 10, 500]],
)
def test_length_groups_cover_every_row_once_in_length_order(lengths: list[int]) -> None:
    from scaler_wizard.serving.batching import PASS_COST_CHARS, length_groups

    groups = length_groups(lengths)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # passes of similar length, in order

    def cost(gs: list[list[int]]) -> int:
        return sum(PASS_COST_CHARS + len(g) * max(lengths[i] for i in g) for g in gs)

    if lengths:
        assert cost(groups) <= cost([list(range(len(lengths)))])  # never worse than one pass
    if len(set(lengths)) == 1:
        assert len(groups) == 1
    if lengths == [3, 300, 4, 290, 5, 310, 6, 280]:
        assert [sorted(g) for g in groups] == [[0, 2, 4, 6], [1, 3, 5, 7]]  # short and long apart
