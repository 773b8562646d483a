"""The per-layer comparison: fold partners and points, thinning, each point against its own noise
floor; what it catches that the outputs miss, for torch and ONNX references."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import bnrt
from bnrt.verify.check import CheckOptions, check_files
from bnrt.verify.localise import fold_points, partners
from bnrt.verify.metrics import thinned
from bnrt.verify.onnxside import value_folds
from models.zoo import ZOO, build

from ..conftest import bn_node, bn_params, onnx_graph


def test_fold_points_and_partners_from_fold_records():
    folds = [{"bn": "b1", "into": ["c1"], "direction": "backward", "through": ["view"], "functional": False},
             {"bn": "b2", "into": ["l2"], "direction": "forward", "through": ["drop"], "functional": False},
             {"bn": "act_bn", "into": ["c3"], "direction": "backward", "through": [], "functional": True},
             {"bn": "b4", "into": ["k4"], "direction": "backward", "through": [], "functional": False},
             {"bn": None, "into": ["k4", "p4"], "direction": "rep-block", "through": [], "functional": False}]
    skip, layer_of, stand_in = partners(folds)
    assert skip == {"view", "c1", "drop", "b2", "c3", "b4", "k4", "p4"}
    assert layer_of == {"b1": "c1", "act_bn": "c3"} and stand_in == {"b1": "c1"}
    assert fold_points(folds) == {"b1", "l2", "act_bn", "c1"} and fold_points([]) is None


def test_thinning_keeps_every_channel_and_strides_positions():
    assert thinned((2, 8, 64, 64), None) == () and thinned((2, 8, 4, 4), 1 << 16) == () and thinned((2, 9, 10**6), 4) == ()
    cut = thinned((2, 8, 64, 64), 8 * 16 * 16)  # 32768 per sample, 2048 wanted: stride 4 on each spatial axis
    assert cut == (slice(None), slice(None), slice(None, None, 4), slice(None, None, 4))
    assert np.zeros((2, 8, 64, 64))[cut].shape == (2, 8, 16, 16)


def _onnx_with_channel_scaled(src, dst, layer: str, eps: float) -> None:
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name in (f"{layer}.weight", f"{layer}.bias"):
            value = numpy_helper.to_array(init).copy()
            value[0] *= np.float32(1 + eps)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(model, str(dst))


@pytest.mark.parametrize("name", ["resnet", "mobilenetv3", "tabular", "repmixnet", "unet"])
def test_one_channel_off_by_1e3_is_caught_layer_by_layer_and_nothing_else_fails(name, tmp_path):
    """The unfolded model against bnrt's ONNX (as `bnrt check model.pt model.onnx`): passes, every
    module within noise; with one output channel of a middle folded layer scaled by 1.001 it fails
    at that layer, while the outputs alone pass on some of these models."""
    model = build(name)
    torch.save(model, tmp_path / "m.pt")
    source = bnrt.ModelSource(tmp_path / "m.pt", trust_pickle=True, input_shapes=[ZOO[name].input_shape])
    outcome = bnrt.fold_file(source, tmp_path / "out")
    assert outcome.passed and outcome.check.comparisons[0].layers.points > 0
    stored = {t.name for t in onnx.load(str(tmp_path / "out" / "m.onnx")).graph.initializer}
    layers = list(dict.fromkeys(t for d in outcome.result.decisions if d.folded and d.direction != "merge"
                                for t in d.into if f"{t}.weight" in stored))  # merged branches are gone
    middle = layers[len(layers) // 2]
    good = check_files(source, tmp_path / "out" / "m.onnx")
    assert good.passed and good.comparisons[0].layers.failed == 0 and good.comparisons[0].layers.margin < 1
    _onnx_with_channel_scaled(tmp_path / "out" / "m.onnx", tmp_path / "bad.onnx", middle, 1e-3)
    bad = check_files(source, tmp_path / "bad.onnx")
    (comparison,) = bad.comparisons
    assert not bad.passed and comparison.layers.failed >= 1 and comparison.divergence is not None
    assert middle in (comparison.divergence.module, comparison.divergence.layer) or comparison.layers.failed > 1
    outputs_only = check_files(source, tmp_path / "bad.onnx", CheckOptions(per_layer=False))
    assert outputs_only.comparisons[0].layers is None
    assert outputs_only.passed == all(o.passed for o in comparison.outputs)


def _conv_bn_matmul_graph(rng) -> onnx.ModelProto:
    """x -> Conv -> BN (backward) -> Relu -> BN -> Flatten -> MatMul + Add (forward)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "b", "bn1"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"), bn_node("r", "n", "bn2"),
             helper.make_node("Flatten", ["n"], ["f"], name="flat"), helper.make_node("MatMul", ["f", "m"], ["p"],
                                                                                    name="mm"),
             helper.make_node("Add", ["p", "a"], ["y"], name="bias")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             *bn_params(4, rng, "bn1"), *bn_params(4, rng, "bn2"),
             numpy_helper.from_array(rng.standard_normal((4 * 4 * 4, 5)).astype(np.float32), "m"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "a")]
    model = onnx_graph(nodes, inits, ("N", 3, 6, 6))
    return model


