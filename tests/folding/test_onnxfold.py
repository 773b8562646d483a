"""Folding BatchNormalization in ONNX graphs: every rule and refusal on hand-built graphs, and
graphs from both torch exporters; outputs compared on ORT before and after."""

from __future__ import annotations

import json
import tempfile

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import bnrt
from bnrt.errors import HealthError
from bnrt.io.export import count_ops
from bnrt.folding.onnxfold import fold_onnx
from models.zoo import ZOO, build

from ..conftest import (EXAMPLE, F32, assert_one_line_error, assert_onnx_folds, bn_node, bn_params, onnx_graph,
                       report_schema, run_cli, typed_outputs)



@given(rank=st.sampled_from([1, 2, 3]), groups=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), bias=st.booleans(), transpose=st.booleans(),
       opset=st.sampled_from([9, 13, 15, 18, 21]), seed=st.integers(0, 2**31 - 1))
def test_conv_and_convtranspose_bn(rank, groups, cin_g, cout_g, kernel, stride, bias, transpose, opset, seed):
    rng = np.random.default_rng(seed)
    cin, cout = groups * cin_g, groups * cout_g
    w_shape = (cin, cout_g, *[kernel] * rank) if transpose else (cout, cin_g, *[kernel] * rank)
    inits = [numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w")] + bn_params(cout, rng)
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        inputs.append("b")
    layer = helper.make_node("ConvTranspose" if transpose else "Conv", inputs, ["h"], name="layer",
                             group=groups, strides=[stride] * rank)
    model = onnx_graph([layer, bn_node("h", "y")], inits, [2, cin, *[5] * rank], opset=opset)
    result = assert_onnx_folds(model, {"x": rng.standard_normal((2, cin, *[5] * rank)).astype(np.float32)}, 1)
    assert result.decisions[0].rule == ("convtranspose->bn" if transpose else "conv->bn")


@given(trans_a=st.booleans(), trans_b=st.booleans(), alpha=st.sampled_from([1.0, 0.5, 2.0]),
       beta=st.sampled_from([1.0, 0.25]), c=st.sampled_from(["none", "vector", "row", "full"]),
       forward=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gemm_bn_backward_and_forward(trans_a, trans_b, alpha, beta, c, forward, seed):
    rng = np.random.default_rng(seed)
    m, k, n = 4, 5, 3
    if forward:
        trans_a = False  # a BN on the input of a transposed Gemm is refused (tested below)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "B")] + bn_params(k if forward else n, rng)
    ins = ["a", "B"]
    c_shapes = {"vector": (n,), "row": (1, n), "full": (m, n)}
    if c != "none":
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shapes[c]).astype(np.float32), "C"))
        ins.append("C")
    a_shape = (k, m) if trans_a else (m, k)
    gemm = helper.make_node("Gemm", ins, ["g"] if not forward else ["y"], name="gemm", transA=int(trans_a),
                            transB=int(trans_b), alpha=alpha, beta=beta)
    if forward:
        nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "a"), gemm]
    else:
        nodes = [helper.make_node("Identity", ["x"], ["a"]), gemm, bn_node("g", "y")]
    model = onnx_graph(nodes, inits, list(a_shape))
    result = assert_onnx_folds(model, {"x": rng.standard_normal(a_shape).astype(np.float32)}, 1)
    assert result.decisions[0].rule == ("bn->gemm" if forward else "gemm->bn")


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("forward", [False, True])
def test_matmul_bn(with_add, forward):
    rng = np.random.default_rng(0)
    k, n = 5, 3
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")] + bn_params(k if forward else n, rng)
    nodes = []
    src = "x"
    if forward:
        nodes += [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "xn")]
        src = "xn"
    nodes.append(helper.make_node("MatMul", [src, "W"], ["mm"], name="mm"))
    last = "mm"
    if with_add:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c"))
        nodes.append(helper.make_node("Add", ["mm", "c"], ["mma"], name="add"))
        last = "mma"
    if forward:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    else:
        nodes.append(bn_node(last, "y"))
    model = onnx_graph(nodes, inits, [4, k])
    result = assert_onnx_folds(model, {"x": rng.standard_normal((4, k)).astype(np.float32)}, 1)
    assert result.decisions[0].rule == ("bn->matmul" if forward else "matmul->bn")
    assert count_ops(result.model, "Add") == 1  # the existing Add, or one added for the folded bias


