"""bnrt quantize: INT8 and FP16 graphs of folded models, verified on real data within a budget."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnrt
from bnrt.errors import InputError
from bnrt.io.export import count_ops
from bnrt.pipeline.quantize import QuantizeOptions, quantize_file

from ..conftest import report_schema, EXAMPLE, assert_one_line_error, bn_node, bn_params, onnx_graph, run_cli, trusted

SCHEMA = report_schema("quantize-1")


def _producer(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_digits_example_quantizes_within_its_budget(digits_npz, tmp_path, precision):
    proc = run_cli("quantize", str(EXAMPLE), "--data", str(digits_npz), "--precision", precision,
                   "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"digits_cnn.{precision}.onnx", f"digits_cnn.{precision}.quantize.json"])
    report = json.loads((tmp_path / f"digits_cnn.{precision}.quantize.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["schema"] == "bnrt.quantize/1" and report["passed"] and report["samples"] == 360
    drop = 100 * (report["accuracy"]["float32"] - report["accuracy"][precision])
    assert report["accuracy"]["float32"] > 0.98
    assert drop <= (1.0 if precision == "int8" else 0.5)
    assert report["budget"] == {"kind": "accuracy drop (points)", "limit": 1.0, "value": pytest.approx(drop)}
    model = onnx.load(str(tmp_path / f"digits_cnn.{precision}.onnx"))
    assert count_ops(model, "BatchNormalization") == 0
    if precision == "int8":
        producer = _producer(model.graph)
        layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        assert len(layers) == 7  # five convs, the linear head (Gemm or MatMul) and the depthwise
        for node in layers:  # activation and weight both come through QuantizeLinear -> DequantizeLinear
            assert [producer[i].op_type for i in node.input[:2]] == ["DequantizeLinear"] * 2, node.name
        assert report["int8"]["format"] == "QDQ" and report["int8"]["calibration_samples"] == 256
    else:
        weights = {i for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") for i in n.input[1:2]}
        types = {t.name: t.data_type for t in model.graph.initializer}
        assert weights and all(types[w] == TensorProto.FLOAT16 for w in weights)
        assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]  # IO kept float32
        assert report["fp16"]["kept_float32"] == []
    out = bnrt.Session(tmp_path / f"digits_cnn.{precision}.onnx").run([np.load(digits_npz)["x"][:4]])
    assert out[0].shape == (4, 10) and out[0].dtype == np.float32


def _conv_bn_onnx(path, *, out_shape_4d=True, unfoldable=False, big=False, seed=0, batch="N"):
    """x (N, 3, 6, 6) -> Conv -> BN [-> Relu -> BN, which cannot fold] -> (4-d output, or GAP + Flatten)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * (3e4 if big else 1.0)
    inits = [numpy_helper.from_array(w, "w")] + bn_params(8, rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]), bn_node("h", "b")]
    last = "b"
    if unfoldable:
        inits += bn_params(8, rng, prefix="bn2")
        nodes += [helper.make_node("Relu", ["b"], ["r"], name="relu"), bn_node("r", "b2", prefix="bn2")]
        last = "b2"
    if out_shape_4d:
        nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    else:
        nodes += [helper.make_node("GlobalAveragePool", [last], ["p"], name="gap"),
                  helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    onnx.save(onnx_graph(nodes, inits, [batch, 3, 6, 6]), str(path))
    return path


def test_a_graph_with_a_fixed_batch_runs_in_batches_of_that_size(tmp_path):
    """Quantize feeds a fixed-batch graph whole batches (its label check included). Data that is not
    exactly one batch is not supported yet: the FP16 range probe and INT8 calibration feed other sizes."""
    model = _conv_bn_onnx(tmp_path / "m.onnx", out_shape_4d=False, batch=4)
    x = np.random.default_rng(3).standard_normal((4, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    outcome = quantize_file(model, tmp_path / "d.npz", tmp_path / "out", QuantizeOptions(precision="fp16"))
    assert outcome.passed and outcome.report["samples"] == 4 and outcome.report["top1_agreement"] == 1.0


def test_without_labels_the_output_must_be_logits(tmp_path):
    model = _conv_bn_onnx(tmp_path / "seg.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32))
    proc = run_cli("quantize", str(model), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "d.npz: no labels (y) in the data and the first output has shape (16, 8, 6, 6)")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_data_of_the_wrong_shape_is_one_line(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 8, 9), np.float32))
    proc = run_cli("quantize", str(EXAMPLE), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "d.npz: input 'x' has per-sample shape (1, 8, 9)")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_fp16_of_a_float16_model_is_refused(tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(_conv_bn_onnx(tmp_path / "m.onnx", out_shape_4d=False)))
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(tmp_path / "half.onnx"))
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 6, 6), np.float32))
    proc = run_cli("quantize", str(tmp_path / "half.onnx"), "--data", str(tmp_path / "d.npz"), "--precision", "fp16")
    assert_one_line_error(proc, "half.onnx: already has float16 tensors")


