"""``scaler serve``: many branches over HTTP from one process (issue 15)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from scaler_wizard.cli.state import err, open_store
from scaler_wizard.errors import ScalerError


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""
    app.command("serve")(serve)


def serve(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    max_batch: Annotated[int, typer.Option(min=1, help="Most texts merged into one trunk pass.")] = 64,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="Longest a batch waits for more requests (ms), only while it holds fewer texts than the last.",
        ),
    ] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Queued requests before answering 429.")] = 256,
    max_texts_per_request: Annotated[
        int, typer.Option(min=1, help="Texts in one request (413 beyond).")
    ] = 256,
    max_text_chars: Annotated[int, typer.Option(min=1, help="Characters in one text (413 beyond).")] = 10_000,
    request_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request may wait for its answer (503 beyond).")
    ] = 60.0,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Follow the model's ref: load a new version live, no failed request."),
    ] = False,
    watch_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between ref checks (--watch).")
    ] = 2.0,
    token: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer TOKEN' (or env SCALER_SERVE_TOKEN).", show_default=False
        ),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="torch, onnx or onnx-int8 (ONNX Runtime; graphs exported once, cached in the store)."
        ),
    ] = "torch",
) -> None:
    """Serve a model's branches over HTTP with dynamic batching (POST /v1/predict)."""
    try:
        import uvicorn

        from scaler_wizard.serving.app import Limits, Live, Served, create_app
    except ImportError as exc:
        raise ScalerError(
            f"scaler serve needs the 'serve' extra: pip install 'scaler-wizard[serve]' ({exc.name} missing)"
        ) from None
    from scaler_wizard.modeling.compose import compose
    from scaler_wizard.serving.batching import Batcher
    from scaler_wizard.serving.metrics import Metrics
    from scaler_wizard.serving.watch import Watcher

    token = token or os.environ.get("SCALER_SERVE_TOKEN") or None
    store = open_store()
    if watch and ("@" in model or model.startswith("sha256:")):
        raise ScalerError(f"--watch follows a model's ref: give a name, not {model!r}")
    metrics = Metrics()

    if backend != "torch":
        from scaler_wizard.exporting.onnx_backend import parse_backend, with_backend

        parse_backend(backend)  # an unknown name fails before anything loads

    def make(spec: str) -> Served:
        m = compose(store, spec)
        m.eval()
        if backend != "torch":
            m = with_backend(store, m, backend)  # every branch's graphs ready
        assert m.origin is not None
        batcher = Batcher(
            m, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, metrics=metrics
        )
        return Served(m, name=m.origin.name, version=str(m.origin.manifest_hash), batcher=batcher)

    live = Live(make(model))
    metrics.queue_depth = lambda: live.current.batcher.depth()
    watcher = Watcher(store, live.current.name, live, make, interval_s=watch_interval) if watch else None
    app = create_app(
        live,
        metrics=metrics,
        limits=Limits(max_texts_per_request, max_text_chars, request_timeout),
        token=token,
        on_start=watcher.start if watcher else None,
        on_stop=watcher.stop if watcher else None,
    )
    cur = live.current
    err.print(
        f"serving {cur.name} {cur.version} ({len(cur.branches)} branches) on http://{host}:{port}"
        + (" (watching its ref)" if watch else ""),
        markup=False,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
