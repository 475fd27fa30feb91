"""Benchmark 3: cold start, new process -> first logits.

Ours: ``python -c`` that opens a store, ``compose``s a stored model with 100 branches and
computes the logits of all 100 branches for a small batch (so every branch bank is
loaded and checked against the verification cache on the way).

Reference: ``python -c`` that loads the base alone with transformers
(``AutoModel`` + ``AutoTokenizer`` from the base package's folder) and runs the first
forward on the same batch. Both start from nothing but a warm page cache; the wall time
of each whole subprocess is measured (interpreter start included). Goal: ours/base <= 1.3.

The 100-branch model is prepared once (``new_branch`` x 100 + one ``save_version``) and
the verification cache is warmed once before timing by composing it and running all
branches in this process (the common case: banks were verified when written or pulled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    BenchResult,
    Row,
    base_model_path,
    bench_env,
    cpu_ratio,
    load_sentences,
    loadavg,
    measure_interleaved,
)

NAME = "cold"
N_BRANCHES = 100
N_TEXTS = 8
GOAL = "<= 1.3"

# Each child prints one JSON line of phase timestamps (seconds since its own start of main code).
OURS_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
from scaler_wizard.banks import ContentStore
from scaler_wizard.modeling.compose import compose
t1 = time.perf_counter()
texts = json.load(open({texts!r}))
model = compose(ContentStore.open({store!r}), "bench")
t2 = time.perf_counter()
batch = model.base.tokenize(texts)
with torch.inference_mode():
    logits = model(**batch).logits
t3 = time.perf_counter()
assert len(logits) == {n_branches}, len(logits)
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "first_forward": t3 - t2}}))
"""

BASE_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
from transformers import AutoModel, AutoTokenizer
t1 = time.perf_counter()
texts = json.load(open({texts!r}))
model = AutoModel.from_pretrained({base!r})
tokenizer = AutoTokenizer.from_pretrained({base!r})
t2 = time.perf_counter()
batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
with torch.inference_mode():
    hidden = model(**batch).last_hidden_state
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "first_forward": t3 - t2}}))
"""


def prepare_store(root: Path, texts: list[str]) -> dict[str, Any]:
    """The 100-branch model, saved once; then one in-process compose + forward warms the cache."""
    import torch

    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    t0 = time.perf_counter()
    store = ContentStore.open(root, create=True)
    init_model(store, "bench")
    model = compose(store, "bench")
    hidden = int(model.origin.base_entry["hidden_size"])
    for i in range(N_BRANCHES):
        model.add_branch(
            f"task{i:03d}", new_branch(hidden_size=hidden, labels=[f"c{j}" for j in range(2 + i % 4)])
        )
    save_version(store, model, message=f"{N_BRANCHES} benchmark branches")
    t1 = time.perf_counter()
    warm = compose(store, "bench")  # verifies every bank it reads, filling the cache
    with torch.inference_mode():
        logits = warm(**warm.base.tokenize(texts)).logits
    assert len(logits) == N_BRANCHES
    cache = root / "cache" / "verified.json"
    objects = sum(1 for p in (root / "objects").rglob("*") if p.is_file())
    return {
        "prepare_seconds": t1 - t0,
        "warm_seconds": time.perf_counter() - t1,
        "objects": objects,
        "verification_cache_entries": len(json.loads(cache.read_text())) if cache.is_file() else 0,
        "store_mb": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6,
    }


def run_script(script: str, env: dict[str, str], phases: list[dict[str, float]]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False, timeout=300
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    phases.append(json.loads(proc.stdout.strip().splitlines()[-1]))


def run(*, quick: bool, threads: int) -> BenchResult:
    warmup, repeats = (1, 3) if quick else (1, 7)
    texts = load_sentences(N_TEXTS)
    env = bench_env(threads)
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        root = Path(tmp) / "store"
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts))
        prep = prepare_store(root, texts)
        fmt = {"threads": threads, "texts": str(texts_file), "n_branches": N_BRANCHES}
        ours_script = OURS_SCRIPT.format(store=str(root), **fmt)
        base_script = BASE_SCRIPT.format(base=str(base_model_path()), **fmt)
        phases: dict[str, list[dict[str, float]]] = {"ours": [], "base": []}
        load_before = loadavg()
        res = measure_interleaved(
            {
                "ours": lambda: run_script(ours_script, env, phases["ours"]),
                "base": lambda: run_script(base_script, env, phases["base"]),
            },
            warmup=warmup,
            repeats=repeats,
        )
    t_ours, t_base = res["ours"].median, res["base"].median

    def median_phases(items: list[dict[str, float]]) -> dict[str, float]:
        timed = items[warmup:]  # drop the warm-up run's phases
        return {k: sorted(p[k] for p in timed)[len(timed) // 2] for k in timed[0]}

    return BenchResult(
        name=NAME,
        title="cold start: new process -> first logits, 100-branch model vs the base alone",
        rows=[
            Row(
                name="cold.100branches",
                ours=t_ours,
                reference=t_base,
                unit="s",
                ratio=t_ours / t_base,
                ratio_definition="t(new process -> logits of 100 branches) / t(new process -> base forward)",
                goal=GOAL,
                cpu_ratio=cpu_ratio(res["ours"], res["base"]),
                ours_label="compose + 100 branches, first logits",
                reference_label="transformers base alone, first forward",
            )
        ],
        measurements=dict(res),
        details={
            "branches": N_BRANCHES,
            "texts": N_TEXTS,
            "store": prep,
            "verification_cache": "warmed once before timing (in-process compose + forward of all branches)",
            "page_cache": "warm (one untimed warm-up run of each before timing)",
            "phases_median_seconds": {k: median_phases(v) for k, v in phases.items()},
            "pythondontwritebytecode": os.environ.get("PYTHONDONTWRITEBYTECODE"),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        notes=[
            f"torch threads = {threads} in both children; whole-subprocess wall time, median of {repeats}",
            "verification cache warmed once before timing",
        ],
    )