def test_an_unfoldable_batchnorm_is_quantized_with_a_warning(tmp_path):
    model = _conv_bn_onnx(tmp_path / "m.onnx", out_shape_4d=False, unfoldable=True)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((64, 3, 6, 6)).astype(np.float32),
             y=np.zeros(64, np.int64))
    proc = run_cli("quantize", str(model), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out"),
                   "--max-accuracy-drop", "100")
    assert proc.returncode == 0, proc.stderr
    assert "warning: BatchNorm 'bn2' is not folded and stays float32 between quantize/dequantize pairs" in proc.stdout
    report = json.loads((tmp_path / "out" / "m.int8.quantize.json").read_text())
    assert [k["bn"] for k in report["batchnorm_kept"]] == ["bn2"]


def test_fp16_keeps_out_of_range_nodes_in_float32(tmp_path):
    model = _conv_bn_onnx(tmp_path / "m.onnx", out_shape_4d=False, big=True)
    x = np.random.default_rng(2).standard_normal((32, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    outcome = quantize_file(model, tmp_path / "d.npz", tmp_path / "out",
                            QuantizeOptions(precision="fp16", max_disagreement=1.0))
    kept = outcome.report["fp16"]["kept_float32"]
    # the conv's folded weights reach ~1e5, and so do its outputs and everything after them
    assert [k["node"] for k in kept] == ["conv", "gap", "flat"] and "weight" in kept[0]["why"]
    graph = onnx.load(str(tmp_path / "out" / "m.fp16.onnx")).graph
    conv = next(n for n in graph.node if n.name == "conv")
    assert {t.name: t.data_type for t in graph.initializer}[conv.input[1]] == TensorProto.FLOAT
    # no float16 round trip between kept nodes: values beyond its range would become Inf/NaN there
    assert [n.op_type for n in graph.node if n.op_type == "Cast"] == []
    assert outcome.report["outputs"][0]["max_abs"] == 0.0 and outcome.report["top1_agreement"] == 1.0


def test_over_budget_writes_only_the_report_and_names_the_worst_layers(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()
    bnrt.export_onnx(net, (torch.randn(2, 3, 6, 6),), tmp_path / "m.onnx", names=(["x"], ["y"]))
    x = np.random.default_rng(3).standard_normal((400, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)  # no labels: the budget is top-1 disagreement
    proc = run_cli("quantize", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out"),
                   "--max-disagreement", "0", "--calibration-samples", "4")
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.int8.quantize.json"]
    report = json.loads((tmp_path / "out" / "m.int8.quantize.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert not report["passed"] and report["budget"]["kind"] == "top-1 disagreement" and report["budget"]["value"] > 0
    worst = report["worst_layers"]
    assert len(worst) == 3 and all(w["op"] in ("Conv", "Gemm", "MatMul") for w in worst)
    assert [w["sqnr_db"] for w in worst] == sorted(w["sqnr_db"] for w in worst)
    assert "worst layers by SQNR (exclude with --exclude NODE …): " + worst[0]["node"] in proc.stdout
    again = run_cli("quantize", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "-o",
                    str(tmp_path / "out2"), "--max-disagreement", "0", "--exclude", worst[0]["node"] + "_nope")
    assert_one_line_error(again, f"--exclude '{worst[0]['node']}_nope': no node of that name")


def test_no_data_flag_is_a_usage_error(tmp_path):
    proc = run_cli("quantize", str(EXAMPLE))
    assert proc.returncode == 2 and "--data" in proc.stderr


def test_library_options_are_validated():
    with pytest.raises(InputError, match="precision 'int4'"):
        QuantizeOptions(precision="int4")
    with pytest.raises(InputError, match="calibration_samples 0"):
        QuantizeOptions(calibration_samples=0)


def test_quantized_files_serve_and_get_triton_configs(digits_npz, tmp_path):
    outcome = quantize_file(trusted(EXAMPLE), digits_npz, tmp_path, QuantizeOptions(precision="fp16"))
    assert outcome.passed
    proc = run_cli("triton", str(tmp_path / "digits_cnn.fp16.onnx"), "-o", str(tmp_path / "repo"), "--name", "d")
    assert proc.returncode == 0, proc.stderr
    assert "TYPE_FP32" in (tmp_path / "repo" / "d" / "config.pbtxt").read_text()  # IO kept float32
    np.save(tmp_path / "x.npy", np.load(digits_npz)["x"][:3])
    proc = run_cli("run", str(tmp_path / "digits_cnn.fp16.onnx"), "--input", str(tmp_path / "x.npy"),
                   "-o", str(tmp_path / "o.npz"))
    assert proc.returncode == 0 and np.load(tmp_path / "o.npz")["output"].shape == (3, 10), proc.stderr


def test_quantize_onnx_refuses_torch_only_flags(tmp_path):
    model = _conv_bn_onnx(tmp_path / "m.onnx", out_shape_4d=False)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 6, 6), np.float32))
    proc = run_cli("quantize", str(model), "--data", str(tmp_path / "d.npz"), "--arch", "models.digits:DigitsNet")
    assert_one_line_error(proc, "m.onnx: --arch applies to torch checkpoints only")


def test_round_trip_casts_go_but_a_cast_a_subgraph_reads_stays():
    from bnrt.pipeline.quantize import _drop_round_trips

    F16 = TensorProto.FLOAT16
    body = lambda name: helper.make_graph([helper.make_node("Identity", ["a16"], [name])], name, [],  # noqa: E731
                                          [helper.make_tensor_value_info(name, F16, [2])])
    nodes = [helper.make_node("Cast", ["x"], ["a16"], to=F16, name="to16"),
             helper.make_node("Cast", ["a16"], ["y"], to=TensorProto.FLOAT, name="to32"),
             helper.make_node("If", ["c"], ["z"], then_branch=body("t"), else_branch=body("e"), name="if")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("z", F16, [2])])
    model = _drop_round_trips(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [(n.name, n.op_type, list(n.input)) for n in model.graph.node] == [
        ("to16", "Cast", ["x"]), ("to32", "Identity", ["x"]), ("if", "If", ["c"])]
    without_if = helper.make_graph(nodes[:2], "g", graph.input[:1], graph.output[:1])
    model = _drop_round_trips(helper.make_model(without_if, opset_imports=[helper.make_opsetid("", 17)]))
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == [("Identity", ["x"])]


def test_fp16_with_float16_inputs_and_outputs_is_verified_on_the_same_data(tmp_path):
    model = _conv_bn_onnx(tmp_path / "m.onnx", out_shape_4d=False)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(4).standard_normal((32, 3, 6, 6)).astype(np.float32))
    outcome = quantize_file(model, tmp_path / "d.npz", tmp_path / "out",
                            QuantizeOptions(precision="fp16", keep_io_types=False))
    graph = onnx.load(str(tmp_path / "out" / "m.fp16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert outcome.passed and outcome.report["top1_agreement"] == 1.0
    assert 0 < outcome.report["outputs"][0]["max_abs"] < 0.05 and outcome.report["outputs"][0]["problem"] is None
