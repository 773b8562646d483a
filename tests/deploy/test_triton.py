"""`bnrt triton` with what users ship: a model whose weights live in external data files."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnrt.session import Session
from bnrt.deploy.triton import write_repository

from ..conftest import assert_one_line_error, bn_node, bn_params, onnx_graph, run_cli


def _external(folder, location="weights/m.onnx.data"):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "y")]
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "w"), *bn_params(3, rng)]
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx_graph(nodes, inits, [None, 2, 4, 4]), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return folder / "m.onnx"


def test_the_repository_carries_the_models_external_data(tmp_path):
    src = _external(tmp_path / "src")
    proc = run_cli("triton", str(src), "-o", str(tmp_path / "repo"))
    assert proc.returncode == 0, proc.stderr
    version = tmp_path / "repo" / "m" / "1"
    assert sorted(p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file()) == [
        "model.onnx", "weights/m.onnx.data"]
    assert (version / "weights" / "m.onnx.data").read_bytes() == (tmp_path / "src" / "weights" / "m.onnx.data").read_bytes()
    x = np.random.default_rng(1).standard_normal((2, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(Session(version / "model.onnx").run([x])[0], Session(src).run([x])[0])


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    # onnx itself will not write such a location: move the data up and point the tensors at it
    src = _external(tmp_path / "src", "m.onnx.data")
    (tmp_path / "src" / "m.onnx.data").rename(tmp_path / "outside.data")
    model = onnx.load_model(str(src), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(model, str(src))
    proc = run_cli("triton", str(src), "-o", str(tmp_path / "repo"))
    assert_one_line_error(proc, "m.onnx: external data ../outside.data lies outside the model's folder")
    assert not (tmp_path / "repo").exists()


def test_a_repository_stands_without_the_source_folder(tmp_path):
    """Data beside the model (the usual ``location='m.onnx.data'``), through the library: the
    repository's model runs after the source folder is gone, with the source's outputs."""
    src = _external(tmp_path / "src", "m.onnx.data")
    x = np.random.default_rng(2).standard_normal((3, 2, 4, 4)).astype(np.float32)
    expected = Session(src).run([x])[0]
    target = write_repository(src, tmp_path / "repo", name="folded")
    shutil.rmtree(tmp_path / "src")
    assert sorted(p.name for p in (target / "1").iterdir()) == ["m.onnx.data", "model.onnx"]
    np.testing.assert_array_equal(Session(target / "1" / "model.onnx").run([x])[0], expected)


def test_a_missing_external_data_file_is_one_line(tmp_path):
    src = _external(tmp_path / "src", "m.onnx.data")
    (tmp_path / "src" / "m.onnx.data").unlink()
    proc = run_cli("triton", str(src), "-o", str(tmp_path / "repo"))
    assert_one_line_error(proc, "m.onnx: external data file ", "m.onnx.data is missing")
    assert not (tmp_path / "repo").exists()


def test_triton_options_are_written_with_tritons_schema_and_parse_back(tmp_path, onnx_model):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as schema

    from models.digits import digits_split

    _, _, x, _ = digits_split()
    np.savez(tmp_path / "d.npz", x=x[:3] * 2)
    proc = run_cli("triton", str(onnx_model), "-o", str(tmp_path / "repo"), "--name", "digits", "--max-batch", "16",
                   "--instances", "3", "--gpu", "--threads", "2", "--inter-threads", "1", "--preferred-batch-sizes",
                   "4,8", "--max-queue-delay-us", "500", "--tf32", "off", "--tensorrt", "--fp16",
                   "--warmup-data", str(tmp_path / "d.npz"))
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "repo" / "digits"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), schema.ModelConfig())
    group = config.instance_group[0]
    assert (group.count, group.kind) == (3, schema.ModelInstanceGroup.KIND_GPU)
    assert (list(config.dynamic_batching.preferred_batch_size), config.dynamic_batching.max_queue_delay_microseconds
            ) == ([4, 8], 500)
    assert {k: v.string_value for k, v in config.parameters.items()} == {"intra_op_thread_count": "2",
                                                                         "inter_op_thread_count": "1"}
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [(a.name, dict(a.parameters)) for a in accelerators] == [
        ("tensorrt", {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30)}),
        ("cuda", {"use_tf32": "0"})]
    (warmup,) = config.model_warmup
    assert (warmup.batch_size, list(warmup.inputs)) == (1, ["x"])
    given = warmup.inputs["x"]
    assert (schema.DataType.Name(given.data_type), list(given.dims), given.input_data_file) == ("TYPE_FP32", [1, 8, 8], "x")
    assert (folder / "warmup" / "x").read_bytes() == (x[:1] * 2).astype(np.float32).tobytes()


def test_triton_options_that_do_not_fit_are_one_line(tmp_path, onnx_model):
    cmd = ["triton", str(onnx_model), "-o", str(tmp_path / "repo")]
    assert_one_line_error(run_cli(*cmd, "--tensorrt"), "give --gpu too")
    assert_one_line_error(run_cli(*cmd, "--gpu", "--fp16"), "give --tensorrt too")
    assert_one_line_error(run_cli(*cmd, "--preferred-batch-sizes", "4,32"), "--preferred-batch-sizes 32",
                          "[1, max_batch 8]")
    assert_one_line_error(run_cli(*cmd, "--warmup-data", str(tmp_path / "none.npz")), "none.npz: no such data file")
    assert not (tmp_path / "repo" / "digits_cnn").exists()
