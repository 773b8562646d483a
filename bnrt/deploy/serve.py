"""Deploy stage, served: ``bnrt serve`` speaks the KServe v2 / Open Inference Protocol over HTTP
on Starlette + uvicorn, with Triton's binary tensor extension, so that the stock
``tritonclient.http`` client works with ``binary_data`` True or False.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``
(metadata), ``…/config`` (Triton's model configuration), ``…/stats`` (its statistics), ``…/ready``,
``POST …/infer``. Errors are ``{"error": "…"}`` with 400 (bad request),
404 (unknown model), 413 (request too large) or 503 (queue full).

Dynamic batching (``bnrt.deploy.batcher``): requests for a model whose batch axis is dynamic are
merged, up to ``max_batch`` samples or ``max_delay_ms`` after the first one arrived, into one ORT
run. Connections idle for ``keep_alive_s`` are closed (see ``serve``). ``GET /metrics``: Triton's
request, inference, queue and compute counters per model version (``bnrt.deploy.metrics``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import time


from bnrt.version import __version__
from bnrt.errors import InputError, OptionError
from bnrt.deploy.batcher import Batcher
from bnrt.deploy.connections import default_max_connections, limited_http_protocol
from bnrt.deploy.fastpath import Disconnected, fast_infer
from bnrt.deploy.metrics import Metrics
from bnrt.deploy.kserve import EXTENSIONS, HEADER_LENGTH, RequestError, ServedModel, build_response, parse_request, serving_session
from bnrt.deploy.repository import Repository

KEEP_ALIVE_S = 5.0  # uvicorn's default keep-alive, here also the wait for a new connection's first request


# --- the ASGI application -------------------------------------------------------------------------

class _Endpoints:
    """The protocol's endpoints over the models at ``path`` (``repository.Repository``: one
    ``Batcher`` per model version, reloaded when their files change)."""

    def __init__(self, path: str | os.PathLike, make_session, max_batch: int, max_delay_ms: float,
                 max_queue: int, max_request_bytes: int):
        from starlette.responses import JSONResponse, Response  # imported here: the CLI imports this module

        self.json, self.response = JSONResponse, Response
        self.max_request_bytes = max_request_bytes
        self.metrics = Metrics([], lambda key: self.batchers[key].in_flight if key in self.batchers else 0)

        def batcher(model: ServedModel) -> Batcher:
            self.metrics.track((model.name, model.version))
            return Batcher(model, max_batch, max_delay_ms, max_queue, self.metrics)

        self.repo = Repository(path, make_session, batcher)

    @property
    def models(self) -> dict[str, dict[str, ServedModel]]:
        return self.repo.models

    @property
    def batchers(self) -> dict:
        return self.repo.batchers

    def batcher(self, model: ServedModel) -> Batcher:
        found = self.batchers.get((model.name, model.version))
        if found is None:  # unloaded between the lookup and now
            raise RequestError(404, f"model {model.name!r} version {model.version!r} was unloaded")
        return found

    def find(self, request) -> ServedModel:
        return self.lookup(request.path_params["name"], request.path_params.get("version"))

    def lookup(self, name: str, version: str | None) -> ServedModel:
        """The model version asked for (none or empty: the latest); ``RequestError(404)`` if unknown."""
        versions = self.models.get(name)
        if not versions:
            raise RequestError(404, f"unknown model {name!r}")
        if version is None or version == "":
            return versions[max(versions, key=int)]
        if version not in versions:
            raise RequestError(404, f"model {name!r} has no version {version!r}")
        return versions[version]

    @staticmethod
    def check_batch(model: ServedModel, feeds: dict) -> None:
        """Inputs of one non-empty batch size where the model batches (parts and merged runs are cut
        along one batch axis)."""
        sizes = {a.shape[0] for a in feeds.values()} if model.batching else set()
        if len(sizes) > 1 or 0 in sizes:
            raise RequestError(400, f"inputs of different batch sizes {sorted(sizes)}" if len(sizes) > 1
                               else "empty batch")

    def error(self, status: int, message: str):
        return self.json({"error": message}, status_code=status)

    def count(self, model: ServedModel | None, start: float, success: bool) -> None:
        """A request's outcome and duration in its model version's metrics (an unknown model has none)."""
        if model is not None:
            self.metrics.request((model.name, model.version), success, time.perf_counter() - start)

    async def server_metadata(self, request):
        return self.json({"name": "bnrt", "version": __version__, "extensions": list(EXTENSIONS)})

    async def live(self, request):
        return self.response(status_code=200)

    async def model_metadata(self, request):
        try:
            model = self.find(request)
        except RequestError as exc:
            return self.error(exc.status, str(exc))
        return self.json({**model.metadata(), "versions": sorted(self.models[model.name], key=int)})

    async def model_ready(self, request):
        try:
            self.find(request)
        except RequestError as exc:
            return self.error(exc.status, str(exc))
        return await self.live(request)

    async def body(self, declared: str | None, chunks) -> bytes:
        """The request's body from ``chunks``; ``RequestError(413)`` as soon as it is known to exceed
        the limit (``declared``: its Content-Length)."""
        limit = self.max_request_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request of {declared} bytes exceeds the limit of {limit}")
        parts, size = [], 0
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request exceeds the limit of {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def config(self, model: ServedModel):
        """The model's Triton ``ModelConfig`` as served here: its tensors, ``max_batch_size`` (the
        batcher's, 0 where the batch axis is fixed), one instance group of its sessions, the
        dynamic batcher's delay."""
        from bnrt.deploy.triton import TritonOptions, build_config

        batcher = self.batcher(model)
        options = TritonOptions(batcher.max_batch, model.session.provider == "cuda", len(model.sessions),
                                max_queue_delay_us=round(batcher.max_delay * 1e6))
        try:
            return build_config(model.session, model.name, options)
        except InputError as exc:  # a tensor type Triton's schema has no name for
            raise RequestError(400, str(exc)) from None

    async def model_config(self, request):
        from bnrt.deploy.triton import config_json

        try:
            config = self.config(self.find(request))
        except RequestError as exc:
            return self.error(exc.status, str(exc))
        return self.json(config_json(config))

    def statistics(self, name: str, version: str | None) -> list[dict]:
        """Triton's statistics of the served versions of ``name`` (every model when empty; one
        version when given); ``RequestError(404)`` for a model or version not served."""
        if name:
            self.lookup(name, version)
        return [self.metrics.statistics(key) for key in sorted(self.batchers, key=lambda k: (k[0], int(k[1])))
                if not name or (key[0] == name and version in (None, "", key[1]))]

    async def model_statistics(self, request):
        try:
            stats = self.statistics(request.path_params.get("name", ""), request.path_params.get("version"))
        except RequestError as exc:
            return self.error(exc.status, str(exc))
        return self.json({"model_stats": stats})

    async def repository_index(self, request):
        return self.json(self.repo.index())

    async def repository_load(self, request):
        try:
            await self.repo.load(request.path_params["name"])
        except RequestError as exc:
            return self.error(exc.status, str(exc))
        return self.json({})

    async def repository_unload(self, request):
        try:
            self.repo.unload(request.path_params["name"])
        except RequestError as exc:
            return self.error(exc.status, str(exc))
        return self.json({})

    async def metrics_text(self, request):
        return self.response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def answer(self, name: str, version: str | None, declared: str | None, chunks,
                     header_length: str | None) -> tuple[int, bytes, list[tuple[str, str]]]:
        """An infer request's status, body and headers: ``chunks`` yields the body (raises
        ``Disconnected`` when the client left), ``declared`` its Content-Length. Every outcome is
        counted in the model version's metrics."""
        start, model = time.perf_counter(), None
        try:
            model = self.lookup(name, version)
            async with self.batcher(model).admitted() as batcher:  # runs on this version, swapped or not
                parsed, feeds = parse_request(await self.body(declared, chunks), header_length, model)
                self.check_batch(model, feeds)
                outputs = await batcher.run(feeds)
            payload, head_length = build_response(parsed, model, outputs)
        except RequestError as exc:
            self.count(model, start, success=False)
            return exc.status, json.dumps({"error": str(exc)}).encode(), [("content-type", "application/json")]
        except Disconnected:  # closed mid-body (by the client, or idle for keep_alive_s): no one to answer
            self.count(model, start, success=False)
            return 400, b"", []
        self.count(model, start, success=True)
        if head_length is None:
            return 200, payload, [("content-type", "application/json")]
        return 200, payload, [("content-type", "application/octet-stream"), (HEADER_LENGTH, str(head_length))]