def test_value_folds_name_the_values_a_folded_graph_keeps():
    model = _conv_bn_matmul_graph(np.random.default_rng(0))
    folds = [{"bn": "bn1", "into": ["conv"], "direction": "backward", "through": [], "functional": False},
             {"bn": "bn2", "into": ["mm"], "direction": "forward", "through": ["flat"], "functional": False}]
    assert value_folds(model, folds) == [
        {"bn": "b", "into": ["c"], "direction": "backward", "through": ["c"], "functional": False},
        {"bn": "n", "into": ["y"], "direction": "forward", "through": ["f", "p"], "functional": False}]
    skip, _, stand_in = partners(value_folds(model, folds))
    assert skip == {"c", "n", "f", "p"} and stand_in == {"b": "c"}
    assert fold_points(value_folds(model, folds)) == {"b", "y", "c"}


def test_an_onnx_fold_is_compared_value_by_value_and_a_corrupted_one_fails(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "g.onnx"
    onnx.save(_conv_bn_matmul_graph(rng), str(path))
    outcome = bnrt.fold_file(path, tmp_path / "out")
    (comparison,) = outcome.check.comparisons
    assert outcome.passed and comparison.layers.points == 2 and comparison.layers.failed == 0
    folded = onnx.load(str(tmp_path / "out" / "g.folded.onnx"))
    for init in folded.graph.initializer:  # the conv bnrt wrote: channel 2 off by 1e-3
        if init.name.startswith("conv.weight"):
            value = numpy_helper.to_array(init).copy()
            value[2] *= np.float32(1.001)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(folded, str(tmp_path / "bad.onnx"))
    bad = check_files(path, tmp_path / "bad.onnx")
    (comparison,) = bad.comparisons
    assert not bad.passed and comparison.layers.failed >= 1 and comparison.divergence.module == "b"
    # another graph's fold (its source_sha256 is not this file's) is compared at the outputs only
    other = tmp_path / "other.onnx"
    onnx.save(_conv_bn_matmul_graph(rng), str(other))
    assert check_files(other, tmp_path / "out" / "g.folded.onnx").comparisons[0].layers is None


def test_a_model_from_bnrt_fold_carries_its_folds_into_a_check():
    """`bnrt.check(model, [bnrt.fold(model).model])` compares at the fold points; a model folded by
    another tool is compared at its outputs only (its folded convs output what their BNs did)."""
    model = build("resnet")
    x = torch.randn(2, *ZOO["resnet"].input_shape[1:])
    result = bnrt.fold(model, (x,))
    data = bnrt.make_inputs(bnrt.InputSpec(samples=8), ["x"], [ZOO["resnet"].input_shape])
    report = bnrt.check(model, [result.model, result.structured], data)
    assert report.passed and [c.layers.points for c in report.comparisons] == [20, 20]
    del result.model.bnrt_folded  # folded by someone else: compared at the outputs only (its layers differ)
    unknown = bnrt.check(model, [result.model], data)
    assert unknown.passed and unknown.comparisons[0].layers is None
