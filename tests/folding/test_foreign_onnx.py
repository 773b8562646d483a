"""ONNX files as other exporters write them (``tests/foreign.py``): weights in Constant nodes,
Identity/Cast/Unsqueeze/Reshape chains, split biases, symbolic dims, opsets 9 to 15. Each folds
every BN, passes the check on a correct fold and fails it on a corrupted one, and the folded file
agrees with the original at another height and width than the check's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import bnrt
from bnrt.folding.onnxconst import Constants, weight_sources
from bnrt.folding.onnxfold import fold_onnx
from bnrt.io.export import count_ops
from bnrt.io.data import InputSpec
from bnrt.verify.check import CheckOptions

from ..conftest import assert_one_line_error, assert_onnx_folds, bn_node, bn_params, onnx_graph, run_cli
from ..foreign import CASES, batchnorms, exporter_graph


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("style,opset", CASES)
def test_exporter_styles_fold_exactly_and_pass_the_check(tmp_path, style, opset):
    model = exporter_graph(style, opset)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    outcome = bnrt.fold_file(bnrt.ModelSource(path, input_shapes=[(1, 3, 16, 16)]), tmp_path / "out")
    assert [(d.rule, d.direction) for d in outcome.result.decisions] == [
        ("conv->bn", "backward"), ("convtranspose->bn", "backward"), ("bn->conv", "forward"), ("conv->bn", "backward"),
        ("matmul->bn", "backward"), ("gemm->bn", "backward")]
    assert outcome.passed and outcome.check.noise == "rounding" and outcome.check.noise_fallback is None
    for o in outcome.check.comparisons[0].outputs:  # a floor measured on Constant-node weights, and met
        assert o.criterion == "noise" and 0 < o.floor and o.error <= 8 * o.floor, o
    folded = onnx.load(str(tmp_path / "out" / "m.folded.onnx"))
    assert batchnorms(folded) == 0
    # every split bias joined its layer; the weights' Constant/Identity/Cast/Unsqueeze/Reshape chains are gone
    assert [n.op_type for n in folded.graph.node] == [
        "Conv", "Relu", "ConvTranspose", "Relu", "Conv", "Relu", "Conv", "Relu", "GlobalAveragePool", "Flatten",
        "MatMul", "Add", "Gemm", "Identity", "Identity"]
    assert all(len(n.input) == 3 for n in folded.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm"))
    x = np.random.default_rng(1).standard_normal((2, 3, 24, 20)).astype(np.float32)  # not the check's 16x16
    for before, after in zip(_run(model, x), _run(folded, x)):
        assert before.shape == after.shape
        assert np.abs(before - after).max() <= 1e-6 * np.abs(before).max()


def test_a_corrupted_fold_of_a_constant_node_model_fails_the_check(tmp_path):
    model = exporter_graph("paddle2onnx", 12)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    bnrt.fold_file(bnrt.ModelSource(path, input_shapes=[(1, 3, 16, 16)]), tmp_path / "out")
    folded = onnx.load(str(tmp_path / "out" / "m.folded.onnx"))
    weight = next(i for i in folded.graph.initializer if i.name.startswith("conv_") and len(i.dims) == 4)
    w = numpy_helper.to_array(weight).copy()
    w[0, 0, 0, 0] *= 1.01  # one weight off by 1 %
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(folded, str(bad))
    shapes = [(1, 3, 16, 16)]
    report = bnrt.check_files(bnrt.ModelSource(path, input_shapes=shapes), bnrt.ModelSource(bad, input_shapes=shapes),
                              CheckOptions(InputSpec(samples=4)))
    assert not report.passed and report.noise == "rounding"
    assert max(o.ratio for o in report.comparisons[0].outputs) > 8


def test_weight_sources_skip_exact_and_shaping_constants():
    """The noise floor re-rounds weights in any form, never a Pow exponent or Resize scales."""
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float16), "w16")
    nodes = [helper.make_node("Constant", [], ["wc"], value=w, name="wc"),
             helper.make_node("Cast", ["wc"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("Constant", [], ["two"], value_float=2.0, name="two"),
             helper.make_node("Pow", ["h", "two"], ["p"]),
             helper.make_node("Constant", [], ["s"], value_floats=[1.0, 1.0, 2.0, 2.0], name="s"),
             helper.make_node("Resize", ["p", "", "s"], ["r"], mode="nearest"),
             helper.make_node("Identity", ["k0"], ["k"]),
             helper.make_node("Mul", ["r", "k"], ["y"])]
    inits = [numpy_helper.from_array(np.float32([[[[0.5]], [[2.0]]]]), "k0")]
    graph = onnx_graph(nodes, inits, [1, 2, 4, 4], opset=13).graph
    sources = list(weight_sources(graph))
    assert [s if isinstance(s, str) else s.name for s in sources] == ["wc", "k0"]
    constants = Constants(graph)
    assert constants.value("w").dtype == np.float32 and constants.value("k").shape == (1, 2, 1, 1)
    assert constants.value("s").tolist() == [1.0, 1.0, 2.0, 2.0] and constants.value("h") is None


def test_a_graph_without_weights_is_judged_by_fixed_tolerances_saying_why(tmp_path):
    for name in ("a", "b"):
        onnx.save(onnx_graph([helper.make_node("Relu", ["x"], ["y"])], [], [2, 3]), str(tmp_path / f"{name}.onnx"))
    report = bnrt.check_files(tmp_path / "a.onnx", tmp_path / "b.onnx", CheckOptions(InputSpec(samples=4)))
    assert report.passed and report.noise is None
    assert report.noise_fallback == "no noise floor (the graph holds no float32 weight to re-round)"
    assert report.comparisons[0].outputs[0].criterion == "fixed"
    assert report.to_json()["noise_fallback"] == report.noise_fallback


def test_an_output_the_noise_run_leaves_unchanged_is_judged_by_fixed_tolerances(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "w")] + bn_params(3, rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "y"),
             helper.make_node("Relu", ["x"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    outcome = bnrt.fold_file(tmp_path / "m.onnx", tmp_path / "out")
    assert outcome.passed
    y, z = outcome.check.comparisons[0].outputs
    assert (y.criterion, z.criterion) == ("noise", "fixed") and y.floor > 0
    assert outcome.check.noise_fallback == "the noise run left 'z' unchanged (floor 0)"


def test_symbolic_dims_take_the_input_shape_for_planning():
    """An Expand to a shape the graph computes (x itself, as exporters write broadcasts): ONNX
    inference cannot tell the rank of what follows; the shapes come from a run at the given input
    shape."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 5, 5)).astype(np.float32), "w")] + bn_params(4, rng)
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Shape", ["s"], ["rank"]),
             helper.make_node("ConstantOfShape", ["rank"], ["ones"], value=numpy_helper.from_array(np.int64([1]))),
             helper.make_node("Expand", ["x", "ones"], ["x2"]),
             helper.make_node("Conv", ["x2", "w"], ["h"], name="conv"), bn_node("h", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    assert not any(vi.type.tensor_type.HasField("shape") for vi in inferred if vi.name == "h")
    # without input shapes free dims are taken as 2, where a 5x5 kernel cannot run: the shape stays unknown
    assert fold_onnx(model, "m").decisions[0].refusals[0].code == "unknown-shape"
    result = fold_onnx(model, "m", {"x": (1, 3, 16, 12)})
    assert [d.folded for d in result.decisions] == [True]
    x = rng.standard_normal((2, 3, 10, 14)).astype(np.float32)
    assert np.abs(_run(model, x)[0] - _run(result.model, x)[0]).max() <= 1e-5


@pytest.mark.parametrize("shape,fragment", [
    ("1,4,16,16", "--input-shape 1,4,16,16 contradicts input 'x': its dim 1 is fixed at 3 in the file (?,3,?,?)"),
    ("1,3,16", "--input-shape 1,3,16 has 3 dims, input 'x' has 4 (?,3,?,?)"),
])
def test_input_shape_contradicting_the_file_is_one_line(tmp_path, shape, fragment):
    onnx.save(exporter_graph("paddle2onnx", 11), str(tmp_path / "m.onnx"))
    proc = run_cli("fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--input-shape", shape)
    assert_one_line_error(proc, f"m.onnx: {fragment}")
    assert not (tmp_path / "out").exists()


def test_cli_folds_a_symbolic_onnx_file_with_input_shape(tmp_path):
    onnx.save(exporter_graph("tf2onnx", 13), str(tmp_path / "m.onnx"))
    proc = run_cli("fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "m.onnx: no input shape for x; pass --input-shape")
    proc = run_cli("fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--input-shape", "1,3,32,32")
    assert proc.returncode == 0, proc.stderr
    assert "6 BatchNorm: 6 folded, 0 skipped" in proc.stdout and "check passed" in proc.stdout
    proc = run_cli("inspect", str(tmp_path / "m.onnx"), "--input-shape", "1,3,32,32")
    assert proc.returncode == 0 and "6 BatchNorm: 6 folded" in proc.stdout


def test_a_rep_block_of_split_bias_convs_merges_into_one_conv():
    """RepVGG as paddle2onnx writes it: each branch a conv, its bias Add (constant first in one)
    and a BN, beside an identity BN on the graph input itself."""
    rng = np.random.default_rng(0)

    def const(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array.astype(np.float32), name))

    nodes = [const("w3", rng.standard_normal((4, 4, 3, 3))), const("w1", rng.standard_normal((4, 4, 1, 1))),
             const("b3", rng.standard_normal((1, 4, 1, 1))), const("b1", rng.standard_normal((1, 4, 1, 1))),
             helper.make_node("Conv", ["x", "w3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
             helper.make_node("Add", ["c3", "b3"], ["a3"]), bn_node("a3", "n3", prefix="bn3"),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Add", ["b1", "c1"], ["a1"]), bn_node("a1", "n1", prefix="bn1"),
             bn_node("x", "n0", prefix="bn0"), helper.make_node("Add", ["n3", "n1"], ["s"]),
             helper.make_node("Add", ["s", "n0"], ["s2"]), helper.make_node("Relu", ["s2"], ["y"])]
    inits = bn_params(4, rng, "bn3") + bn_params(4, rng, "bn1") + bn_params(4, rng, "bn0")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    result = fold_onnx(model, "m", {"x": (1, 4, 8, 8)})
    assert [(d.rule, d.direction) for d in result.decisions] == [("conv->bn", "backward"), ("conv->bn", "backward"),
                                                                 ("bn->rep", "merge")]
    assert [m.to_json() for m in result.merges] == [{"into": "conv3", "convs": ["conv1"], "bns": ["bn0"], "inputs": 0,
                                                     "scaled": False, "constant": False}]
    onnx.checker.check_model(result.model, full_check=True)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]
    x = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)
    before, after = _run(model, x)[0], _run(result.model, x)[0]
    assert np.abs(before - after).max() <= 1e-6 * np.abs(before).max()


@given(rank=st.sampled_from([1, 2, 3]), groups=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2), transpose=st.booleans(),
       own_bias=st.booleans(), form=st.sampled_from(["1C1", "C1", "scalar", "1"]), first=st.booleans(),
       as_node=st.booleans(), forward=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_a_split_bias_is_part_of_its_layer(rank, groups, cin_g, cout_g, kernel, stride, dilation, transpose, own_bias,
                                           form, first, as_node, forward, seed):
    """Conv/ConvTranspose -> Add(per-channel constant, either side, initializer or Constant node)
    -> BN folds backward, and BN -> Conv -> Add forward, into one node with its bias input."""
    rng = np.random.default_rng(seed)
    transpose = transpose and not forward  # BN -> ConvTranspose has no rule (yet)
    cin, cout = groups * cin_g, groups * cout_g
    w_shape = (cin, cout_g, *[kernel] * rank) if transpose else (cout, cin_g, *[kernel] * rank)
    shape = {"1C1": (1, cout, *[1] * rank), "C1": (cout, *[1] * rank), "scalar": (), "1": (1,)}[form]
    tensors = {"w": rng.standard_normal(w_shape), "c": rng.standard_normal(shape), "b": rng.standard_normal(cout)}
    nodes, inits = [], bn_params(cin if forward else cout, rng)
    for name, value in tensors.items():
        if as_node:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
                np.asarray(value, np.float32), name + "_t")))
        else:
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    inputs = ["xn" if forward else "x", "w", *(["b"] if own_bias else [])]
    if forward:
        nodes += [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "xn")]
    nodes.append(helper.make_node("ConvTranspose" if transpose else "Conv", inputs, ["h"], name="layer",
                                  group=groups, strides=[stride] * rank, dilations=[dilation] * rank))
    nodes.append(helper.make_node("Add", ["c", "h"] if first else ["h", "c"], ["y" if forward else "hb"]))
    if not forward:
        nodes.append(bn_node("hb", "y"))
    model = onnx_graph(nodes, inits, [2, cin, *[7] * rank], opset=13)
    result = assert_onnx_folds(model, {"x": rng.standard_normal((2, cin, *[7] * rank)).astype(np.float32)}, 1)
    op = "convtranspose" if transpose else "conv"
    assert result.decisions[0].rule == (f"bn->{op}" if forward else f"{op}->bn")
    assert [n.op_type for n in result.model.graph.node] == (["Relu"] if forward else []) + [op.capitalize().replace(
        "transpose", "Transpose")]
    assert len(result.model.graph.node[-1].input) == 3 and result.model.graph.node[-1].output[0] == "y"


