"""The server under fuzz and load: never a 5xx or a crash on hostile requests, still answering
valid ones; 10,000 requests at 64 concurrent clients with no failure and bounded memory."""

from __future__ import annotations

import json
import urllib.parse

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.load_test import load_test, valid_body

from .conftest import Server

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
tensor_like = st.fixed_dictionaries({
    "name": st.sampled_from(["x", "y", ""]) | st.text(max_size=4),
    "shape": st.lists(st.integers(-2, 9) | st.integers(2**31 - 2, 2**70), max_size=5) | json_values,
    "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "BOOL", "XX"]),
}, optional={"data": st.lists(st.floats(allow_nan=False, width=32), max_size=80) | json_values,
             "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "binary_data"]),
                                           st.integers(-5, 300) | json_values, max_size=2)})
requested_outputs = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["output"]) | json_values},
                                                   optional={"parameters": json_values}), max_size=3) | json_values
bodies = st.one_of(
    st.binary(max_size=600),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"inputs": st.lists(tensor_like, max_size=3)},
                          optional={"outputs": requested_outputs, "parameters": json_values, "id": json_values})
    .map(lambda v: json.dumps(v).encode()),
    # nesting far beyond any decoder's recursion limit, as a whole body and as an input's data
    st.integers(900, 300_000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(900, 300_000).map(lambda d: b'{"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", '
                                            b'"data": ' + b"[" * d + b"]" * d + b"}]}"),
)
headers = st.dictionaries(
    st.sampled_from(["Inference-Header-Content-Length", "Content-Type", "Content-Length-Extra"]),
    st.text(alphabet="0123456789-abc ", max_size=6), max_size=2)


@pytest.fixture(scope="module")
def fuzz_server(onnx_model):
    srv = Server(onnx_model, "--max-delay-ms", "1")
    yield srv
    assert srv.stop() == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, head=headers, model=st.sampled_from(["digits_cnn"]) | st.text(max_size=6),
       version=st.none() | st.text(max_size=3), tail=st.sampled_from(["infer", "ready", ""]),
       binary=st.binary(max_size=300))
def test_hostile_requests_never_get_a_5xx(fuzz_server, body, head, model, version, tail, binary):
    path = "/v2/models/" + urllib.parse.quote(model, safe="")
    if version is not None:
        path += "/versions/" + urllib.parse.quote(version, safe="")
    path += "/" + tail if tail else ""
    status, data = fuzz_server.raw("POST" if tail == "infer" else "GET", path, body + binary, head)
    assert status < 500, (status, data[:200])
    if status >= 400 and data:
        assert "error" in json.loads(data)
    ok, _ = fuzz_server.raw("POST", "/v2/models/digits_cnn/infer", valid_body((1, 1, 8, 8)))
    assert ok == 200


def test_ten_thousand_requests_at_64_clients(onnx_model, capsys):  # noqa: F811
    stats = load_test(onnx_model, requests=10000, clients=64)
    with capsys.disabled():
        print(f"\nload test: {stats}")
    assert stats["requests"] == 10000 and stats["failures"] == 0
    assert stats["rss_growth"] < 0.10
    assert np.isfinite(stats["p99_ms"])
