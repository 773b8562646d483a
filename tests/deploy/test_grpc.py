"""`bnrt serve --grpc-port`: the KServe v2 gRPC service, driven by the stock tritonclient.grpc client."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as rpc

from bnrt.session import Session

from ..conftest import Server, assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def server(onnx_model):
    srv = Server(onnx_model, "--grpc-port", "0", "--max-delay-ms", "5", "--max-request-mb", "1")
    yield srv
    assert srv.stop() == 0


def _grpc_infer(url: str, x: np.ndarray, model: str = "digits_cnn") -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("output")]).as_numpy("output")


def test_grpc_health_metadata_and_repository_index(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits_cnn") and client.is_model_ready("digits_cnn", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("digits_cnn", "2")
    meta = client.get_model_metadata("digits_cnn", as_json=True)
    assert (meta["name"], meta["versions"], meta["platform"]) == ("digits_cnn", ["1"], "onnxruntime_onnx")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert client.get_server_metadata(as_json=True)["name"] == "bnrt"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": "digits_cnn", "version": "1", "state": "READY"}]


def test_grpc_outputs_equal_in_process_ort_raw_and_typed(server, onnx_model):
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    expected = Session(onnx_model).run([x])[0]
    over_grpc = _grpc_infer(server.grpc_url, x)
    np.testing.assert_allclose(over_grpc, expected, rtol=1e-5, atol=1e-6)
    http = httpclient.InferenceServerClient(server.url)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    assert http.infer("digits_cnn", [inp]).as_numpy("output").tobytes() == over_grpc.tobytes()  # bit-identical
    request = pb.ModelInferRequest(model_name="digits_cnn", id="typed-7")  # typed contents, as some clients send
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.ravel())
    with grpc.insecure_channel(server.grpc_url) as channel:
        response = rpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert (response.model_name, response.model_version, response.id) == ("digits_cnn", "1", "typed-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("output", "FP32", [5, 10])]
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(5, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_grpc_and_http_clients_at_once_get_their_own_results(server, onnx_model):
    rng = np.random.default_rng(2)
    inputs = [rng.random((1 + i % 3, 1, 8, 8), dtype=np.float32) for i in range(48)]
    session = Session(onnx_model)

    def one(i: int) -> np.ndarray:
        if i % 2:
            return _grpc_infer(server.grpc_url, inputs[i])
        client = httpclient.InferenceServerClient(server.url)
        inp = httpclient.InferInput("x", list(inputs[i].shape), "FP32")
        inp.set_data_from_numpy(inputs[i])
        return client.infer("digits_cnn", [inp]).as_numpy("output")

    before = server.metrics()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(len(inputs))))
    for got, x in zip(results, inputs):
        np.testing.assert_allclose(got, session.run([x])[0], rtol=1e-5, atol=1e-6)
    after, label = server.metrics(), '{model="digits_cnn",version="1"}'
    assert after[f"nv_inference_request_success{label}"] - before[f"nv_inference_request_success{label}"] == 48
    assert after[f"nv_inference_count{label}"] - before[f"nv_inference_count{label}"] == sum(len(x) for x in inputs)


@pytest.mark.parametrize("case,code,fragment", [
    ("wrong shape", "INVALID_ARGUMENT", "input 'x' expects float32 (N, 1, 8, 8), got float32 (1, 1, 8, 9)"),
    ("unknown model", "NOT_FOUND", "unknown model 'nope'"),
    ("unknown version", "NOT_FOUND", "model 'digits_cnn' has no version '3'"),
    ("raw size", "INVALID_ARGUMENT", "input 'x': 12 bytes of raw contents for shape [1, 1, 8, 8] of FP32"),
    ("too large", "RESOURCE_EXHAUSTED", ""),
])
def test_grpc_refusals_are_statuses_and_the_server_keeps_serving(server, case, code, fragment):
    request = pb.ModelInferRequest(model_name="nope" if case == "unknown model" else "digits_cnn",
                                   model_version="3" if case == "unknown version" else "")
    shape = [1, 1, 8, 9] if case == "wrong shape" else [5000, 1, 8, 8] if case == "too large" else [1, 1, 8, 8]
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"\0" * 12 if case == "raw size" else np.zeros(shape, np.float32).tobytes())
    with grpc.insecure_channel(server.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as err:
            rpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert err.value.code().name == code and fragment in err.value.details()
    assert _grpc_infer(server.grpc_url, np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 10)


def test_grpc_port_options_are_one_line(onnx_model):
    assert_one_line_error(run_cli("serve", str(onnx_model), "--port", "8123", "--grpc-port", "8123"),
                          "grpc-port", "the HTTP port")
    assert_one_line_error(run_cli("serve", str(onnx_model), "--grpc-port", "70000"), "grpc-port", "65535")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli("serve", str(onnx_model), "--port", "0", "--grpc-port", str(port)),
                              f"cannot listen on 127.0.0.1:{port} for gRPC")


def test_model_config_over_grpc_and_http_is_the_served_configuration(server):
    """What Triton's clients (and perf_analyzer) read first: max_batch_size, the tensors' dims
    without the batch axis, one instance, the dynamic batcher's delay; the same over both."""
    message = grpcclient.InferenceServerClient(server.grpc_url).get_model_config("digits_cnn").config
    config = httpclient.InferenceServerClient(server.url).get_model_config("digits_cnn")
    # over HTTP as Triton writes it: 64-bit integers (dims, delays) as JSON numbers
    assert (config["name"], config["platform"], config["max_batch_size"]) == ("digits_cnn", "onnxruntime_onnx", 32)
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [("x", "TYPE_FP32", [1, 8, 8])]
    assert [(t["name"], t["dims"]) for t in config["output"]] == [("output", [10])]
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 5000}
    assert json_format.ParseDict(config, type(message)()) == message  # the same configuration over gRPC
    with pytest.raises(Exception, match="unknown model 'nope'"):
        grpcclient.InferenceServerClient(server.grpc_url).get_model_config("nope")


