"""`bnrt serve` keeps its models in step with their folder: new and changed versions swapped in under
load with no failed request, the repository extension (index, load, unload), broken files left out."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import numpy_helper

from ..conftest import Server


def _shifted(model_path, out, shift: float) -> None:
    """The model with ``shift`` added to every bias of rank 1 (other outputs, same interface)."""
    model = onnx.load(str(model_path))
    for t in model.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.ndim == 1 and array.dtype == np.float32 and array.size == 10:
            t.CopyFrom(numpy_helper.from_array(array + np.float32(shift), t.name))
    onnx.save(model, str(out))


def _publish(source, folder) -> None:
    """``source`` as ``folder/model.onnx``, appearing at once (written beside it, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / ".model.onnx.tmp")
    os.replace(folder / ".model.onnx.tmp", folder / "model.onnx")


def _index(srv) -> list[dict]:
    status, body = srv.raw("POST", "/v2/repository/index", b"")
    assert status == 200
    return json.loads(body)


def _wait(srv, predicate, seconds: float = 30.0) -> list[dict]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        index = _index(srv)
        if predicate(index):
            return index
        time.sleep(0.05)
    raise AssertionError(_index(srv))


def test_new_and_changed_versions_swap_in_under_load_failing_no_request(onnx_model, tmp_path):
    repo = tmp_path / "repo"
    _publish(onnx_model, repo / "digits" / "1")
    _shifted(onnx_model, tmp_path / "b.onnx", 100.0)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    srv = Server(repo, "--poll-repo", "0.1", "--max-delay-ms", "1")
    answers, failures, stop = [], [], threading.Event()

    def client() -> None:
        http = httpclient.InferenceServerClient(srv.url)
        inp = httpclient.InferInput("x", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x)
        while not stop.is_set():
            try:
                answers.append(float(http.infer("digits", [inp]).as_numpy("output")[0, 0]))
            except Exception as exc:  # any failed request fails the test
                failures.append(repr(exc))

    try:
        a = float(httpclient.InferenceServerClient(srv.url).infer("digits", [_input(x)]).as_numpy("output")[0, 0])
        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        _publish(tmp_path / "b.onnx", repo / "digits" / "2")  # a new version: the latest from now on
        _wait(srv, lambda index: [r["state"] for r in index] == ["READY", "READY"])
        time.sleep(0.5)
        seen_b = len(answers)
        _publish(onnx_model, repo / "digits" / "2")  # version 2 changed in place: back to the first model
        time.sleep(0.5)
        deadline = time.time() + 30
        while abs(answers[-1] - a) > 1e-3 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        status = srv.stop()
    assert failures == [] and status == 0
    shifted = [v for v in answers if abs(v - (a + 100.0)) < 1e-2]
    assert shifted and any(abs(v - a) < 1e-3 for v in answers[:seen_b]) and abs(answers[-1] - a) < 1e-3
    assert all(abs(v - a) < 1e-3 or abs(v - a - 100.0) < 1e-2 for v in answers)  # one model or the other


def _input(x):
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_repository_index_load_unload_and_a_broken_file(onnx_model, tmp_path):
    repo = tmp_path / "repo"
    _publish(onnx_model, repo / "digits" / "1")
    srv = Server(repo, "--poll-repo", "0.1", "--grpc-port", "0")
    try:
        assert _index(srv) == [{"name": "digits", "version": "1", "state": "READY"}]
        (repo / "digits" / "3").mkdir()
        (repo / "digits" / "3" / "model.onnx").write_bytes(b"not onnx")
        index = _wait(srv, lambda index: len(index) == 2 and "reason" in index[1])
        assert index[1]["state"] == "UNAVAILABLE" and "cannot load it" in index[1]["reason"]
        http = httpclient.InferenceServerClient(srv.url)
        assert http.infer("digits", [_input(np.zeros((1, 1, 8, 8), np.float32))]).get_response()["model_version"] == "1"
        assert srv.raw("POST", "/v2/repository/models/digits/unload", b"")[0] == 200
        assert srv.raw("POST", "/v2/models/digits/infer", b"{}")[0] == 404
        time.sleep(0.3)  # a poll does not bring it back
        assert [(r["state"], r.get("reason")) for r in _index(srv)] == [("UNAVAILABLE", "unloaded")] * 2
        rpc = grpcclient.InferenceServerClient(srv.grpc_url)
        rpc.load_model("digits")
        assert http.is_model_ready("digits") and [r["state"] for r in _index(srv)] == ["READY", "UNAVAILABLE"]
        rpc.unload_model("digits")
        assert not http.is_model_ready("digits")
        status, body = srv.raw("POST", "/v2/repository/models/nope/load", b"")
        assert status == 404 and "no model 'nope'" in json.loads(body)["error"]
        assert srv.raw("POST", "/v2/repository/models/digits/load", b"")[0] == 200
        assert http.is_model_ready("digits", "1")
    finally:
        assert srv.stop() == 0


