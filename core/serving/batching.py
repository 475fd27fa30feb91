"""The dynamic batcher: one worker thread owns the model and merges queued requests into one
per-row pass (up to ``max_batch`` texts, waiting at most ``max_wait_ms`` for more)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from scaler_wizard.branch import Prediction
from scaler_wizard.errors import BatcherClosedError, QueueFullError
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.modeling.row_routing import predict_routed
from scaler_wizard.serving.metrics import Metrics

#: the fixed cost of one more pass, in characters of padded text: a pass over n texts padded to
#: the longest, L characters, costs about ``PASS_COST_CHARS + n * L`` (fit on 2 CPUs, MiniLM)
PASS_COST_CHARS = 160


def length_groups(lengths: Sequence[int], pass_cost: int = PASS_COST_CHARS) -> list[list[int]]:
    """Split one merged batch into passes of similar length: the indices sorted by length, cut
    where the padding saved pays for another pass (an exact split, by dynamic programming over
    the sorted lengths; a batch of one length stays one pass)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + pass_cost + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@dataclass
class Job:
    texts: list[str]
    rows: list[list[str]]  # the branches of each text
    future: Future[list[dict[str, Prediction]]] = field(default_factory=Future)


class Batcher:
    def __init__(
        self,
        model: ScalerModel,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max(1, max_queue))
        self.metrics = metrics
        self._stop = threading.Event()
        self._submit_lock = threading.Lock()
        self._carry: Job | None = None
        self._last = 1  # texts in the last batch: how many the next one waits for
        self._thread = threading.Thread(target=self._loop, name="scaler-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(
        self, texts: Sequence[str], rows: Sequence[Sequence[str]]
    ) -> Future[list[dict[str, Prediction]]]:
        job = Job(list(texts), [list(r) for r in rows])
        with self._submit_lock:
            if self._stop.is_set():
                raise BatcherClosedError("this version no longer takes requests")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFullError("the server is busy: request queue full, retry later") from None
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        """Finish every queued job, then stop the worker."""
        with self._submit_lock:
            self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> list[Job]:
        """The next batch. It waits (at most ``max_wait``) only for as many texts as the last
        batch had: a lone client is not kept waiting for company, and under steady concurrent
        load every client's next request joins the same pass. What is queued already always
        joins, up to ``max_batch``."""
        first = self._carry
        self._carry = None
        if first is None:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                return []
        jobs, n = [first], len(first.texts)
        expect = min(self.max_batch, self._last)
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            left = deadline - time.monotonic()
            try:
                if n < expect and left > 0:
                    job = self._queue.get(timeout=left)
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if n + len(job.texts) > self.max_batch:
                self._carry = job  # first of the next batch
                break
            jobs.append(job)
            n += len(job.texts)
        self._last = n
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                if self._stop.is_set() and self._carry is None and self._queue.empty():
                    return
                continue
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        texts = [t for j in jobs for t in j.texts]
        rows = [r for j in jobs for r in j.rows]
        if self.metrics is not None:
            self.metrics.batch(len(texts))
        # a model with its own ``predict_routed`` (the ONNX backend's, handed in by the CLI) runs it
        own = getattr(self.model, "predict_routed", None)
        preds: list[dict[str, Prediction]] = [{} for _ in texts]
        try:
            for group in length_groups([len(t) for t in texts]):
                g_texts, g_rows = [texts[i] for i in group], [rows[i] for i in group]
                if own is not None:
                    out = own(g_texts, g_rows, len(group))
                else:
                    out = predict_routed(self.model, g_texts, g_rows, batch_size=len(group))
                for i, p in zip(group, out, strict=True):
                    preds[i] = p
        except Exception as exc:
            for j in jobs:
                j.future.set_exception(exc)
            return
        start = 0
        for j in jobs:
            j.future.set_result(preds[start : start + len(j.texts)])
            start += len(j.texts)