def test_an_add_that_is_not_per_channel_is_no_bias():
    """(C,) added to (N, C, H, W) broadcasts along W: not a bias, the BN after it stays."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "c")] + bn_params(4, rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), helper.make_node("Add", ["h", "c"], ["hb"]),
             bn_node("hb", "y")]
    result = fold_onnx(onnx_graph(nodes, inits, [1, 2, 4, 4], opset=13))
    assert [r.code for r in result.decisions[0].refusals] == ["no-layer-before", "unused"] or \
        result.decisions[0].refusals[0].code == "no-layer-before"
    assert count_ops(result.model, "BatchNormalization") == 1


def test_a_shared_pow_exponent_is_not_re_rounded():
    """One constant 2.0 read by a Pow and a Mul (constants deduplicated): it keeps its value (the
    Pow of a negative value with 2.0000002 is NaN)."""
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]), helper.make_node("Mul", ["x", "two"], ["m"]),
             helper.make_node("Add", ["p", "m"], ["h"]), helper.make_node("Mul", ["h", "k"], ["y"])]
    inits = [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32([0.5, 3.0]), "k")]
    assert list(weight_sources(onnx_graph(nodes, inits, [3, 2], opset=13).graph)) == ["k"]


def _fixed_batch_model(path, nodes, inits, x_shape, y_shape):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_fixed_first_axis_is_planned_at_its_size_not_the_data_batch(tmp_path):
    """x is (2, 3, 1, 1) in the file; the Reshape to (2, -1) folds channel for channel only at
    that size (planned at batch 1 it would mix the two samples' channels)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.int64([2, -1]), "shape")] + bn_params(4, rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), helper.make_node("Reshape", ["h", "shape"], ["r"]),
             bn_node("r", "y")]
    _fixed_batch_model(tmp_path / "m.onnx", nodes, inits, [2, 3, 1, 1], [2, 4])
    outcome = bnrt.fold_file(tmp_path / "m.onnx", tmp_path / "out")
    assert outcome.passed and outcome.result.decisions[0].folded
    assert outcome.check.noise == "rounding" and outcome.check.noise_fallback is None


