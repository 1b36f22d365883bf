"""The collector's HTTP service: a Starlette app, run by uvicorn (the ``[collect]`` extra).

    GET  /v1/round                  the open round: number, base hash, method, global checksum, deadline
    GET  /v1/rounds/{n}/global      round n's global adapter as a full .etd delta (octet-stream)
    POST /v1/rounds/{n}/updates     upload a delta (octet-stream); headers X-Edgetune-Device,
                                    X-Edgetune-Update-Id (a UUID) and Authorization: Bearer <token>
                                    (or none, when the delta is signed by the device's registered key)
    GET  /v1/status                 rounds, accepted/refused counts with reasons, per-round metrics
    GET  /                          the same as an HTML page with the loss per round

Errors are JSON ``{"error": "<one line>", "reason": "<code>"}``. The body is read in a stream and
refused (413) as soon as it passes the size cap, or (408) when it takes longer than the upload
timeout; all blocking work (SQLite, parsing, aggregation) runs in worker threads.
fastapi/starlette and uvicorn are imported inside these functions: ``edgetune.federated`` imports
without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.federated.admission import UpdateRefused
from edgetune.federated.collector import Collector, ServeOptions
from edgetune.federated.store import Store

log = logging.getLogger("edgetune.collect")
_WATCH_INTERVAL_S = 1.0  # how often round deadlines are checked


def _require_starlette():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgetuneError("the collector needs the [collect] extra: pip install 'edgetune[collect]'.") from None


async def read_body(request, cap: int, timeout: float) -> bytes:
    """The request body, read as a stream: refused at ``cap`` bytes (413) or after ``timeout`` s (408)."""
    import anyio
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise UpdateRefused(400, "bad_headers", f"Content-Length {declared[:40]!r} is not a number.")
        if int(declared) > cap:
            raise UpdateRefused(413, "too_large", f"the body has {int(declared):,} bytes, above this collector's "
                                                  f"--max-upload-bytes {cap:,}.")
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise UpdateRefused(413, "too_large", f"the body passed this collector's --max-upload-bytes "
                                                          f"{cap:,}; reading stopped there.")
                chunks.append(chunk)
    except TimeoutError:
        raise UpdateRefused(408, "slow_upload", f"the body took longer than {timeout:g} s to arrive "
                                                f"({size:,} bytes received); upload again.") from None
    except ClientDisconnect:
        raise UpdateRefused(400, "truncated_body", f"the client disconnected after {size:,} bytes of the body.") from None
    if declared is not None and size != int(declared):
        raise UpdateRefused(400, "truncated_body", f"the body has {size:,} bytes, Content-Length said {declared}.")
    return b"".join(chunks)


def create_app(store_folder: Path | str, options: ServeOptions):
    """The ASGI app serving ``store_folder``; the store is opened here and closed at shutdown."""
    _require_starlette()
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from edgetune.federated import page
    from edgetune.federated.status import status

    store = Store(store_folder)
    store.lock_for_serving()
    collector = Collector(store, options)

    def guarded(handler):
        """Any unexpected exception becomes a 500 JSON answer (and a log line), never a dead server."""
        async def endpoint(request):
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - the server must keep serving
                log.exception("internal error on %s %s", request.method, request.url.path)
                return JSONResponse({"error": f"internal error ({type(exc).__name__}); the request was not applied.",
                                     "reason": "internal_error"}, status_code=500)
        return endpoint

    async def get_round(request):
        return JSONResponse(await run_in_threadpool(collector.round_info))

    async def get_global(request):
        n = request.path_params["n"]
        try:
            data = await run_in_threadpool(collector.global_bytes, n)
        except UpdateRefused as exc:
            return JSONResponse({"error": str(exc), "reason": exc.reason}, status_code=exc.status)
        return Response(data, media_type="application/octet-stream")

    async def post_update(request):
        n = request.path_params["n"]
        device_id = request.headers.get("x-edgetune-device")
        update_id = request.headers.get("x-edgetune-update-id")
        authorization = request.headers.get("authorization")
        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/octet-stream":
                raise UpdateRefused(415, "wrong_content_type", f"Content-Type must be application/octet-stream (the "
                                                               f".etd bytes), got {kind[:60] or 'none'!r}.")
            device = await run_in_threadpool(collector.authenticate, device_id, update_id, authorization)
            body = await read_body(request, options.max_upload_bytes, options.upload_timeout)
            code, answer = await run_in_threadpool(collector.upload, device, update_id, n, body, authorization is None)
        except UpdateRefused as exc:
            code, payload = await run_in_threadpool(collector.refuse, exc, device_id=device_id, update_id=update_id,
                                                    round_=n)
            return JSONResponse(payload, status_code=code)
        background = BackgroundTask(collector.aggregate_if_due) if code == 201 else None
        return JSONResponse(answer, status_code=code, background=background)

    async def get_status(request):
        return JSONResponse(await run_in_threadpool(status, store, collector))

    async def get_page(request):
        return HTMLResponse(page.render(await run_in_threadpool(status, store, collector)))

    async def not_found(request, exc):
        return JSONResponse({"error": f"no {request.method} {request.url.path} here; see GET /v1/round.",
                             "reason": "not_found"}, status_code=getattr(exc, "status_code", 404))

    async def watch_deadlines():
        while True:
            try:
                await run_in_threadpool(collector.aggregate_if_due)
            except Exception:  # noqa: BLE001 - logged; the watcher keeps running
                log.exception("deadline check failed")
            await asyncio.sleep(_WATCH_INTERVAL_S)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(watch_deadlines())  # also aggregates a round left due by a crash
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()

    routes = [Route("/v1/round", guarded(get_round)), Route("/v1/rounds/{n:int}/global", guarded(get_global)),
              Route("/v1/rounds/{n:int}/updates", guarded(post_update), methods=["POST"]),
              Route("/v1/status", guarded(get_status)), Route("/", guarded(get_page))]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.collector = collector
    return app


def serve(store_folder: Path | str, options: ServeOptions, host: str, port: int, *, tls_cert=None, tls_key=None,
          on_ready=None) -> None:
    """Run the collector until interrupted. Refuses a busy port with one line before starting."""
    _require_starlette()
    import uvicorn

    app = create_app(store_folder, options)
    _check_port(host, port)
    if on_ready is not None:
        on_ready(app.state.collector)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5, limit_concurrency=4096,
                ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None)


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EdgetuneError(f"--host {host!r} cannot be resolved ({exc.strerror}); give an address such as 127.0.0.1.") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            raise EdgetuneError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or stop what "
                                "uses it.") from None
