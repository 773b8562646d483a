"""Dynamic batching of `bnrt serve`: requests for a model whose batch axis is dynamic are merged,
up to ``max_batch`` samples or ``max_delay_ms`` after the first one arrived, into one ORT run; each
request gets its own slice of the outputs back. A model with several instances (sessions) runs a
batch on each at once: one instance gathers the next batch while the others run theirs. Requests with different per-sample shapes or
dtypes are never merged. At most ``max_queue`` requests per model are in flight; more get 503. A
request of more than ``max_batch`` samples runs in parts of ``max_batch``: memory follows
``max_batch``, not the request. Each run adds to the model's metrics (queue and compute time,
inferences, executions).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from collections import deque
from dataclasses import dataclass

import numpy as np

from bnrt.deploy.kserve import RequestError, ServedModel
from bnrt.deploy.metrics import Metrics


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    future: asyncio.Future
    queued: float = 0.0  # the event loop's time when it was queued
    first: bool = True  # the request's first part (a request over max_batch runs in parts): counted once

    @property
    def size(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0]) if self.feeds else 1

    @property
    def signature(self) -> tuple:
        return tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(self.feeds.items()))


class Batcher:
    """Merges requests for one model into ORT runs (see module doc). ``submit`` awaits the
    request's own outputs; raises ``RequestError(503)`` when ``max_queue`` requests are in flight."""

    def __init__(self, model: ServedModel, max_batch: int, max_delay_ms: float, max_queue: int,
                 metrics: Metrics | None = None):
        self.model, self.max_batch, self.max_delay = model, max_batch, max_delay_ms / 1000
        self.metrics, self.key = metrics, (model.name, model.version)
        self.max_queue = max_queue
        self.in_flight, self.admitted_now, self.stopped = 0, 0, False
        # one thread per instance: runs of every instance at once, whatever else uses the loop's executor
        self.executor = ThreadPoolExecutor(len(model.sessions), thread_name_prefix=f"bnrt-{model.name}")
        self.queue: asyncio.Queue = asyncio.Queue()
        self.held: deque[_Pending] = deque()
        self.tasks: list[asyncio.Task] = []
        self.gathering = asyncio.Lock()  # one instance gathers a batch while the others run theirs

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._loop(session)) for session in self.model.sessions]

    async def drain(self) -> None:
        """Wait until every request admitted so far is answered."""
        while self.admitted_now or self.in_flight:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.stopped = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.executor.shutdown(wait=False)

    @asynccontextmanager
    async def admitted(self):
        """Holds this batcher for a request from its arrival (its body may still be on the way) to
        its answer, so that a batcher being retired (its version swapped or unloaded) answers it
        before it stops; ``RequestError(503)`` when it is stopped. The queue limit applies in ``run``,
        once the request is whole: clients still sending take connections, not the queue."""
        if self.stopped:  # a retired version's batcher, reached by a request that found it before
            raise RequestError(503, f"model {self.model.name!r} version {self.model.version!r} was unloaded; retry")
        self.admitted_now += 1
        try:
            yield self
        finally:
            self.admitted_now -= 1

    async def submit(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The request's outputs (the request admitted here)."""
        async with self.admitted():
            return await self.run(feeds)

    async def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs of an admitted request; ``RequestError(503)`` when ``max_queue`` requests are
        in flight. A request of more than ``max_batch`` samples runs in parts of ``max_batch``, one
        after the other: memory follows ``max_batch``, not the request."""
        if self.in_flight >= self.max_queue:
            raise RequestError(503, f"model {self.model.name!r} has {self.in_flight} requests queued; retry later")
        self.in_flight += 1
        try:
            size = _Pending(feeds, None).size
            if not self.model.batching or size <= self.max_batch:
                return await self._one(feeds)
            parts = [await self._one({k: v[i:i + self.max_batch] for k, v in feeds.items()}, first=not i)
                     for i in range(0, size, self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        finally:
            self.in_flight -= 1

    async def _one(self, feeds: dict[str, np.ndarray], first: bool = True) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        pending = _Pending(feeds, loop.create_future(), loop.time(), first)
        await self.queue.put(pending)
        return await pending.future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self.held:
            return self.held.popleft()
        if timeout is not None and timeout <= 0:  # what is queued now (wait_for(…, 0) would take nothing)
            try:
                return self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await (asyncio.wait_for(self.queue.get(), timeout) if timeout is not None else self.queue.get())
        except asyncio.TimeoutError:
            return None

    async def _loop(self, session) -> None:
        # no local variable outlives a batch: the last one's inputs (a part of a large request is a
        # view of all of it) would stay in memory until the next request
        while True:
            async with self.gathering:
                batch = await self._gather()
            await self._run(batch, session)
            del batch

    async def _gather(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        batch, total = [first], first.size
        if self.model.batching:
            deadline = first.queued + self.max_delay  # from the oldest request's arrival, as Triton counts it
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
        return batch

    async def _run(self, batch: list[_Pending], session) -> None:
        loop = asyncio.get_running_loop()
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
        started = loop.time()
        try:
            outputs, seconds = await loop.run_in_executor(self.executor, _timed, session, feeds)
        except Exception as exc:  # an ORT failure fails the requests of this batch, not the server
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RequestError(400, f"inference failed: {exc}"))
            return
        if self.metrics is not None:
            # a model without a batch axis runs one inference per request, whatever its first dim
            self.metrics.execution(self.key, [p.size if self.model.batching else 1 for p in batch],
                                   [started - p.queued for p in batch], seconds, [p.first for p in batch])
        start = 0
        for p in batch:
            n = p.size
            if not p.future.done():
                p.future.set_result({k: v[start:start + n] if len(batch) > 1 else v for k, v in outputs.items()})
            start += n


def _timed(session, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    start = time.perf_counter()
    outputs = session.run_dict(feeds)
    return outputs, time.perf_counter() - start
