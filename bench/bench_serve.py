"""Benchmark: ``scaler serve`` under load vs offline ``predict`` on the same texts (issue 15).

Builds a temporary store with model ``bench`` (4 branches), starts the real server on
127.0.0.1 (a free port) and, in this process, sends single-text requests to mixed branches
from 1, 4 and 16 concurrent clients (bounded: ``--requests`` per level and ``--max-seconds``
per level). Reference: the same texts and branches in-process through ``predict_rows`` with
``batch_size=--max-batch`` (offline batch prediction, one trunk pass per batch).

Reports per level: throughput (texts/s), p50 and p99 latency, failures, and the ratio
throughput / offline (goal at 16 clients: >= 0.8). Writes bench/results/serve.json.

    python bench/bench_serve.py                  # 256 requests per level
    python bench/bench_serve.py --requests 64    # quick
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from common import REPO, bench_env, load_sentences

BRANCHES = {
    "spam": ["ham", "spam"],
    "topic": ["a", "b", "c", "d"],
    "mood": ["neg", "pos"],
    "lang": ["en", "other"],
}
GOAL = 0.8


def _build_store(root: Path) -> None:
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    store = ContentStore.open(root, create=True)
    init_model(store, "bench")
    model = compose(store, "bench")
    for name, labels in BRANCHES.items():
        model.add_branch(name, new_branch(hidden_size=model.base.hidden_size, labels=labels))
    save_version(store, model, message="serve benchmark branches")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _offline(root: Path, texts: list[str], rows: list[str], batch: int) -> tuple[float, float]:
    """Texts per second of in-process batch prediction, best of three runs each: (as
    ``predict_rows`` and ``scaler predict --data`` run it, texts in batches of neighbours in
    length; the same batches of ``batch`` texts in their given order, as texts arrive at a
    server). One trunk pass per batch."""
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose

    model = compose(ContentStore.open(root), "bench")

    def sorted_batches() -> None:
        model.predict_rows(texts, rows, batch_size=batch)  # sorts by length inside

    def given_batches() -> None:
        for i in range(0, len(texts), batch):  # one call per batch: no sorting across batches
            model.predict_rows(texts[i : i + batch], rows[i : i + batch], batch_size=batch)

    model.predict_rows(texts[:batch], rows[:batch], batch_size=batch)
    rates = []
    for run in (sorted_batches, given_batches):
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            run()
            best = max(best, len(texts) / (time.perf_counter() - start))
        rates.append(best)
    return rates[0], rates[1]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(
    url: str, texts: list[str], rows: list[str], clients: int, max_seconds: float, server_pid: int = 0
) -> dict[str, Any]:
    deadline = time.monotonic() + max_seconds
    latencies: list[float] = []
    failures: list[str] = []
    # one keep-alive connection per client thread, as a real load generator (wrk, locust) keeps,
    # on the stdlib client: the generator shares the 2 CPUs with the server, so it must be light
    # (a fresh ``httpx.post`` per request builds a TLS context each time and costs more CPU than
    # the server's own work); its CPU share is reported next to the server's
    host, port = url.removeprefix("http://").split(":")
    local = threading.local()

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            return
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"texts": [texts[i]], "branch": rows[i]})
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            payload = r.read()
            if r.status != 200:
                failures.append(f"{r.status} {payload[:80]!r}")
                return
        except (OSError, http.client.HTTPException) as exc:
            local.conn = None
            failures.append(type(exc).__name__)
            return
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    cpu0, srv0 = _cpu_s(os.getpid()), _cpu_s(server_pid)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(texts))))
    wall = time.perf_counter() - start
    client_cpu, server_cpu = _cpu_s(os.getpid()) - cpu0, _cpu_s(server_pid) - srv0
    lat = sorted(latencies)
    return {
        "clients": clients,
        "done": len(lat),
        "failed": len(failures),
        "failures": failures[:5],
        "texts_per_s": len(lat) / wall if wall > 0 else 0.0,
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "wall_s": wall,
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=256, help="single-text requests per client level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time bound per client level")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = parser.parse_args()

    env = bench_env(args.threads)
    texts = load_sentences(args.requests)
    names = list(BRANCHES)
    rows = [names[i % len(names)] for i in range(len(texts))]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp) / "store"
        _build_store(root)
        env["SCALER_HOME"] = str(root)
        offline, offline_unsorted = _offline(root, texts, rows, args.max_batch)
        port = _free_port()
        scaler = Path(sys.executable).parent / "scaler"
        cmd = [str(scaler), "serve", "bench", "--port", str(port), "--max-batch", str(args.max_batch)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        levels = []
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start within 120 s")
                time.sleep(0.2)
            _load(url, texts[:8], rows[:8], 4, 30)  # warm-up
            for clients in (1, 4, 16):
                levels.append(_load(url, texts, rows, clients, args.max_seconds, proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        # measured again after the server: this VM's speed drifts, the faster reading counts
        after = _offline(root, texts, rows, args.max_batch)
        offline, offline_unsorted = max(offline, after[0]), max(offline_unsorted, after[1])
    print(
        f"offline batch predict (batch {args.max_batch}): {offline:.1f} texts/s length-sorted"
        f" (scaler predict --data), {offline_unsorted:.1f} texts/s in the given order"
    )
    print(
        f"{'clients':>7} {'done':>5} {'failed':>6} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}"
        f" {'client CPU':>10} {'server CPU':>10}"
    )
    for lv in levels:
        ratio = lv["texts_per_s"] / offline
        lv["ratio_vs_offline"] = ratio
        lv["ratio_vs_offline_unsorted"] = lv["texts_per_s"] / offline_unsorted
        p50 = f"{lv['p50_ms']:.1f}" if lv["p50_ms"] is not None else "-"
        p99 = f"{lv['p99_ms']:.1f}" if lv["p99_ms"] is not None else "-"
        print(
            f"{lv['clients']:>7} {lv['done']:>5} {lv['failed']:>6} {lv['texts_per_s']:>8.1f} {p50:>8} {p99:>8}"
            f" {ratio:>6.2f} {lv['client_cpu_s'] / lv['wall_s']:>9.2f}c {lv['server_cpu_s'] / lv['wall_s']:>9.2f}c"
        )
    at16 = levels[-1]["ratio_vs_offline"]
    print(f"16 clients / offline: {at16:.2f} (goal >= {GOAL}): {'PASS' if at16 >= GOAL else 'FAIL'}")
    print(f"16 clients / offline in the given order: {levels[-1]['ratio_vs_offline_unsorted']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "serve",
        "offline_texts_per_s": offline,
        "offline_unsorted_texts_per_s": offline_unsorted,
        "levels": levels,
        "goal": GOAL,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(lv["failed"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
