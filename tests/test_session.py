"""The session layer: exactly the provider asked for, inputs validated, TF32 as asked, and the one
probe of intermediate values; `bnrt run`."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bnrt.errors import InputError, OptionError
from bnrt.io.export import export_onnx
from bnrt.session import Session, resolve_provider

from .conftest import EXAMPLE, assert_one_line_error, run_cli

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def linear_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "lin.onnx"
    torch.manual_seed(0)
    model = nn.Linear(3, 2).eval()
    export_onnx(model, (torch.randn(2, 3),), path, names=(["x"], ["y"]), exporter="torchscript")
    return path, model


def test_cpu_session_runs_and_reports_names(linear_onnx):
    path, model = linear_onnx
    session = Session(path, "cpu")
    assert session.session.get_providers() == ["CPUExecutionProvider"]
    assert (session.input_names, session.output_names) == (["x"], ["y"])
    x = np.ones((4, 3), np.float32)
    (y,) = session.run([x])
    np.testing.assert_allclose(y, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_an_error_not_a_cpu_run(linear_onnx):
    with pytest.raises(InputError, match=r"^provider cuda: CUDAExecutionProvider is not available"):
        Session(linear_onnx[0], "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_session_runs_on_cuda(linear_onnx):
    session = Session(linear_onnx[0], "cuda")
    assert session.session.get_providers()[0] == "CUDAExecutionProvider"


def test_unknown_provider_and_bad_file(tmp_path, linear_onnx):
    with pytest.raises(InputError, match="^provider 'tpu': choose one of cpu, cuda") as err:
        resolve_provider("tpu")
    assert err.value.as_flag() == "--provider 'tpu': choose one of cpu, cuda"  # what the CLI prints
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"bad.onnx: onnxruntime cannot load it"):
        Session(tmp_path / "bad.onnx")
    with pytest.raises(InputError, match=r"expects 1 input\(s\) \(x\), got 2"):
        Session(linear_onnx[0]).run([np.ones((1, 3), np.float32)] * 2)


def test_tf32_is_a_cuda_choice_and_an_error_elsewhere(tmp_path, linear_onnx):
    with pytest.raises(InputError) as err:
        Session(linear_onnx[0], "cpu", tf32=False)
    assert str(err.value) == "tf32 applies to the cuda provider only (provider is cpu)"
    assert Session(linear_onnx[0], "cpu").tf32 is None
    for args in (["fold", str(EXAMPLE), "-o", str(tmp_path / "f"), "--tf32", "on"],
                 ["check", str(EXAMPLE), str(EXAMPLE), "--tf32", "off", "--json", str(tmp_path / "r.json")],
                 ["run", str(linear_onnx[0]), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.npz"),
                  "--tf32", "off"]):
        proc = run_cli(*args)
        assert_one_line_error(proc, "--tf32 applies to the cuda provider only (provider is cpu)")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_tf32_sets_the_cuda_provider_option(linear_onnx):
    for tf32, expected in ((None, "1"), (True, "1"), (False, "0")):
        session = Session(linear_onnx[0], "cuda", tf32=tf32)
        assert session.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == expected


def _peak_rss_mb(*argv: str) -> tuple[int, int, str]:
    """Exit code and peak RSS (MB) of ``python -m bnrt ARGV`` run alone under a fresh parent."""
    import subprocess
    import sys

    from tools import child_env

    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); "
             "sys.stderr.write(p.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "bnrt", *argv], env=child_env(),
                          capture_output=True, text=True, timeout=600)
    code, peak = proc.stdout.split()
    return int(code), int(peak), proc.stderr


def test_run_batches_its_input_so_memory_does_not_grow_with_it(tmp_path):
    # 100,000 digits samples (26 MB of input): unbatched, the activations alone take several GB
    folded = tmp_path / "f"
    assert run_cli("fold", str(EXAMPLE), "-o", str(folded), "--no-check").returncode == 0
    x = np.random.default_rng(0).standard_normal((100_000, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, peak, err = _peak_rss_mb("run", str(folded / "digits_cnn.onnx"), "--input", str(tmp_path / "x.npy"),
                                   "-o", str(tmp_path / "y.npz"))
    assert code == 0, err
    assert peak < 1500, f"peak RSS {peak} MB"
    y = np.load(tmp_path / "y.npz")["output"]
    whole = Session(folded / "digits_cnn.onnx").run([x[:1000]])[0]
    assert y.shape == (100_000, 10) and np.array_equal(y[:1000], whole)
    code, _, err = _peak_rss_mb("run", str(folded / "digits_cnn.onnx"), "--input", str(tmp_path / "x.npy"),
                                "-o", str(tmp_path / "z.npz"), "--batch-size", "0")
    assert code == 2 and "--batch-size 0: must be positive" in err


def test_onnxruntime_errors_are_one_line_without_its_own_log(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    # a Reshape to 7 elements: onnxruntime fails at run time, logging the failure itself first
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([7], np.int64), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    import onnx

    onnx.save(model, str(tmp_path / "bad.onnx"))
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    proc = run_cli("run", str(tmp_path / "bad.onnx"), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz"))
    assert_one_line_error(proc, "bad.onnx:")
    assert "[E:onnxruntime" not in proc.stderr and "\x1b[" not in proc.stderr
    assert not (tmp_path / "y.npz").exists()


def test_probe_reads_intermediate_values_and_leaves_the_model_alone():
    from onnx import TensorProto, helper

    from bnrt.session import probe

    two, one = (onnx.numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((2.0, "two"), (1.0, "one")))
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["h"]), helper.make_node("Add", ["h", "one"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [two, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for inputs in ([x], {"x": x}):
        values = probe(model, ["h", "h"], inputs)
        assert sorted(values) == ["h", "y"]
        np.testing.assert_array_equal(values["h"], 2 * x)
        np.testing.assert_array_equal(values["y"], 2 * x + 1)
    assert [o.name for o in model.graph.output] == ["y"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(OptionError, match="cuda: CUDAExecutionProvider is not available"):
            probe(model, ["h"], [x], provider="cuda")