@pytest.mark.parametrize("pads,mode,folds", [([0, 0, 0, 0], "NOTSET", True), ([1, 1, 1, 1], "NOTSET", False),
                                             (None, "VALID", True), (None, "SAME_UPPER", False)])
def test_bn_conv_forward_only_without_zero_padding(pads, mode, folds):
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")] + bn_params(3, rng)
    attrs = {"auto_pad": mode, **({"pads": pads} if pads else {})}
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Conv", ["n", "w"], ["y"], name="conv", **attrs)]
    model = onnx_graph(nodes, inits, [2, 3, 6, 6])
    if folds:
        assert_onnx_folds(model, {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}, 1)
    else:
        d = fold_onnx(model).decisions[0]
        assert d.codes == ("no-layer-before", "zero-padding"), d.reason
        assert d.refusals[1].subject == "conv" and "forward: 'conv' pads with zeros" in d.reason


def test_through_flatten_reshape_and_transpose():
    rng = np.random.default_rng(2)
    # BN2d -> Flatten -> Gemm (forward, channel repeated over H*W)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3 * 2 * 2)).astype(np.float32), "B")] + bn_params(3, rng)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "n"),
             helper.make_node("Flatten", ["n"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "B"], ["y"], name="gemm", transB=1)]
    result = assert_onnx_folds(onnx_graph(nodes, inits, [2, 3, 2, 2]), {"x": rng.standard_normal((2, 3, 2, 2)).astype(np.float32)}, 1)
    assert result.decisions[0].through == ("flat",)
    # MatMul on (N, L, C) -> Transpose to (N, C, L) -> BN (backward)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W")] + bn_params(5, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Transpose", ["h"], ["t"], name="tr", perm=[0, 2, 1]), bn_node("t", "y")]
    assert_onnx_folds(onnx_graph(nodes, inits, [2, 7, 4]), {"x": rng.standard_normal((2, 7, 4)).astype(np.float32)}, 1)
    # MatMul on (N, L, C) -> Reshape to (N*L, C) -> BN (backward)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([-1, 5], np.int64), "shape")] + bn_params(5, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["t"], name="rs"), bn_node("t", "y")]
    assert_onnx_folds(onnx_graph(nodes, inits, [2, 7, 4]), {"x": rng.standard_normal((2, 7, 4)).astype(np.float32)}, 1)
    # ... but a BN over the sequence axis of a MatMul is refused
    inits = [numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W")] + bn_params(7, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), bn_node("h", "y")]
    d = fold_onnx(onnx_graph(nodes, inits, [2, 7, 4])).decisions[0]
    assert d.status == "skipped" and d.reason.startswith("channels of 'mm' do not map one-to-one onto BN channels")


def test_parameters_from_constant_nodes_and_identity():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    params = bn_params(4, rng)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))]
    nodes += [helper.make_node("Constant", [], [p.name], value=p) for p in params[:2]]
    nodes += [helper.make_node("Identity", ["m0"], ["bn.mean"]), helper.make_node("Identity", ["v0"], ["bn.var"])]
    inits = [numpy_helper.from_array(numpy_helper.to_array(params[2]), "m0"),
             numpy_helper.from_array(numpy_helper.to_array(params[3]), "v0")]
    nodes += [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "y")]
    result = assert_onnx_folds(onnx_graph(nodes, inits, [1, 3, 4, 4]), {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}, 1)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]  # unused Constant/Identity pruned
    assert len(result.model.graph.initializer) == 2


def _conv_bn(rng, **bn_attrs):
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")] + bn_params(4, rng)
    return inits, helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_attrs