def test_unload_and_a_refresh_under_way_leave_no_request_waiting_and_no_model_back(onnx_model, tmp_path):
    import asyncio

    from bnrt.deploy.batcher import Batcher
    from bnrt.deploy.kserve import RequestError, serving_session
    from bnrt.deploy.repository import Repository

    _publish(onnx_model, tmp_path / "repo" / "m" / "1")
    slow = serving_session()

    def make(path):
        time.sleep(0.3)  # a large model loading
        return slow(path)

    async def scenario() -> tuple:
        repo = Repository(tmp_path / "repo", make, lambda m: Batcher(m, 8, 1.0, 64))
        for b in repo.batchers.values():
            b.start()
        held = repo.batchers[("m", "1")]  # a request that found the batcher before the unload
        repo.unload("m")
        gone = repo.batchers.get(("m", "1"))
        await asyncio.sleep(0.05)  # the retired batcher drains (nothing queued) and stops
        try:
            await asyncio.wait_for(held.submit({"x": np.zeros((1, 1, 8, 8), np.float32)}), 5)
            late = "answered"
        except RequestError as exc:
            late = (exc.status, str(exc))
        await repo.load("m")
        os.utime(tmp_path / "repo" / "m" / "1" / "model.onnx", ns=(1, 1))  # changed: the next refresh reloads
        refreshing = asyncio.get_running_loop().create_task(repo.refresh())
        await asyncio.sleep(0.1)
        repo.unload("m")  # while the changed file loads
        await refreshing
        await asyncio.sleep(0.05)
        return gone, late, repo.models.get("m"), [r["state"] for r in repo.index()]

    gone, late, served, states = asyncio.run(scenario())
    assert gone is None and late == (503, "model 'm' version '1' was unloaded; retry")
    assert served is None and states == ["UNAVAILABLE"]


def test_warm_up_leaves_models_with_dynamic_sizes_alone(tmp_path):
    from onnx import TensorProto, helper

    from bnrt.deploy.repository import warm_up
    from bnrt.session import Session

    w = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "c.onnx"))
    warm_up(Session(tmp_path / "c.onnx"))  # a 1x1 image would not fit the 3x3 kernel: no made-up warm-up run


def test_a_request_arriving_during_a_swap_that_changes_the_inputs_runs_on_its_version(onnx_model, tmp_path):
    """A request is held to the version it was addressed to on arrival: its body still on the way
    while the file is replaced by one whose input has another name, it is answered by the old
    version (the old batcher drains it before it stops); the next request meets the new one."""
    import socket

    from bnrt.session import Session

    repo = tmp_path / "repo"
    _publish(onnx_model, repo / "digits" / "1")
    renamed = onnx.load(str(onnx_model))
    renamed.graph.input[0].name = "image"
    for node in renamed.graph.node:
        node.input[:] = ["image" if i == "x" else i for i in node.input]
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    x = np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    srv = Server(repo, "--poll-repo", "0.1")
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(head)}\r\n\r\n".encode() + head[:100])
        time.sleep(0.3)  # the request has arrived; its body has not
        _publish(tmp_path / "renamed.onnx", repo / "digits" / "1")
        deadline = time.time() + 30
        while httpclient.InferenceServerClient(srv.url).get_model_metadata("digits")["inputs"][0]["name"] != "image":
            assert time.time() < deadline
            time.sleep(0.05)
        sock.sendall(head[100:])
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                answer.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
            chunk = sock.recv(65536)
            assert chunk, answer  # the server closed the connection before answering in full
            answer += chunk
        sock.close()
        status, body = answer.split(b" ", 2)[1], answer.split(b"\r\n\r\n", 1)[1]
        assert status == b"200", answer
        got = np.array(json.loads(body)["outputs"][0]["data"], np.float32).reshape(1, 10)
        np.testing.assert_allclose(got, Session(onnx_model).run([x])[0], rtol=1e-5, atol=1e-6)
        code, data = srv.raw("POST", "/v2/models/digits/infer", head)  # now addressed to the new version
        assert code == 400 and "unknown input 'x'" in json.loads(data)["error"]
    finally:
        assert srv.stop() == 0
