"""Prometheus text exposition, by hand (no client library): counters and histograms."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        for bound, count in zip(self.buckets, self.counts, strict=True):
            out.append(f'{name}_bucket{{le="{_num(bound)}"}} {count}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.total}")
        return out


class Metrics:
    """What ``GET /metrics`` reports; every method is thread-safe."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by endpoint
        self.errors: Counter[int] = Counter()  # by HTTP status
        self.branch_rows: Counter[str] = Counter()
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.queue_depth = queue_depth

    def request(self, endpoint: str) -> None:
        with self._lock:
            self.requests[endpoint] += 1

    def error(self, status: int) -> None:
        with self._lock:
            self.errors[status] += 1

    def batch(self, n_texts: int) -> None:
        with self._lock:
            self.batch_size.observe(n_texts)

    def predicted(self, seconds: float, branches: Counter[str]) -> None:
        with self._lock:
            self.latency.observe(seconds)
            self.branch_rows.update(branches)

    def render(self) -> str:
        with self._lock:
            lines = ["# TYPE scaler_requests_total counter"]
            lines += [
                f'scaler_requests_total{{endpoint="{_esc(k)}"}} {v}' for k, v in sorted(self.requests.items())
            ]
            lines.append("# TYPE scaler_errors_total counter")
            lines += [f'scaler_errors_total{{code="{k}"}} {v}' for k, v in sorted(self.errors.items())]
            lines.append("# TYPE scaler_branch_rows_total counter")
            lines += [
                f'scaler_branch_rows_total{{branch="{_esc(k)}"}} {v}'
                for k, v in sorted(self.branch_rows.items())
            ]
            lines += self.batch_size.lines("scaler_batch_size")
            lines += self.latency.lines("scaler_request_latency_seconds")
        lines += ["# TYPE scaler_queue_depth gauge", f"scaler_queue_depth {self.queue_depth()}"]
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