def create_app(api: _Endpoints, *, grpc: tuple[str, int] | None = None, poll_s: float | None = None,
               announce=print):
    """The Starlette application of ``api``; with ``grpc`` (host, port) also the gRPC service
    (``bnrt.deploy.grpcserve``), started with the application, its address announced; with
    ``poll_s`` the repository is refreshed that often."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    @asynccontextmanager
    async def lifespan(app):
        for b in api.batchers.values():
            b.start()
        rpc, poll = None, None
        if grpc is not None:
            from bnrt.deploy.grpcserve import start_grpc

            rpc, bound = await start_grpc(api, *grpc, api.max_request_bytes)
            announce(f"gRPC (KServe v2) at {grpc[0]}:{bound}")
        if poll_s:
            poll = asyncio.get_running_loop().create_task(api.repo.poll(poll_s))
        yield
        if poll is not None:
            poll.cancel()
        if rpc is not None:
            await rpc.stop(1.0)
        for b in list(api.batchers.values()):
            await b.stop()

    routes = [
        Route("/v2", api.server_metadata),
        Route("/v2/health/live", api.live),
        Route("/v2/health/ready", api.live),
        Route("/v2/models/stats", api.model_statistics),
        Route("/v2/models/{name}/stats", api.model_statistics),
        Route("/v2/models/{name}/versions/{version}/stats", api.model_statistics),
        Route("/v2/models/{name}", api.model_metadata),
        Route("/v2/models/{name}/versions/{version}", api.model_metadata),
        Route("/v2/models/{name}/config", api.model_config),
        Route("/v2/models/{name}/versions/{version}/config", api.model_config),
        Route("/v2/models/{name}/ready", api.model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", api.model_ready),
        Route("/v2/repository/index", api.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", api.repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", api.repository_unload, methods=["POST"]),
        Route("/metrics", api.metrics_text),
    ]

    async def http_error(request, exc):
        # unmatched paths and methods also answer in the protocol's error shape
        return api.error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    return fast_infer(api, Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}))


def _grpc_ready(host: str, grpc_port: int, port: int) -> None:
    """``OptionError``/``InputError`` before anything starts: gRPC needs its packages and a port of its own."""
    try:
        import grpc  # noqa: F401
        from tritonclient.grpc import service_pb2_grpc  # noqa: F401
    except ImportError as exc:
        raise OptionError(f"`grpc_port` needs grpcio and tritonclient[grpc] (pip install 'bnrt[triton]'): "
                          f"{exc}") from None
    if grpc_port and grpc_port == port:
        raise OptionError(f"`grpc_port` {grpc_port}: the HTTP port; give gRPC another")
    if grpc_port:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, grpc_port))
            except OSError as exc:
                raise InputError(f"cannot listen on {host}:{grpc_port} for gRPC ({exc.strerror})") from exc


_INTEGER_RANGES = {"port": (0, 65535), "grpc_port": (0, 65535), "threads": (0, None), "max_batch": (1, None),
                   "max_queue": (1, None), "max_connections": (1, None), "instances": (1, 64)}


def _check_options(**options) -> None:
    """``OptionError`` naming the first option out of its range; each test is written so that NaN,
    which compares false both ways, fails it."""
    for option, value in options.items():
        if option in _INTEGER_RANGES:
            low, high = _INTEGER_RANGES[option]
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= (high or value)
            wanted = f"an integer in [{low}, {high}]" if high else f"an integer >= {low}"
        else:
            ok = isinstance(value, (int, float)) and math.isfinite(value) and (
                value >= 0 if option == "max_delay_ms" else value > 0)
            wanted = "a finite number " + (">= 0" if option == "max_delay_ms" else "> 0")
        if not ok:
            shown = format(value, "g") if isinstance(value, float) else value
            raise OptionError(f"`{option}` {shown}: must be {wanted}")


def serve(path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, provider: str = "cpu",
          threads: int = 0, max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256,
          max_request_mb: float = 64.0, tf32: bool | None = None, keep_alive_s: float = KEEP_ALIVE_S,
          max_connections: int | None = None, grpc_port: int | None = None, poll_repo_s: float | None = None,
          instances: int = 1, announce=print) -> None:
    """Serve the model(s) at ``path`` until SIGINT/SIGTERM (uvicorn's handlers shut down cleanly).
    ``tf32``: CUDA only; None keeps ORT's default (on), announced at start. A connection idle for
    ``keep_alive_s`` is closed, also before its first request and half-way through one; at most
    ``max_connections`` are open (None: ``default_max_connections()``), more are closed when
    accepted. ``grpc_port``: also serve the protocol over gRPC there (0 picks a free port; needs
    grpcio and tritonclient[grpc]). ``poll_repo_s``: look for new, changed and removed model files
    that often and swap them in without failing a request. ``instances``: sessions per model run
    at once, each with ``threads`` intra-op threads (0: the cores shared out among the instances). A
    numeric option that is NaN, infinite or out of its range is an ``OptionError``."""
    import uvicorn

    if max_connections is None:
        max_connections = default_max_connections()
    _check_options(port=port, threads=threads, max_batch=max_batch, max_queue=max_queue, instances=instances,
                   **({} if grpc_port is None else {"grpc_port": grpc_port}),
                   **({} if poll_repo_s is None else {"poll_repo_s": poll_repo_s}),
                   max_connections=max_connections, max_delay_ms=max_delay_ms, max_request_mb=max_request_mb,
                   keep_alive_s=keep_alive_s)
    if grpc_port is not None:
        _grpc_ready(host, grpc_port, port)
    if instances > 1 and threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // instances)
    api = _Endpoints(path, serving_session(provider, threads, tf32, instances), max_batch, max_delay_ms, max_queue,
                     int(max_request_mb * (1 << 20)))
    models = api.models
    app = create_app(api, grpc=None if grpc_port is None else (host, grpc_port), poll_s=poll_repo_s, announce=announce)
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
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", proxy_headers=False,
                            http=limited_http_protocol(max_connections), timeout_keep_alive=keep_alive_s)
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