def test_model_statistics_count_what_was_sent_over_grpc_and_http(onnx_model):
    """Triton's statistics extension: per outcome and phase, request counts and nanoseconds;
    executions by batch size; the same over gRPC (ModelStatistics) and HTTP (GET …/stats)."""
    srv = Server(onnx_model, "--grpc-port", "0", "--max-delay-ms", "0")
    try:
        rng = np.random.default_rng(0)
        for n in (1, 2, 3):  # one after the other: three runs of 1, 2 and 3 samples
            _grpc_infer(srv.grpc_url, rng.random((n, 1, 8, 8), dtype=np.float32))
        with pytest.raises(Exception, match="expects float32"):
            _grpc_infer(srv.grpc_url, rng.random((1, 1, 8, 9), dtype=np.float32))
        message = grpcclient.InferenceServerClient(srv.grpc_url).get_inference_statistics("digits_cnn")
        stats = httpclient.InferenceServerClient(srv.url).get_inference_statistics("digits_cnn")
        assert json_format.ParseDict(stats, pb.ModelStatisticsResponse()) == message
        assert httpclient.InferenceServerClient(srv.url).get_inference_statistics() == stats  # every model
        (model,) = stats["model_stats"]
        assert (model["name"], model["version"], model["inference_count"], model["execution_count"]) == (
            "digits_cnn", "1", 6, 3)
        phases = model["inference_stats"]
        assert {k: v["count"] for k, v in phases.items()} == {
            "success": 3, "fail": 1, "queue": 3, "compute_input": 0, "compute_infer": 3, "compute_output": 0}
        assert all(phases[k]["ns"] > 0 for k in ("success", "fail", "compute_infer"))
        assert [(b["batch_size"], b["compute_infer"]["count"]) for b in model["batch_stats"]] == [(1, 1), (2, 1), (3, 1)]
        assert phases["compute_infer"]["ns"] == sum(b["compute_infer"]["ns"] for b in model["batch_stats"])
        assert 0 < time.time() * 1000 - model["last_inference"] < 60_000
        with pytest.raises(Exception, match="unknown model 'nope'"):
            grpcclient.InferenceServerClient(srv.grpc_url).get_inference_statistics("nope")
    finally:
        assert srv.stop() == 0
