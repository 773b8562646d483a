"""Shared helpers and fixtures: the CLI as a user runs it, fold assertions for torch models and
hand-built ONNX graphs, the serving subprocess."""

from __future__ import annotations

import os

# `make test` runs two pytest-xdist workers on two cores. Each worker's torch (and every CLI subprocess it
# starts, through the environment) gets one intra-op thread: with torch's default of one thread per core
# in each worker, the OpenMP threads spin against the other worker, and a test of a thousand small folds
# ran 7x slower here and 25x slower on CI (a test timed out at 300 s).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import http.client
import json
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import settings
import torch
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnrt
from bnrt.io.export import count_ops
from bnrt.folding.onnxfold import fold_onnx
from tools import child_env

ROOT = Path(__file__).resolve().parents[1]

# Property tests of fold rules take their example count from the profile: `dev` for quick local runs,
# `thorough` (what `make test` and CI run: pytest --hypothesis-profile=thorough) at least 1,000 per
# rule, derandomised (the same examples on every run) and printing the blob that replays a failure.
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("dev")
if os.environ.get("PYTEST_XDIST_WORKER"):  # in case torch was imported before this file (a plugin)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_report_header(config):
    return (f"hypothesis profile {settings.get_current_profile_name()!r}: {settings().max_examples} examples per fold rule, "
            f"derandomize={settings().derandomize}")
EXAMPLE = ROOT / "models" / "digits_cnn.pt"


_TAKES_TRUST = {"fold", "check", "inspect", "calibrate", "bench", "quantize"}


def run_cli(*args: str, cwd: Path = ROOT, trust_code: bool = True) -> subprocess.CompletedProcess:
    """``python -m bnrt ARGS`` in a subprocess, as a user runs it. The test checkpoints name
    architectures in this repository (``models.*``, ``tests.nets``), code from the current folder:
    ``--trust-code`` is added where a command reads a ``.pt`` file, unless ``trust_code=False``
    (the tests of that consent)."""
    env = child_env()
    if trust_code and args and args[0] in _TAKES_TRUST and any(str(a).endswith(".pt") for a in args[1:]):
        args = (args[0], "--trust-code", *args[1:])
    return subprocess.run([sys.executable, "-m", "bnrt", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr containing every fragment, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def trusted(path: Path | str) -> bnrt.ModelSource:
    """A source whose checkpoint names an architecture in this repository (code from the current
    folder, which bnrt imports only with consent)."""
    return bnrt.ModelSource(Path(path), trust_code=True)


def save_checkpoint(path: Path, model: torch.nn.Module, arch: str | None, input_shape=None, **extra) -> Path:
    ckpt = {"state_dict": model.state_dict(), **extra}
    if arch is not None:
        ckpt["arch"] = arch
    if input_shape is not None:
        ckpt["input_shape"] = list(input_shape)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def example() -> Path:
    return EXAMPLE


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    """The digits test split (inputs ``x``, labels ``y``) as an .npz."""
    from models.digits import digits_split

    _, _, x, y = digits_split()
    path = tmp_path_factory.mktemp("data") / "digits_test.npz"
    np.savez(path, x=x, y=y)
    return path


def report_schema(name: str) -> dict:
    """A JSON schema shipped in bnrt/schemas (``check-3``, ``fold-1``, ``quantize-1``)."""
    return json.loads((Path(bnrt.__file__).parent / "schemas" / f"{name}.schema.json").read_text())


# --- folding torch models -------------------------------------------------------------------------

def randomise_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 2 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))


def assert_folds_exactly(model: nn.Module, x: torch.Tensor, expected_folded: int, tol: float = 1e-10):
    model = model.double().eval()
    x = x.double()
    result = bnrt.fold(model, (x,))
    assert [d.status for d in result.decisions].count("folded") == expected_folded, result.decisions
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())
    with torch.no_grad():
        ref, got = model(x), result.model(x)
    scale = max(1.0, float(ref.abs().max()))
    assert float((ref - got).abs().max()) <= tol * scale
    return result


