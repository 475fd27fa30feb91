"""The FastAPI app: ``POST /v1/predict``, ``GET /v1/branches``, ``GET /healthz``, ``GET /metrics``."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaler_wizard.branch import Prediction
from scaler_wizard.errors import BatcherClosedError, QueueFullError, RequestError, did_you_mean
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.serving.batching import Batcher
from scaler_wizard.serving.metrics import Metrics

_ENDPOINTS = frozenset({"/v1/predict", "/v1/branches", "/healthz", "/metrics", "/docs", "/openapi.json"})


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int = 256
    max_text_chars: int = 10_000
    request_timeout_s: float = 60.0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


class Served:
    """One composed version being served: its model, pinned hash, branches and batcher."""

    def __init__(self, model: ScalerModel, *, name: str, version: str, batcher: Batcher) -> None:
        self.model = model
        self.name = name
        self.version = version
        self.batcher = batcher
        self.branches = list(model.branch_names)
        self.info = {n: model.branch(n) for n in self.branches}  # loaded now, outside inference mode


class Live:
    """The version answering now; ``swap`` replaces it atomically (``--watch``)."""

    def __init__(self, served: Served) -> None:
        self.current = served
        self._lock = threading.Lock()

    def swap(self, new: Served) -> Served:
        """Start ``new``'s batcher, make it current; return the old one (its caller closes it,
        which finishes the requests already queued on it)."""
        new.batcher.start()
        with self._lock:
            old, self.current = self.current, new
        return old


def create_app(
    live: Live,
    *,
    metrics: Metrics,
    limits: Limits = Limits(),
    token: str | None = None,
    on_start: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> FastAPI:
    """The app serving ``live.current`` (each answer names the version that computed it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        live.current.batcher.start()
        if on_start is not None:
            on_start()
        yield
        loop = asyncio.get_running_loop()
        if on_stop is not None:
            await loop.run_in_executor(None, on_stop)
        await loop.run_in_executor(None, live.current.batcher.close)

    app = FastAPI(title="scaler serve", version=live.current.version, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        metrics.request(path if path in _ENDPOINTS else "other")  # no label per unknown path
        if token is not None and request.url.path != "/healthz":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                metrics.error(401)
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        try:
            response = await call_next(request)
        except RequestError as exc:
            response = _error(exc.status, exc.message, exc.headers)
        if response.status_code >= 400:
            metrics.error(response.status_code)
        return response

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"prediction failed: {type(exc).__name__}: {exc}")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        cur = live.current
        return {"status": "ok", "model": cur.name, "version": cur.version}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/branches")
    async def list_branches() -> dict[str, Any]:
        cur = live.current
        out = []
        for n in cur.branches:
            entry = cur.info[n].entry
            out.append(
                {
                    "name": n,
                    "labels": list(cur.info[n].labels),
                    "strategy": entry.get("strategy"),
                    "head": entry.get("head"),
                    "metrics": entry.get("metrics", {}),
                }
            )
        return {"model": cur.name, "version": cur.version, "branches": out}

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        started = time.monotonic()
        body = await request.body()
        for _ in range(10):
            cur = live.current
            texts, rows = _parse(body, cur.branches, limits)
            try:
                future = cur.batcher.submit(texts, rows)
                break
            except QueueFullError as exc:
                raise RequestError(429, str(exc), {"Retry-After": "1"}) from None
            except BatcherClosedError:
                continue  # swapped to a new version meanwhile: submit there
        else:
            raise RequestError(503, "the server is switching versions, retry")
        try:
            preds = await asyncio.wait_for(asyncio.wrap_future(future), limits.request_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11
            raise RequestError(503, f"prediction took over {limits.request_timeout_s:g} s") from None
        metrics.predicted(time.monotonic() - started, Counter(b for r in rows for b in r))
        return {
            "model": cur.name,
            "version": cur.version,
            "results": [
                {"text": t, "predictions": {b: _pred(p[b]) for b in r}}
                for t, r, p in zip(texts, rows, preds, strict=True)
            ],
        }

    return app


def _pred(p: Prediction) -> dict[str, Any]:
    return {"label": p.label, "score": p.score, "scores": p.scores}


def _parse(body: bytes, known: list[str], limits: Limits) -> tuple[list[str], list[list[str]]]:
    """The texts and the branches of each text, or a one-line RequestError."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, 'request body must be a JSON object like {"texts": [...], "branch": "..."}')
    unknown = sorted(set(data) - {"texts", "branch", "branches", "row_branches"})
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}")
    texts = data.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RequestError(422, '"texts" must be a list of strings')
    if not texts:
        raise RequestError(422, '"texts" is empty')
    if len(texts) > limits.max_texts_per_request:
        raise RequestError(
            413, f"{len(texts)} texts in one request; the limit is {limits.max_texts_per_request}"
        )
    for i, t in enumerate(texts):
        if len(t) > limits.max_text_chars:
            raise RequestError(413, f"text {i} has {len(t)} characters; the limit is {limits.max_text_chars}")
    given = [k for k in ("branch", "branches", "row_branches") if k in data]
    if len(given) > 1:
        raise RequestError(400, f"give one of branch, branches, row_branches, not {' and '.join(given)}")
    rows: list[list[str]]
    if not given:
        if len(known) != 1:
            raise RequestError(400, f'name a branch with "branch" (one of: {", ".join(known) or "none"})')
        rows = [[known[0]]] * len(texts)
    elif given[0] == "branch":
        if not isinstance(data["branch"], str):
            raise RequestError(422, '"branch" must be a string')
        rows = [[data["branch"]]] * len(texts)
    elif given[0] == "branches":
        names = data["branches"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise RequestError(422, '"branches" must be a non-empty list of strings')
        rows = [list(dict.fromkeys(names))] * len(texts)
    else:
        per_row = data["row_branches"]
        if not isinstance(per_row, list) or not all(isinstance(n, str) for n in per_row):
            raise RequestError(422, '"row_branches" must be a list of strings, one per text')
        if len(per_row) != len(texts):
            raise RequestError(422, f'"row_branches" has {len(per_row)} entries for {len(texts)} texts')
        rows = [[n] for n in per_row]
    for r in rows:
        for n in r:
            if n not in known:
                raise RequestError(404, f"no branch named {n!r} {did_you_mean(n, known)}")
    return texts, rows