@pytest.mark.parametrize("case,codes,reason", [
    ("training", ("training-mode",), "in training mode (training_mode=1 or running-statistics outputs)"),
    ("extra outputs", ("training-mode",), "in training mode (training_mode=1 or running-statistics outputs)"),
    ("non-constant", ("not-constant",), "scale, bias, mean or variance is not a constant"),
    ("second consumer", ("shared-output", "no-layer-after"), "output of 'conv' also feeds Relu '"),
    ("graph output", ("shared-output", "no-layer-after"), "output of 'conv' also feeds the model output"),
])
def test_refusals(case, codes, reason):
    rng = np.random.default_rng(4)
    inits, conv, _ = _conv_bn(rng)
    outputs = [helper.make_tensor_value_info("y", F32, [2, 4, 4, 4])]
    inputs = [helper.make_tensor_value_info("x", F32, [2, 3, 4, 4])]
    bn = bn_node("h", "y")
    extra = []
    opset = 18
    if case == "training":
        bn = bn_node("h", "y", training_mode=1)
    elif case == "extra outputs":
        opset = 9
        bn = helper.make_node("BatchNormalization", list(bn.input), ["y", "rm", "rv", "sm", "sv"], name="bn")
    elif case == "non-constant":
        inits = [i for i in inits if i.name != "bn.scale"]
        inputs.append(helper.make_tensor_value_info("bn.scale", F32, [4]))
    elif case == "second consumer":
        extra = [helper.make_node("Relu", ["h"], ["h2"])]
        outputs.append(helper.make_tensor_value_info("h2", F32, [2, 4, 4, 4]))
    else:
        outputs.append(helper.make_tensor_value_info("h", F32, [2, 4, 4, 4]))
    graph = helper.make_graph([conv, bn, *extra], "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    result = fold_onnx(model)
    d = result.decisions[0]
    assert d.status == "skipped" and d.codes == codes and d.reason.startswith(reason), d.reason
    assert count_ops(result.model, "BatchNormalization") == 1


def test_negative_variance_is_a_health_error():
    rng = np.random.default_rng(5)
    inits, conv, _ = _conv_bn(rng)
    inits[-1] = numpy_helper.from_array(np.array([1, -1, 1, 1], np.float32), "bn.var")
    with pytest.raises(HealthError, match="BatchNormalization 'bn': var is negative"):
        fold_onnx(onnx_graph([conv, bn_node("h", "y")], inits, [2, 3, 4, 4]))


def test_external_data_model(tmp_path):
    rng = np.random.default_rng(6)
    inits, conv, _ = _conv_bn(rng)
    model = onnx_graph([conv, bn_node("h", "y")], inits, [2, 3, 4, 4])
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    outcome = bnrt.fold_file(tmp_path / "ext.onnx", tmp_path / "out")
    assert outcome.passed and outcome.onnx_batchnorm_nodes == 0
    folded = onnx.load(str(tmp_path / "out" / "ext.folded.onnx"))
    meta = {p.key: p.value for p in folded.metadata_props}
    assert meta["bn_folded"] == "1" and json.loads(meta["bnrt_folds"])[0]["into"] == ["conv"]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["resnet", "unet", "tabular", "token_mlp", "reid", "generator"])
def test_torch_exporters_zoo_models(tmp_path, exporter, name):
    model = build(name, batches=1)
    x = torch.randn(2, *ZOO[name].input_shape[1:])
    path = tmp_path / "m.onnx"
    if exporter == "torchscript":
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    else:
        bnrt.export_onnx(model, (x,), path, names=(["x"], ["y"]))
    original = onnx.load(str(path))
    feeds = {"x": torch.randn(3, *ZOO[name].input_shape[1:]).numpy()}
    result = assert_onnx_folds(original, feeds, count_ops(original, "BatchNormalization"))
    assert count_ops(result.model, "BatchNormalization") == 0


def test_cli_fold_onnx_writes_folded_onnx_and_report(tmp_path):
    rng = np.random.default_rng(7)
    inits, conv, _ = _conv_bn(rng)
    model = onnx_graph([conv, bn_node("h", "y")], inits, ["N", 3, 4, 4])
    model.metadata_props.add(key="author", value="me")
    onnx.save(model, str(tmp_path / "m.onnx"))
    proc = run_cli("fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.folded.onnx", "m.report.json"]
    report = json.loads((tmp_path / "out" / "m.report.json").read_text())
    assert report["summary"]["folded"] == 1 and report["check"]["passed"] and report["source"]["format"] == "onnx"
    folded = onnx.load(str(tmp_path / "out" / "m.folded.onnx"))
    assert {p.key: p.value for p in folded.metadata_props}["author"] == "me"


