"""The server under fuzz and load: never a 5xx or a crash on hostile requests, still answering
valid ones; idle, stalled and surplus connections closed; 10,000 requests at 64 concurrent clients
with no failure and bounded memory."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnrt.deploy.kserve import _numbers
from tools.load_test import load_test, valid_body

from ..conftest import Server

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
huge = st.integers(2**31 - 2, 2**70) | st.sampled_from([2**32, 2**63, 2**64])  # past int32, int64, uint64
tensor_like = st.fixed_dictionaries({
    "name": st.sampled_from(["x", "y", ""]) | st.text(max_size=4) | json_values,
    "shape": st.lists(st.integers(-2, 9) | huge | json_values, max_size=5)
    | st.lists(st.just(1), min_size=30, max_size=40) | json_values,
    "datatype": st.sampled_from(["FP32", "FP64", "INT8", "INT64", "BYTES", "BOOL", "XX"]) | json_values,
}, optional={"data": st.lists(st.floats(allow_nan=False, width=32), max_size=80) | json_values
             | st.lists(huge | st.booleans() | st.none() | st.text(max_size=3) | st.integers(-300, 300), max_size=80),
             "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "binary_data"]),
                                           st.integers(-5, 300) | huge | json_values, max_size=2) | json_values})
output_parameters = st.fixed_dictionaries({}, optional={"binary_data": json_values}) | json_values
requested_outputs = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["output"]) | json_values},
                                                   optional={"parameters": output_parameters}), max_size=3) \
    | json_values
request_parameters = st.fixed_dictionaries({}, optional={"binary_data_output": json_values}) | json_values
# "data" arrays long enough (64 KiB of text) for numpy's parser, cut from a random run of number characters
long_numbers = st.builds(
    lambda pattern, datatype, n: b'{"inputs": [{"name": "x", "shape": [%d, 1, 8, 8], "datatype": "%s", "data": [%s]}]}'
    % (n, datatype.encode(), (pattern.encode() * (70_000 // len(pattern) + 1))[:70_000 + n % 7]),
    st.text(alphabet="0123456789.eE+-, ", min_size=1, max_size=12) | st.sampled_from(["0.5,", "0.5, ", "1e5,", "-0,"]),
    st.sampled_from(["FP32", "FP16", "FP64", "INT64"]), st.integers(0, 20_000))
bodies = st.one_of(
    st.binary(max_size=600),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"inputs": st.lists(tensor_like, max_size=3)},
                          optional={"outputs": requested_outputs, "parameters": request_parameters, "id": json_values})
    .map(lambda v: json.dumps(v).encode()),
    # nesting from just under bnrt's limit (35) to far beyond the decoder's recursion limit, as a
    # whole body and as an input's data
    st.integers(30, 300_000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(30, 300_000).map(lambda d: b'{"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", '
                                           b'"data": ' + b"[" * d + b"]" * d + b"}]}"),
    long_numbers,
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


@settings(max_examples=500, deadline=None)
@given(tokens=st.lists(st.text("0123456789.eE+- ", max_size=6), min_size=1, max_size=20),
       separator=st.sampled_from([",", ", "]))
def test_numpys_parser_agrees_with_the_json_decoder(tokens, separator):
    # long "data" arrays are parsed by numpy: every array the JSON decoder reads must come out the
    # same, and numpy never reads a different number of values (it reads "1, ,2" as 1, -1, 2)
    text = separator.join(tokens).encode()
    try:
        expected = np.asarray(json.loads(b"[" + text + b"]"), np.float64)
    except (ValueError, TypeError):
        expected = None
    try:
        got = _numbers(text, np.dtype(np.float64))  # None: left to the JSON decoder
    except ValueError:
        got = "refused"
    if expected is not None and got is not None:
        assert np.array_equal(got, expected), (text, got)
    if isinstance(got, np.ndarray):
        assert len(got) == (len(tokens) if text else 0), (text, got)


def _closed_within(sock, seconds: float) -> bool:
    """Whether the server closed ``sock`` (EOF) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, ConnectionResetError) as exc:
        return isinstance(exc, ConnectionResetError)


def test_idle_and_stalled_connections_are_closed(onnx_model):
    # issue 21 item 11: a connection that never sent a request stayed open for ever (20,000 of
    # them exhausted the file descriptors); so did one that stopped half-way through its request
    srv = Server(onnx_model, "--keep-alive-s", "1")
    try:
        partial = [b"", b"POST /v2/models/digits_cnn/infer HTTP/1.1\r\nHost: x\r\n",
                   b"POST /v2/models/digits_cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"in"]
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in partial]
        start = time.monotonic()
        for sock, sent in zip(socks, partial):
            sock.sendall(sent)
        assert [_closed_within(s, 5) for s in socks] == [True] * 3
        assert time.monotonic() - start < 4
        assert srv.raw("POST", "/v2/models/digits_cnn/infer", valid_body((1, 1, 8, 8)))[0] == 200
        for sock in socks:
            sock.close()
        srv.log.seek(0)
        assert "Traceback" not in srv.log.read()  # the request cut off mid-body ends quietly
    finally:
        assert srv.stop() == 0


def test_connections_beyond_the_limit_are_closed_when_accepted(onnx_model):
    srv = Server(onnx_model, "--max-connections", "3", "--keep-alive-s", "30")
    try:
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(6)]
        closed = [_closed_within(s, 0.5) for s in socks]
        assert 3 <= sum(closed) < 6, closed  # the readiness check's own connection may still count
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # the server sees the closes a moment later
            try:
                assert srv.raw("POST", "/v2/models/digits_cnn/infer", valid_body((1, 1, 8, 8)))[0] == 200
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        assert srv.stop() == 0


def test_ten_thousand_requests_at_64_clients(onnx_model, capsys):  # noqa: F811
    stats = load_test(onnx_model, requests=10000, clients=64)
    with capsys.disabled():
        print(f"\nload test: {stats}")
    assert stats["requests"] == 10000 and stats["failures"] == 0
    assert stats["rss_growth"] < 0.10
    assert np.isfinite(stats["p99_ms"])
