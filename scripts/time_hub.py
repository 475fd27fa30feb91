"""Time `scaler publish` / `scaler pull` of the demo model against the test Hub on 127.0.0.1.

    .venv/bin/python scripts/time_hub.py [--repeats 3] [--out hub-times.json]

Starts the test Hub (tests/hubserver: olah 0.5.4 for reads + write_server.py for writes),
builds the demo model (all-MiniLM-L6-v2 base, 2 MoE layers x 8 experts, branches spam and
topic), and times each step as a real `scaler` subprocess (interpreter start included) plus
the time spent inside publish/pull as they report it. The reference is the plain client:
`huggingface_hub.snapshot_download` of the same revision into an empty folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# read by huggingface_hub at import time: set before anything imports it
os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", SCALER_PLUGINS="")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
SCALER = Path(sys.executable).parent / "scaler"


def build_demo(root: Path) -> None:
    import torch

    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    store = ContentStore.open(root, create=True)
    torch.manual_seed(0)
    init_model(store, "demo", seed=0)
    model = compose(store, "demo")
    for name, labels in (("spam", ["ham", "spam"]), ("topic", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])):
        branch = new_branch(hidden_size=384, labels=labels)
        with torch.no_grad():
            for p in branch.parameters():
                if p.dim() > 0 and torch.count_nonzero(p) == 0:
                    p.normal_(std=0.02)
        model.add_branch(name, branch)
    save_version(store, model, message="add spam and topic")


def run(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(SCALER), *args, "--json"], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"scaler {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args()
    from hubserver.fixtures import start_hub_server

    rows: dict[str, list[tuple[float, float]]] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="time-hub-") as tmp_name:
        tmp = Path(tmp_name)
        build_demo(tmp / "demo-store")
        with start_hub_server(tmp / "hub") as hub:
            base_env = {
                **os.environ,
                **hub.env,
                "HF_HOME": str(tmp / "hf"),
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            }
            for i in range(opts.repeats):
                repo = f"{hub.user}/demo-{uuid.uuid4().hex[:8]}"
                env = {**base_env, "SCALER_HOME": str(tmp / "demo-store")}
                for label, args in (
                    ("publish v1 (new repo, everything uploaded)", ["publish", "demo@1", repo]),
                    ("publish v2 (only changed banks uploaded)", ["publish", "demo", repo]),
                    ("publish v2 again (no-op)", ["publish", "demo", repo]),
                ):
                    wall, res = run(args, env)
                    rows.setdefault(label, []).append((wall, res["seconds"]))
                    sizes[label] = res["uploaded_bytes"]
                empty = {**base_env, "SCALER_HOME": str(tmp / f"empty-{i}")}
                wall, res = run(["pull", f"{repo}@v2"], empty)
                label = "pull v2 into an empty store"
                rows.setdefault(label, []).append((wall, res["seconds"]))
                sizes[label] = res["downloaded_bytes"]
                wall, res = run(["pull", f"{repo}@v2", "--branches", "spam", "--as", "spam-only"], empty)
                label = "pull --branches spam (base and trunk already here)"
                rows.setdefault(label, []).append((wall, res["seconds"]))
                sizes[label] = res["downloaded_bytes"]

                from huggingface_hub import snapshot_download

                t0 = time.perf_counter()
                snapshot_download(
                    repo, revision="v2", local_dir=tmp / f"plain-{i}", endpoint=hub.endpoint, token=hub.token
                )
                label = "reference: plain snapshot_download of v2"
                took = time.perf_counter() - t0
                rows.setdefault(label, []).append((took, took))
                sizes[label] = sum(p.stat().st_size for p in (tmp / f"plain-{i}").rglob("*") if p.is_file())
                shutil.rmtree(tmp / f"plain-{i}", ignore_errors=True)

    print(f"{'step':55} {'wall (s)':>9} {'in scaler (s)':>14} {'MB moved':>9}")
    report = []
    for label, samples in rows.items():
        wall = statistics.median(w for w, _ in samples)
        inner = statistics.median(s for _, s in samples)
        print(f"{label:55} {wall:9.1f} {inner:14.1f} {sizes[label] / 1e6:9.1f}")
        report.append(
            {
                "step": label,
                "wall_s": [w for w, _ in samples],
                "inner_s": [s for _, s in samples],
                "bytes": sizes[label],
            }
        )
    print(f"(median of {opts.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    if opts.out:
        opts.out.write_text(
            json.dumps({"repeats": opts.repeats, "loadavg": os.getloadavg(), "rows": report}, indent=2)
        )


if __name__ == "__main__":
    main()