# --- folding hand-built ONNX graphs ---------------------------------------------------------------

F32 = TensorProto.FLOAT


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def bn_params(c: int, rng, prefix="bn") -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}.{n}") for n, a in [
        ("scale", rng.standard_normal(c)), ("bias", rng.standard_normal(c)),
        ("mean", rng.standard_normal(c)), ("var", rng.random(c) + 0.1)]]


def bn_node(x: str, y: str, prefix="bn", **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{n}" for n in ("scale", "bias", "mean", "var")],
                            [y], name=prefix, **attrs)


def typed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give graph outputs the types shape inference finds (the checker wants a shape on them)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    inferred = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    for out in model.graph.output:
        if out.name in inferred:
            out.CopyFrom(inferred[out.name])
    return model


def onnx_graph(nodes, inits, x_shape, y_name="y", opset=18, inputs=None):
    graph = helper.make_graph(nodes, "g", inputs or [helper.make_tensor_value_info("x", F32, x_shape)],
                              [helper.make_tensor_value_info(y_name, F32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return typed_outputs(model) if opset <= onnx.defs.onnx_opset_version() else model


def assert_onnx_folds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], folded: int, tol: float = 1e-4):
    result = fold_onnx(model)
    assert sum(d.folded for d in result.decisions) == folded, result.decisions
    onnx.checker.check_model(result.model, full_check=True)
    assert count_ops(result.model, "BatchNormalization") == count_ops(model, "BatchNormalization") - folded
    before, after = run_onnx(model, feeds), run_onnx(result.model, feeds)
    for a, b in zip(before, after):
        assert a.shape == b.shape
        assert float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(a).max()))
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert result.model.opset_import == model.opset_import
    return result


# --- serving ---------------------------------------------------------------------------------------

def readline_within(stream, seconds: float) -> str:
    """The next line of ``stream``, or ``AssertionError`` after ``seconds`` (a hung child never
    hangs the test run)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=seconds)
    except queue.Empty:
        raise AssertionError(f"no line within {seconds} s") from None


class Server:
    """``bnrt serve TARGET --port 0`` in a subprocess; the port is read back from its first line."""

    def __init__(self, target: Path, *flags: str):
        env = child_env()
        self.log = tempfile.TemporaryFile("w+")  # stderr to a file: a full pipe would block the server
        self.proc = subprocess.Popen([sys.executable, "-m", "bnrt", "serve", str(target), "--port", "0", *flags],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        try:
            line = readline_within(self.proc.stdout, 120)
        except AssertionError:
            self.proc.kill()
            raise
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not found:
            self.proc.wait(timeout=20)
            self.log.seek(0)
            raise AssertionError((line, self.log.read()))
        self.port = int(found.group(1))
        self.url = f"127.0.0.1:{self.port}"
        if "--grpc-port" in flags:  # announced once the application has started it
            line = readline_within(self.proc.stdout, 120)
            found = re.search(r"gRPC \(KServe v2\) at 127\.0\.0\.1:(\d+)", line)
            assert found, line
            self.grpc_url = f"127.0.0.1:{found.group(1)}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpclient.InferenceServerClient(self.url).is_server_ready():
                    return
            except Exception:
                time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, data

    def metrics(self) -> dict[str, int]:
        """``GET /metrics`` as {'name{labels}': value}."""
        status, body = self.raw("GET", "/metrics")
        assert status == 200
        values = {}
        for line in body.decode().splitlines():
            if not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = int(value)
        return values

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.proc.stdout.close()
            self.log.close()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    outcome = bnrt.fold_file(trusted(EXAMPLE), out, check=None, exporter="torchscript")
    assert outcome.onnx_batchnorm_nodes == 0
    return out / "digits_cnn.onnx"

