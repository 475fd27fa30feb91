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
import json
import socket
import statistics
import subprocess
import sys
import tempfile
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


def _offline(root: Path, texts: list[str], rows: list[str], batch: int) -> float:
    """Texts per second of in-process predict_rows (after one warm-up batch)."""
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose

    model = compose(ContentStore.open(root), "bench")
    model.predict_rows(texts[:batch], rows[:batch], batch_size=batch)
    start = time.perf_counter()
    model.predict_rows(texts, rows, batch_size=batch)
    return len(texts) / (time.perf_counter() - start)


def _load(url: str, texts: list[str], rows: list[str], clients: int, max_seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + max_seconds
    latencies: list[float] = []
    failures: list[str] = []

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            return
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{url}/v1/predict", json={"texts": [texts[i]], "branch": rows[i]}, timeout=60)
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:80]}")
                return
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)
            return
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(texts))))
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "clients": clients,
        "done": len(lat),
        "failed": len(failures),
        "failures": failures[:5],
        "texts_per_s": len(lat) / wall if wall > 0 else 0.0,
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
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
        offline = _offline(root, texts, rows, args.max_batch)
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
                levels.append(_load(url, texts, rows, clients, args.max_seconds))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"offline predict_rows (batch {args.max_batch}): {offline:.1f} texts/s")
    print(f"{'clients':>7} {'done':>5} {'failed':>6} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}")
    for lv in levels:
        ratio = lv["texts_per_s"] / offline
        lv["ratio_vs_offline"] = ratio
        p50 = f"{lv['p50_ms']:.1f}" if lv["p50_ms"] is not None else "-"
        p99 = f"{lv['p99_ms']:.1f}" if lv["p99_ms"] is not None else "-"
        print(
            f"{lv['clients']:>7} {lv['done']:>5} {lv['failed']:>6} {lv['texts_per_s']:>8.1f} {p50:>8} {p99:>8} {ratio:>6.2f}"
        )
    at16 = levels[-1]["ratio_vs_offline"]
    print(f"16 clients / offline: {at16:.2f} (goal >= {GOAL}): {'PASS' if at16 >= GOAL else 'FAIL'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "serve",
        "offline_texts_per_s": offline,
        "levels": levels,
        "goal": GOAL,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(lv["failed"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
