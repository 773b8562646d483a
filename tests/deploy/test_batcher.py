"""The dynamic batcher with real ORT sessions: several instances run batches at once, and the
delay counts from the oldest request's arrival."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from bnrt.deploy.batcher import Batcher, _Pending
from bnrt.deploy.kserve import ServedModel
from bnrt.session import Session


class Counted(Session):
    """A real session that records how many runs of its model were under way at once."""

    lock = threading.Lock()
    running = 0
    most = 0

    def run_dict(self, feeds):
        with Counted.lock:
            Counted.running += 1
            Counted.most = max(Counted.most, Counted.running)
            self.runs += 1
        try:
            return super().run_dict(feeds)
        finally:
            with Counted.lock:
                Counted.running -= 1


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_run_batches_at_once_and_answer_each_request(onnx_model, instances):
    sessions = tuple(Counted(onnx_model, threads=1) for _ in range(instances))
    for s in sessions:
        s.runs = 0
    Counted.running = Counted.most = 0
    model = ServedModel("m", "1", sessions)
    rng = np.random.default_rng(0)
    inputs = [rng.random((512, 1, 8, 8), dtype=np.float32) for _ in range(8)]

    async def scenario():
        batcher = Batcher(model, 512, 0.0, 64)  # each request a batch of its own
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    reference = Session(onnx_model)
    for x, got in zip(inputs, answers):
        np.testing.assert_array_equal(got["output"], reference.run([x])[0])
    assert sum(s.runs for s in sessions) == 8
    assert Counted.most == instances  # two instances: two runs under way at once; one: never
    assert all(s.runs > 0 for s in sessions)


def test_a_request_that_waited_the_delay_already_is_not_held_again(onnx_model):
    """Queued while earlier batches ran, a request older than max_delay goes into the next run at
    once with what is queued beside it, not after another max_delay."""
    model = ServedModel("m", "1", (Session(onnx_model),))

    async def scenario():
        batcher = Batcher(model, 32, 5000.0, 64)  # a 5 s delay
        loop = asyncio.get_running_loop()
        x = np.zeros((1, 1, 8, 8), np.float32)
        for age in (10.0, 0.0):  # one request queued 10 s ago, one just now
            await batcher.queue.put(_Pending({"x": x}, loop.create_future(), loop.time() - age))
        start = time.perf_counter()
        batch = await batcher._gather()
        return time.perf_counter() - start, len(batch)

    waited, size = asyncio.run(scenario())
    assert size == 2 and waited < 1.0