@pytest.mark.parametrize("case,fragment", [
    ("not onnx", "not a readable ONNX file"),
    ("invalid graph", "invalid ONNX graph"),
    ("unknown opset", "opset 99 is not supported"),
])
def test_bad_onnx_inputs_are_one_line_exit_2(tmp_path, case, fragment):
    path = tmp_path / "bad.onnx"
    if case == "not onnx":
        path.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    else:
        rng = np.random.default_rng(8)
        inits, conv, _ = _conv_bn(rng)
        nodes = [conv, bn_node("h", "y")]
        if case == "invalid graph":
            nodes.append(helper.make_node("Relu", ["undefined_value"], ["z"]))
        model = onnx_graph(nodes, inits, [2, 3, 4, 4], opset=99 if case == "unknown opset" else 18)
        onnx.save(model, str(path))
    proc = run_cli("fold", str(path), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "bad.onnx: " + fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("training,folds", [(None, True), (False, True), (True, False)])
def test_dropout_in_inference_passes_through_and_shape_reads_are_not_uses(training, folds):
    """Conv -> Dropout -> BN, the conv's output also read by Shape (metadata only)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")] + bn_params(4, rng)
    drop_inputs = ["h"] if training is None else ["h", "ratio", "train"]
    if training is not None:
        inits += [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
                  numpy_helper.from_array(np.array(training), "train")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
             helper.make_node("Shape", ["h"], ["s"], name="shape"),
             helper.make_node("Dropout", drop_inputs, ["d"], name="drop"), bn_node("d", "y")]
    model = onnx_graph(nodes, inits, [2, 3, 4, 4])
    if folds:
        result = assert_onnx_folds(model, {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}, 1)
        assert (result.decisions[0].rule, result.decisions[0].through) == ("conv->bn", ("drop",))
    else:
        assert fold_onnx(model).decisions[0].codes == ("no-layer-before", "no-layer-after")


def test_rep_blocks_merge_in_onnx_graphs():
    """TorchScript-exported RepNet: the exporter fuses conv -> BN; bnrt merges the branches and the
    identity BNs, leaving one Conv per block and no Add or BatchNormalization."""
    model = build("repnet", batches=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        torch.onnx.export(model, (x,), f"{tmp}/m.onnx", dynamo=False, input_names=["x"], output_names=["y"])
        proto = onnx.load(f"{tmp}/m.onnx")
    assert count_ops(proto, "BatchNormalization") == 3 and count_ops(proto, "Add") == 11
    result = assert_onnx_folds(proto, {"x": x.numpy()}, 3)
    assert [d.direction for d in result.decisions] == ["merge"] * 3
    assert (count_ops(result.model, "Conv"), count_ops(result.model, "Add")) == (5, 0)
    assert [m.to_json()["bns"] for m in result.merges] == [[], ["/blocks/blocks.1/identity/BatchNormalization"], [],
                                                           ["/blocks/blocks.3/identity/BatchNormalization"],
                                                           ["/blocks/blocks.4/identity/BatchNormalization"]]


@pytest.mark.parametrize("flags,named", [
    (["--opset", "17"], "--opset applies"), (["--exporter", "dynamo"], "--exporter applies"),
    (["--arch", "models.digits:DigitsNet"], "--arch applies"),
    (["--trust-code", "--opset", "18"], "--opset, --trust-code apply"),
])
def test_fold_onnx_refuses_torch_only_flags(tmp_path, flags, named):
    rng = np.random.default_rng(7)
    inits, conv, _ = _conv_bn(rng)
    path = tmp_path / "m.onnx"
    onnx.save(onnx_graph([conv, bn_node("h", "y")], inits, ["N", 3, 4, 4]), str(path))
    proc = run_cli("fold", str(path), "-o", str(tmp_path / "out"), *flags)
    assert_one_line_error(proc, f"m.onnx: {named} to torch checkpoints only; an ONNX file is folded as it is")
    assert not (tmp_path / "out").exists()


def test_fold_validates_top_k(tmp_path):
    proc = run_cli("fold", str(EXAMPLE), "-o", str(tmp_path / "out"), "--top-k", "0")
    assert_one_line_error(proc, "--top-k 0: must be positive")
    assert not (tmp_path / "out").exists()


def test_torchscript_digits_graph_folds_to_no_batchnorm(tmp_path):
    model = bnrt.load_model(EXAMPLE, trust_code=True).model
    path = tmp_path / "digits.onnx"
    bnrt.export_onnx(model, (torch.randn(2, 1, 8, 8),), path, names=(["x"], ["output"]), exporter="torchscript")
    graph = onnx.load(str(path))
    bns = [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1  # the exporter folds conv -> BN itself; fc -> fc_bn stays
    proc = run_cli("fold", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert count_ops(onnx.load(str(tmp_path / "out" / "digits.folded.onnx")), "BatchNormalization") == 0
    assert "BatchNormalization nodes in the folded ONNX: 0" in proc.stdout


# --- subgraphs: If/Loop bodies read outer values by name ---------------------------------------------

def _vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def _subgraph_model(nodes, inits, outputs):
    """``x`` [2, 3, 4, 4] in, ``outputs`` out (a Loop's [4]: ONNX infers no shape for it); the If
    condition ``c`` is computed from ``x`` (sum > 0), so the inputs of ``_feeds`` take both branches."""
    cond = [helper.make_node("ReduceSum", ["x"], ["xs"], keepdims=0),
            helper.make_node("Greater", ["xs", "zero"], ["c"])]
    inits = [*inits, numpy_helper.from_array(np.array(0, np.float32), "zero")]
    graph = helper.make_graph(cond + nodes, "g", [_vi("x", [2, 3, 4, 4])],
                              [_vi(o, [4] if o == "s" else None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return typed_outputs(model)


def _if(reads: str, out: str, then_op="Neg", else_op="Abs", name="if"):
    branches = {key: helper.make_graph([helper.make_node(op, [reads], [f"{out}.{key}"])], key, [],
                                       [_vi(f"{out}.{key}", None)])
                for key, op in (("then", then_op), ("else", else_op))}
    return helper.make_node("If", ["c"], [out], name=name, then_branch=branches["then"], else_branch=branches["else"])


def _feeds(seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32) + shift} for shift in (-2.0, 2.0)]


def test_a_conv_output_read_inside_an_if_branch_keeps_its_bn():
    """The If reads the conv output by name, not as a node input: a reader all the same, so folding
    the BN (which changes the conv's output) is refused like for a second consumer."""
    rng = np.random.default_rng(20)
    inits, conv, _ = _conv_bn(rng)
    nodes = [conv, bn_node("h", "y"), helper.make_node("Relu", ["y"], ["r"]), _if("h", "z")]
    model = _subgraph_model(nodes, inits, ["r", "z"])
    for feeds in _feeds(21):
        result = assert_onnx_folds(model, feeds, 0)
    d = result.decisions[0]
    assert d.codes == ("shared-output", "no-layer-after"), d.reason
    assert (d.refusals[0].subject, d.refusals[0].other) == ("conv", "if")
    assert d.reason.startswith("output of 'conv' also feeds a subgraph of If 'if'"), d.reason


def test_a_bn_output_read_inside_an_if_branch_keeps_its_name():
    """The BN folds backward; the If still finds the BN's output name (the conv now produces it)."""
    rng = np.random.default_rng(22)
    inits, conv, _ = _conv_bn(rng)
    nodes = [conv, bn_node("h", "y"), helper.make_node("Relu", ["y"], ["r"]), _if("y", "z")]
    model = _subgraph_model(nodes, inits, ["r", "z"])
    for feeds in _feeds(23):
        result = assert_onnx_folds(model, feeds, 1)
    assert result.decisions[0].rule == "conv->bn"
    assert [n.output[0] for n in result.model.graph.node if n.op_type == "Conv"] == ["y"]


def _loop(body_nodes, name="loop"):
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]), *body_nodes], "body",
                             [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("v_in", [4])],
                             [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", [4])])
    consts = [numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go"),
              numpy_helper.from_array(np.zeros(4, np.float32), "v0")]
    return helper.make_node("Loop", ["trips", "go", "v0"], ["s"], name=name, body=body), consts


@pytest.mark.parametrize("where", ["if", "loop", "nested"])
def test_bn_and_conv_tensors_read_inside_subgraphs_are_kept(where):
    """A body reading the BN's statistics or the conv's weight by name: the BN folds (into new
    initializers), the tensors the body reads stay, the others are pruned."""
    rng = np.random.default_rng(24)
    inits, conv, _ = _conv_bn(rng)
    nodes = [conv, bn_node("h", "y")]
    if where == "if":
        nodes.append(helper.make_node("If", ["c"], ["s"], name="if", then_branch=helper.make_graph(
            [helper.make_node("Add", ["bn.mean", "bn.var"], ["t"])], "then", [], [_vi("t", [4])]),
            else_branch=helper.make_graph([helper.make_node("Identity", ["bn.var"], ["e"])], "else", [], [_vi("e", [4])])))
        read = ["bn.mean", "bn.var"]
    elif where == "loop":
        loop, consts = _loop([helper.make_node("Add", ["v_in", "bn.scale"], ["v_out"])])
        nodes.append(loop)
        inits += consts
        read = ["bn.scale"]
    else:  # an If inside the Loop body reads the conv weight and a BN tensor; its axes are its own
        axes = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")
        then = helper.make_graph([helper.make_node("ReduceSum", ["w", "axes"], ["ws"], keepdims=0),
                                  helper.make_node("Add", ["v_in", "ws"], ["t"])], "then", [], [_vi("t", [4])], [axes])
        orelse = helper.make_graph([helper.make_node("Sub", ["v_in", "bn.bias"], ["e"])], "else", [], [_vi("e", [4])])
        loop, consts = _loop([helper.make_node("If", ["cond_in"], ["v_out"], then_branch=then, else_branch=orelse)])
        nodes.append(loop)
        inits += consts
        read = ["w", "bn.bias"]
    model = _subgraph_model(nodes, inits, ["y", "s"])
    for feeds in _feeds(25):
        result = assert_onnx_folds(model, feeds, 1)
    kept = {i.name for i in result.model.graph.initializer}
    assert set(read) <= kept and not {"bn.scale", "bn.bias", "bn.mean", "bn.var", "w"} - set(read) & kept


def test_a_bn_inside_a_subgraph_is_listed_and_refused(tmp_path):
    """A Conv -> BN inside an If branch is not folded (bnrt folds the main graph), but it is a
    BatchNorm of the model: inspect lists it, the fold report carries its code, the graph stays valid
    (its tensors are outer initializers, kept)."""
    rng = np.random.default_rng(26)
    inits, conv, _ = _conv_bn(rng)
    w2 = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w2")
    then = helper.make_graph([helper.make_node("Conv", ["x", "w2"], ["ci"], name="inner_conv"),
                              bn_node("ci", "t", prefix="inner")], "then", [], [_vi("t", None)])
    orelse = helper.make_graph([helper.make_node("Conv", ["x", "w2"], ["e"], name="else_conv")], "else", [],
                               [_vi("e", None)])
    nodes = [conv, bn_node("h", "y"), helper.make_node("If", ["c"], ["z"], name="if", then_branch=then,
                                                       else_branch=orelse)]
    model = _subgraph_model(nodes, [*inits, w2, *bn_params(4, rng, "inner")], ["y", "z"])
    for feeds in _feeds(27):
        result = assert_onnx_folds(model, feeds, 1)
    inner = result.decisions[1]
    assert [d.bn for d in result.decisions] == ["bn", "if/then_branch/inner"]
    assert inner.status == "skipped" and inner.codes == ("in-subgraph",)
    assert inner.reason == "inside the then_branch subgraph of If 'if': bnrt folds the main graph only"
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "if/then_branch/inner" in proc.stdout and "2 BatchNorm: 1 folded, 1 skipped" in proc.stdout
    proc = run_cli("fold", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "m.report.json").read_text())
    jsonschema.validate(report, report_schema("fold-1"))
    assert [r["code"] for d in report["decisions"] for r in d["refusals"]] == ["in-subgraph"]
    assert report["check"]["passed"]