def test_a_fixed_batch_graph_gets_a_noise_floor_in_whole_batches(tmp_path):
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 1000)).astype(np.float32), "B")] + bn_params(1000, rng)
    nodes = [helper.make_node("Gemm", ["x", "B"], ["g"], name="gemm"), bn_node("g", "y")]
    _fixed_batch_model(tmp_path / "m.onnx", nodes, inits, [4, 8], [4, 1000])
    outcome = bnrt.fold_file(tmp_path / "m.onnx", tmp_path / "out")  # 1000 logits: 3 samples, run as one batch of 4
    assert outcome.passed and outcome.check.noise == "rounding" and outcome.check.noise_samples == 4
    assert outcome.check.comparisons[0].outputs[0].criterion == "noise"


def test_a_matmul_without_bias_merged_with_its_scale_is_a_valid_graph():
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "B"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), "k")]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["c"], name="mm"), helper.make_node("Mul", ["c", "k"], ["y"])]
    model = onnx_graph(nodes, inits, [2, 5], opset=13)
    result = fold_onnx(model)
    assert [m.to_json()["into"] for m in result.merges] == ["mm"]
    onnx.checker.check_model(result.model, full_check=True)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]
    x = {"x": rng.standard_normal((2, 5)).astype(np.float32)}
    before, after = (ort.InferenceSession(m.SerializeToString()).run(None, x)[0] for m in (model, result.model))
    assert np.abs(before - after).max() <= 1e-6 * np.abs(before).max()
