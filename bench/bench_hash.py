"""Benchmark 4: bank hash verification throughput vs ``sha256sum``.

Ours: ``ContentStore.verified_path(h, trust_cache=False)`` (what ``scaler verify`` and a
first read do: stat, stream the file through sha256, compare, update the verification
cache) and the bare ``scaler_wizard.banks.sha256_file``.

Reference: GNU coreutils ``sha256sum`` on the same file, run as a subprocess (its process
start is a few ms, negligible next to hashing 90-500 MB). The page cache is warm for both
(untimed warm-up runs first), so this compares hashing + read-syscall cost, not the disk.
Goal: throughput(ours) / throughput(sha256sum) >= 0.9 (= t(sha256sum) / t(ours)).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from common import BenchResult, Measurement, Row, base_model_path, cpu_ratio, loadavg, measure_interleaved

NAME = "hash"
GOAL = ">= 0.9"
BIG_MB = 500


def make_big_bank(store: Any, size_mb: int) -> str:
    """A ~size_mb safetensors bank of random float32 tensors, written into the store."""
    import torch

    from scaler_wizard.modeling.tensor_banks import encode_bank

    gen = torch.Generator().manual_seed(0)
    per = 16 * 1024 * 1024  # 64 MB tensors
    n_floats = size_mb * 1024 * 1024 // 4
    tensors = {
        f"t{i:02d}": torch.rand(min(per, n_floats - i * per), generator=gen)
        for i in range(-(-n_floats // per))
    }
    bank = encode_bank(tensors, kind="trunk-layer", metadata={"purpose": "benchmark"})
    del tensors
    return str(store.put_bytes(bank.data))


def make_small_banks(store: Any, count: int) -> list[str]:
    """``count`` branch-sized banks (a LoRA A/B or a head: ~16 KB each), as a 100-branch model has.

    Written straight to their object paths (a fixture: going through ``put_bytes`` would
    itself take seconds, see the README).
    """
    import torch

    from scaler_wizard.modeling.tensor_banks import encode_bank

    gen = torch.Generator().manual_seed(1)
    names = []
    for i in range(count):
        tensors = {
            "lora_A.weight": torch.randn(8, 384, generator=gen),
            "lora_B.weight": torch.randn(384, 8, generator=gen),
        }
        if i % 2:
            tensors = {
                "linear.weight": torch.randn(4, 384, generator=gen),
                "linear.bias": torch.randn(4, generator=gen),
            }
        bank = encode_bank(tensors, kind="adapter" if i % 2 == 0 else "head")
        path = store.object_path(bank.hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bank.data)
        names.append(str(bank.hash))
    return names


def sha256sum(*paths: Path) -> str:
    out = subprocess.run(["sha256sum", *map(str, paths)], capture_output=True, text=True, check=True)
    return "sha256:" + out.stdout.split()[0]


def openssl_sha256(path: Path) -> str:
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-r", str(path)], capture_output=True, text=True, check=True
    )
    return "sha256:" + out.stdout.split()[0]


def run(*, quick: bool, threads: int) -> BenchResult:
    from scaler_wizard.banks import ContentStore, sha256_file

    if shutil.which("sha256sum") is None:
        raise RuntimeError("sha256sum (GNU coreutils) is not on PATH")
    warmup, repeats = (1, 3) if quick else (2, 7)
    size_mb = 200 if quick else BIG_MB
    n_small = 50 if quick else 200
    has_openssl = shutil.which("openssl") is not None
    rows: list[Row] = []
    measurements: dict[str, Measurement] = {}
    details: dict[str, Any] = {"loadavg_before": loadavg(), "files": {}}
    with tempfile.TemporaryDirectory(prefix="bench-hash-") as tmp:
        store = ContentStore.open(Path(tmp) / "store", create=True)
        banks = {
            # the base's weights as the store holds them (put_file of the package's safetensors)
            "base": str(store.put_file(base_model_path() / "model.safetensors")),
            f"big{size_mb}": make_big_bank(store, size_mb),
        }
        for label, h in banks.items():
            path = store.object_path(h)
            size = path.stat().st_size
            assert sha256sum(path) == h == sha256_file(path), "hashes disagree"
            cases = {
                "verified_path": lambda h=h: store.verified_path(h, trust_cache=False),
                "sha256_file": lambda p=path: sha256_file(p),
                "sha256sum": lambda p=path: sha256sum(p),
            }
            if has_openssl:
                cases["openssl"] = lambda p=path: openssl_sha256(p)
            res = measure_interleaved(cases, warmup=warmup, repeats=repeats)
            for case, m in res.items():
                measurements[f"{label}.{case}"] = m
            mb = size / 1e6
            ref = mb / res["sha256sum"].median
            details["files"][label] = {
                "bytes": size,
                "mb_per_s": {case: mb / m.median for case, m in res.items()},
            }
            for case in ("verified_path", "sha256_file"):
                ours = mb / res[case].median
                rows.append(
                    Row(
                        name=f"hash.{label} ({mb:.0f} MB) {case}",
                        ours=ours,
                        reference=ref,
                        unit="MB/s",
                        ratio=ours / ref,
                        ratio_definition=f"MB/s of {case} / MB/s of sha256sum",
                        goal=GOAL,
                        cpu_ratio=cpu_ratio(res["sha256sum"], res[case]),
                        ours_label=case,
                        reference_label="sha256sum",
                    )
                )
            if has_openssl:
                ours = mb / res["verified_path"].median
                rows.append(
                    Row(
                        name=f"hash.{label} ({mb:.0f} MB) vs openssl",
                        ours=ours,
                        reference=mb / res["openssl"].median,
                        unit="MB/s",
                        ratio=ours / (mb / res["openssl"].median),
                        ratio_definition="MB/s of verified_path / MB/s of `openssl dgst -sha256`",
                        goal=None,
                        cpu_ratio=cpu_ratio(res["openssl"], res["verified_path"]),
                        ours_label="verified_path",
                        reference_label="openssl dgst -sha256",
                    )
                )

        # Many small banks: what `scaler verify` (or a first compose) does for a 100-branch model.
        small = make_small_banks(store, n_small)
        paths = [store.object_path(h) for h in small]
        total_mb = sum(p.stat().st_size for p in paths) / 1e6

        def verify_all() -> None:
            for h in small:
                store.verified_path(h, trust_cache=False)

        def hash_all() -> None:
            for p in paths:
                sha256_file(p)

        res = measure_interleaved(
            {"verified_path": verify_all, "sha256_file": hash_all, "sha256sum": lambda: sha256sum(*paths)},
            warmup=1,
            repeats=3 if quick else 5,
        )
        for case, m in res.items():
            measurements[f"small{n_small}.{case}"] = m
        details["files"][f"small{n_small}"] = {
            "banks": n_small,
            "bytes": int(total_mb * 1e6),
            "ms_per_bank": {case: m.median / n_small * 1e3 for case, m in res.items()},
        }
        for case in ("verified_path", "sha256_file"):
            rows.append(
                Row(
                    name=f"hash.{n_small} small banks ({total_mb:.1f} MB) {case}",
                    ours=res[case].median * 1e3,
                    reference=res["sha256sum"].median * 1e3,
                    unit="ms",
                    ratio=res["sha256sum"].median / res[case].median,
                    ratio_definition=f"t(sha256sum of all files) / t({case} on each bank)",
                    goal=None,
                    cpu_ratio=cpu_ratio(res["sha256sum"], res[case]),
                    ours_label=f"{case} x {n_small}",
                    reference_label="one sha256sum over all files",
                )
            )
    details["loadavg_after"] = loadavg()
    details["openssl"] = _openssl_version()
    details["cpu_sha_ni"] = _has_sha_ni()
    return BenchResult(
        name=NAME,
        title="bank hash verification throughput vs sha256sum (page cache warm)",
        rows=rows,
        measurements=measurements,
        details=details,
        notes=[f"median of {repeats} interleaved repeats after {warmup} warm-up; hashing is single-threaded"]
        + ([f"quick mode hashes a {size_mb} MB generated bank instead of {BIG_MB} MB"] if quick else []),
    )


def _openssl_version() -> str:
    import ssl

    return ssl.OPENSSL_VERSION


def _has_sha_ni() -> bool:
    try:
        return " sha_ni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
