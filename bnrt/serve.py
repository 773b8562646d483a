"""Deploy stage, served: ``bnrt serve`` speaks the KServe v2 / Open Inference Protocol over HTTP
on Starlette + uvicorn, with Triton's binary tensor extension, so that the stock
``tritonclient.http`` client works with ``binary_data`` True or False.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``
(metadata), ``…/ready``, ``POST …/infer``. Errors are ``{"error": "…"}`` with 400 (bad request),
404 (unknown model), 413 (request too large) or 503 (queue full).

Dynamic batching: requests for a model whose batch axis is dynamic are merged, up to
``max_batch`` samples or ``max_delay_ms`` after the first one arrived, into one ORT run; each
request gets its own slice of the outputs back. Requests with different per-sample shapes or
dtypes are never merged. At most ``max_queue`` requests per model are in flight; more get 503.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, OptionError
from .run import Session
from .kserve import HEADER_LENGTH, RequestError, ServedModel, build_response, parse_request

KEEP_ALIVE_S = 5.0  # uvicorn's default keep-alive, here also the wait for a new connection's first request

def discover(path: str | os.PathLike, provider: str = "cpu", threads: int = 0,
             tf32: bool | None = None) -> dict[str, dict[str, ServedModel]]:
    """Models to serve: one ONNX file (named by its stem, version 1) or a Triton-style repository
    ``REPO/NAME/VERSION/model.onnx``. Returns name -> version -> ServedModel. ``tf32``: CUDA only,
    None keeps ORT's default (on)."""
    path = Path(path)

    def session(file: Path) -> Session:
        return Session(file, provider, threads, spinning=False, tf32=tf32)

    if path.is_file():
        return {path.stem: {"1": ServedModel(path.stem, "1", session(path))}}
    if not path.is_dir():
        raise InputError(f"{path}: no such ONNX file or model repository")
    models: dict[str, dict[str, ServedModel]] = {}
    for onnx_file in sorted(path.glob("*/*/model.onnx")):
        version, name = onnx_file.parent.name, onnx_file.parent.parent.name
        if version.isdigit():
            models.setdefault(name, {})[version] = ServedModel(name, version, session(onnx_file))
    if not models:
        raise InputError(f"{path}: no models found (expected REPO/NAME/VERSION/model.onnx)")
    return models


# --- dynamic batching -----------------------------------------------------------------------------

@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    future: asyncio.Future

    @property
    def size(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0]) if self.feeds else 1

    @property
    def signature(self) -> tuple:
        return tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(self.feeds.items()))


