"""Cold ``scaler predict`` vs loading the base alone (issue 16 item 5; goal: ratio <= 1.2).

A user's first command after a shell opens is ``scaler predict MODEL "some text"``: a new
process that imports, composes the stored model (base + trunk + branches, every bank hashed
or found in the verification cache) and runs one forward. The reference is what the same user
would run without scaler: a new ``python -c`` that imports transformers, loads the packaged
base (``AutoModel`` + ``AutoTokenizer``) and runs the first forward on the same text.

Cases, each a fresh process, interleaved in rotating order (median of ``--runs``):

* ``scaler predict``: the console script, ``scaler predict bench TEXT -b spam --json`` (a model
  of two ``attn-mix`` branches on the default trunk);
* ``scaler (split)``: the same steps in a ``python -c`` child that stamps the time after the
  imports, after ``compose`` and after the first forward (interpreter start is in "import");
* ``base alone``: the reference, split the same way.

Prints a table, writes ``bench/results/cold_predict.json``.

    python bench/bench_cold_predict.py            # 9 runs of each case, ~1 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import base_model_path, bench_env, cpu_model, load_sentences, loadavg

REPO = Path(__file__).resolve().parent.parent
SCALER = str(Path(sys.executable).parent / "scaler")
GOAL = 1.2

# stdout: one JSON line of phase times (seconds since the interpreter started)
SPLIT_OURS = """
import json, sys, time
t0 = time.perf_counter() - (time.time() - {started})
import torch
from scaler_wizard.banks import ContentStore
from scaler_wizard.modeling.compose import compose
t1 = time.perf_counter()
model = compose(ContentStore.open({store!r}), "bench")
t2 = time.perf_counter()
model.predict([{text!r}], ["spam"])
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "first_forward": t3 - t2}}))
"""

SPLIT_BASE = """
import json, sys, time
t0 = time.perf_counter() - (time.time() - {started})
import torch
from transformers import AutoModel, AutoTokenizer
t1 = time.perf_counter()
model = AutoModel.from_pretrained({base!r})
tokenizer = AutoTokenizer.from_pretrained({base!r})
t2 = time.perf_counter()
batch = tokenizer([{text!r}], padding=True, truncation=True, max_length=256, return_tensors="pt")
with torch.inference_mode():
    model(**batch).last_hidden_state
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "first_forward": t3 - t2}}))
"""


def make_store(root: Path) -> None:
    """Model ``bench``: the default trunk and two untrained ``attn-mix`` branches (start-up
    reads the same banks whatever their values)."""
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    store = ContentStore.open(root, create=True)
    init_model(store, "bench")
    model = compose(store, "bench")
    hidden = int(model.origin.base_entry["hidden_size"])
    for name, labels in (("spam", ["ham", "spam"]), ("topic", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])):
        model.add_branch(name, new_branch(hidden_size=hidden, labels=labels, strategy="attn-mix"))
    save_version(store, model, message="start-up benchmark")
    compose(store, "bench").predict(["warm the verification cache"], ["spam", "topic"])


def run_case(cmd: list[str], env: dict[str, str], *, split: bool) -> dict[str, float]:
    start = time.time()
    cmd = [c.replace("{started}", repr(start)) for c in cmd]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=300)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr[-800:]}")
    out = {"wall": wall}
    if split:
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cold_predict.json")
    args = ap.parse_args()
    text = load_sentences(1)[0]
    with tempfile.TemporaryDirectory(prefix="bench-cold-predict-") as tmp:
        root = Path(tmp) / "store"
        env = bench_env(args.threads)
        env["SCALER_HOME"] = str(root)
        make_store(root)
        fmt = {"store": str(root), "text": text, "base": str(base_model_path()), "started": "{started}"}
        cases: dict[str, tuple[list[str], bool]] = {
            "scaler predict": ([SCALER, "predict", "bench", text, "-b", "spam", "--json"], False),
            "scaler (split)": ([sys.executable, "-c", SPLIT_OURS.format(**fmt)], True),
            "base alone": ([sys.executable, "-c", SPLIT_BASE.format(**fmt)], True),
        }
        load_before = loadavg()
        samples: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
        names = list(cases)
        for name in names:  # one untimed run of each: page cache warm, like a second command
            run_case(*cases[name][:1], env, split=cases[name][1])
        for r in range(args.runs):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                cmd, split = cases[name]
                samples[name].append(run_case(cmd, env, split=split))
    med = {k: {f: statistics.median(s[f] for s in v) for f in v[0]} for k, v in samples.items()}
    ratio = med["scaler predict"]["wall"] / med["base alone"]["wall"]
    print(f"{'case':16} {'wall s':>7} {'import':>7} {'load':>7} {'forward':>8}")
    for k, m in med.items():
        parts = "".join(f" {m[f]:7.3f}" for f in ("import", "load", "first_forward") if f in m)
        print(f"{k:16} {m['wall']:7.3f}{parts}")
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    print(f"scaler predict / base alone: {ratio:.3f} (goal <= {GOAL}): {verdict}")
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "python": platform.python_version(), "threads": args.threads},
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "runs": args.runs,
        "text": text,
        "median_seconds": med,
        "ratio_predict_vs_base": ratio,
        "goal": f"<= {GOAL}",
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