class Batcher:
    """Merges requests for one model into ORT runs (see module doc). ``submit`` awaits the
    request's own outputs; raises ``RequestError(503)`` when ``max_queue`` requests are in flight."""

    def __init__(self, model: ServedModel, max_batch: int, max_delay_ms: float, max_queue: int):
        self.model, self.max_batch, self.max_delay = model, max_batch, max_delay_ms / 1000
        self.max_queue = max_queue
        self.in_flight = 0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.held: deque[_Pending] = deque()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The request's outputs. A request of more than ``max_batch`` samples runs in parts of
        ``max_batch``, one after the other: memory follows ``max_batch``, not the request."""
        if self.in_flight >= self.max_queue:
            raise RequestError(503, f"model {self.model.name!r} has {self.in_flight} requests queued; retry later")
        self.in_flight += 1
        try:
            size = _Pending(feeds, None).size
            if not self.model.batching or size <= self.max_batch:
                return await self._one(feeds)
            parts = [await self._one({k: v[i:i + self.max_batch] for k, v in feeds.items()})
                     for i in range(0, size, self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        finally:
            self.in_flight -= 1

    async def _one(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pending = _Pending(feeds, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self.held:
            return self.held.popleft()
        try:
            return await (asyncio.wait_for(self.queue.get(), timeout) if timeout is not None else self.queue.get())
        except asyncio.TimeoutError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, total = [first], first.size
            if self.model.batching:
                deadline = loop.time() + self.max_delay
                postponed = []
                while total < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0 and self.queue.empty() and not self.held:
                        break
                    item = await self._next(max(remaining, 0))
                    if item is None:
                        break
                    if item.signature != first.signature or total + item.size > self.max_batch:
                        postponed.append(item)
                        if total + item.size > self.max_batch:
                            break
                        continue
                    batch.append(item)
                    total += item.size
                self.held.extendleft(reversed(postponed))
            await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
        try:
            outputs = await loop.run_in_executor(None, self.model.session.run_dict, feeds)
        except Exception as exc:  # an ORT failure fails the requests of this batch, not the server
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RequestError(400, f"inference failed: {exc}"))
            return
        start = 0
        for p in batch:
            n = p.size
            if not p.future.done():
                p.future.set_result({k: v[start:start + n] if len(batch) > 1 else v for k, v in outputs.items()})
            start += n


# --- the ASGI application -------------------------------------------------------------------------

def create_app(models: dict[str, dict[str, ServedModel]], *, max_batch: int = 32, max_delay_ms: float = 2.0,
               max_queue: int = 256, max_request_bytes: int = 64 << 20):
    """The Starlette application serving ``models`` (see ``discover``)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    batchers = {(m.name, m.version): Batcher(m, max_batch, max_delay_ms, max_queue)
                for versions in models.values() for m in versions.values()}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def find(request: Request) -> ServedModel:
        name = request.path_params["name"]
        version = request.path_params.get("version")
        versions = models.get(name)
        if not versions:
            raise RequestError(404, f"unknown model {name!r}")
        if version is None or version == "":
            return versions[max(versions, key=int)]
        if version not in versions:
            raise RequestError(404, f"model {name!r} has no version {version!r}")
        return versions[version]

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "bnrt", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def model_metadata(request: Request) -> Response:
        try:
            model = find(request)
        except RequestError as exc:
            return error(exc.status, str(exc))
        meta = model.metadata()
        meta["versions"] = sorted(models[model.name], key=int)
        return JSONResponse(meta)

    async def model_ready(request: Request) -> Response:
        try:
            find(request)
        except RequestError as exc:
            return error(exc.status, str(exc))
        return Response(status_code=200)

    async def infer(request: Request) -> Response:
        try:
            model = find(request)
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
                raise RequestError(413, f"request of {declared} bytes exceeds the limit of {max_request_bytes}")
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_request_bytes:
                    raise RequestError(413, f"request exceeds the limit of {max_request_bytes} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
            parsed, feeds = parse_request(body, request.headers.get(HEADER_LENGTH), model)
            if model.batching and not all(a.shape[0] for a in feeds.values()):
                raise RequestError(400, "empty batch")
            outputs = await batchers[(model.name, model.version)].submit(feeds)
            payload, head_length = build_response(parsed, model, outputs)
        except RequestError as exc:
            return error(exc.status, str(exc))
        if head_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(head_length)})

    @asynccontextmanager
    async def lifespan(app):
        for b in batchers.values():
            b.start()
        yield
        for b in batchers.values():
            await b.stop()

    routes = [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", live),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    async def http_error(request: Request, exc) -> Response:
        # unmatched paths and methods also answer in the protocol's error shape
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def _idle_closing():
    """uvicorn's HTTP protocol, its keep-alive timer started when a connection opens: uvicorn starts
    it only after a response, so connections that never send a request stayed open for ever (and
    enough of them exhaust the file descriptors). Data arriving cancels it, as after a response."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class IdleClosing(Base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    return IdleClosing


def serve(path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, provider: str = "cpu",
          threads: int = 0, max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256,
          max_request_bytes: int = 64 << 20, tf32: bool | None = None, keep_alive_s: float = KEEP_ALIVE_S,
          announce=print) -> None:
    """Serve the model(s) at ``path`` until SIGINT/SIGTERM (uvicorn's handlers shut down cleanly).
    ``tf32``: CUDA only; None keeps ORT's default (on), announced at start. A connection idle for
    ``keep_alive_s`` (before its first request too) is closed. Numeric options that are NaN,
    infinite or out of range are an ``OptionError``."""
    import uvicorn

    for value, option in ((max_batch, "max_batch"), (max_queue, "max_queue"), (max_request_bytes, "max_request_mb"),
                          (keep_alive_s, "keep_alive_s")):
        if not value > 0 or not math.isfinite(value):  # NaN compares false both ways
            raise OptionError(f"`{option}` {value}: must be a finite positive number")
    if not max_delay_ms >= 0 or not math.isfinite(max_delay_ms):
        raise OptionError(f"`max_delay_ms` {max_delay_ms}: must be a finite number >= 0")
    max_request_bytes = int(max_request_bytes)
    models = discover(path, provider, threads, tf32)
    app = create_app(models, max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                     max_request_bytes=max_request_bytes)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it, Nagle and
    # delayed ACKs hold every response (header and body are two writes) for 40 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror})") from exc
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=_idle_closing(),
                            timeout_keep_alive=keep_alive_s)
    server = uvicorn.Server(config)
    names = ", ".join(f"{n} (v{', v'.join(sorted(v, key=int))})" for n, v in models.items())
    tf32_note = "" if provider != "cuda" else f"; TF32 {'on' if tf32 is not False else 'off'}" + (
        " (ORT's CUDA default; --tf32 off for exact float32)" if tf32 is None else "")
    announce(f"serving {names} at http://{host}:{port} (KServe v2{tf32_note}; Ctrl-C stops)")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that
    # was in place before it: a no-op one here, so that a requested stop exits with status 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
