"""The fold engine, shared by both backends: its rule table, its health check, and the same
decisions from the torch capture and from the ONNX graph of one model."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import bnrt
from bnrt.folding import engine, foldmath
from bnrt.folding.weights import fold_weights, fp16_overflow
from bnrt.folding.capture import quiet
from bnrt.folding.rules import RULES
from bnrt.folding.view import BnStats
from bnrt.errors import HealthError
from bnrt.folding.onnxfold import fold_onnx
from models.zoo import ZOO, build

from ..conftest import F32, assert_folds_exactly, assert_onnx_folds, bn_node, bn_params, onnx_graph, randomise_bn


def test_rule_table_holds_each_placement_once():
    assert sorted(RULES) == [("backward", "conv"), ("backward", "conv-transpose"), ("backward", "linear"),
                             ("forward", "conv"), ("forward", "linear")]
    assert {key: rule.channel_axis for key, rule in RULES.items()} == {
        ("backward", "conv"): 1, ("backward", "conv-transpose"): 1, ("backward", "linear"): -1,
        ("forward", "conv"): 1, ("forward", "linear"): -1}


def test_rules_apply_the_fold_math():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6)
    s6, t6, s4, t4 = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(4), rng.standard_normal(4)
    for got, want in [
        (RULES[("backward", "conv")].fold(w, b, s6, t6, 2), foldmath.fold_backward(w, b, s6, t6)),
        (RULES[("forward", "conv")].fold(w, b, s4, t4, 2), foldmath.fold_forward_conv(w, b, s4, t4, 2)),
        (RULES[("backward", "conv-transpose")].fold(w[:4], None, s4, t4, 2),
         foldmath.fold_convtranspose_backward(w[:4], None, s4, t4, 2)),
    ]:
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def _stats(**changes) -> BnStats:
    base = dict(mean=np.zeros(3), var=np.ones(3), weight=np.ones(3), bias=np.zeros(3), eps=1e-5, label="BatchNorm 'b'")
    return BnStats(**{**base, **changes})


@pytest.mark.parametrize("changes,code,message", [
    ({"mean": np.array([0.0, np.nan, 0.0])}, "nonfinite-statistics", "BatchNorm 'b': running_mean holds NaN or Inf"),
    ({"bias": np.array([0.0, 0.0, np.inf])}, "nonfinite-statistics", "BatchNorm 'b': bias holds NaN or Inf"),
    ({"eps": float("nan")}, "nonfinite-statistics", "BatchNorm 'b': eps holds NaN or Inf"),
    ({"var": np.array([1.0, -1.0, 1.0])}, "negative-variance", "BatchNorm 'b': running_var is negative in some channels"),
    ({"var": np.array([1.0, -1.0, 1.0]), "fields": ("mean", "var", "scale", "bias"),
      "label": "BatchNormalization 'n'"}, "negative-variance", "BatchNormalization 'n': var is negative in some channels"),
    ({"var": np.array([1.0, 0.0, 0.0]), "eps": 0.0}, "zero-variance",
     "BatchNorm 'b': running_var + eps (0) is 0 in 2 channel(s), e.g. channel 1: the normalisation divides by zero"),
    ({"var": np.array([1.0, 1.0, -0.0]), "eps": 0.0}, "zero-variance",
     "BatchNorm 'b': running_var + eps (0) is 0 in 1 channel(s), e.g. channel 2: the normalisation divides by zero"),
])
def test_health_errors_name_the_bn_and_its_tensor(changes, code, message):
    with pytest.raises(HealthError) as err:
        engine.health(_stats(**changes))
    assert str(err.value) == message
    assert err.value.code == code


def test_health_warns_of_near_dead_channels_only():
    assert engine.health(_stats()) == ()
    (warning,) = engine.health(_stats(weight=np.array([1.0, 1.0, 5.0]), var=np.array([1.0, 1.0, 1e-6])))
    assert warning.startswith("1 near-dead channel(s) with |gamma/sigma| > 1000 (max 1.51e+03), e.g. channel 2")


def test_fp16_overflow_lists_layers_beyond_65504():
    exact = {"a": (None, np.array([1.0, -7e4]), np.zeros(2)), "b": (None, np.ones(2), np.array([6e4]))}
    assert fp16_overflow(exact) == {"a": 7e4}



def test_each_layer_is_handed_over_once_its_last_fold_is_done():
    """fold_weights holds a layer's float64 weights only between its first and last fold: the
    linear layer with a BN on each side is written once, after both, before the next layer is read,
    with both folds in it."""
    from bnrt.folding.capture import capture
    from bnrt.folding.torchfold import layer_weights
    from bnrt.folding.torchgraph import plan
    from bnrt.folding.torchops import statistics

    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 6),
                          nn.BatchNorm1d(6), nn.Linear(6, 3), nn.BatchNorm1d(3)).eval()
    gen = torch.Generator().manual_seed(0)
    for bn in model[0], model[2], model[5], model[7]:
        randomise_bn(bn, gen)
    planned = plan(capture(model, (torch.randn(2, 4),)))
    assert [(d.bn, d.direction, [t.layer for t in d.targets]) for d in planned.decisions] == [
        ("0", "forward", ["1"]), ("2", "backward", ["1"]), ("5", "backward", ["4"]), ("7", "backward", ["6"])]
    events, written = [], {}

    def read(layer):
        events.append(("read", layer.name))
        return layer_weights(model, layer)

    def write(name, layer, weight, bias):
        events.append(("write", name))
        written[name] = weight, bias

    overflow = fold_weights(planned, read, lambda d: statistics(model, d).scale_shift(), write)
    assert overflow == {} and events == [("read", "1"), ("write", "1"), ("read", "4"), ("write", "4"),
                                         ("read", "6"), ("write", "6")]
    w, b = (p.detach().double().numpy() for p in (model[1].weight, model[1].bias))
    forward = foldmath.fold_forward_linear(w, b, *statistics(model, planned.decisions[0]).scale_shift())
    both = foldmath.fold_backward(*forward, *statistics(model, planned.decisions[1]).scale_shift())
    np.testing.assert_array_equal(written["1"][0], both[0])
    np.testing.assert_array_equal(written["1"][1], both[1])

# --- one engine, two backends ---------------------------------------------------------------------

def _torchscript_onnx(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp, quiet():
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
        return onnx.load(str(path))


def _outcomes(decisions) -> collections.Counter:
    """Backend-neutral view of decisions: status, direction, layer kinds, refusal codes."""
    return collections.Counter((d.status, d.direction, tuple(t.kind for t in d.targets), d.codes) for d in decisions)


@pytest.mark.parametrize("name", ["tabular", "token_mlp", "generator", "preact"])
def test_torch_and_onnx_backends_decide_alike(name):
    """The TorchScript exporter fuses plain conv -> BN itself; every BN it leaves is decided by the
    ONNX backend as the torch backend decides it (same directions, layer kinds and refusal codes)."""
    model = build(name, batches=1)
    x = torch.randn(2, *ZOO[name].input_shape[1:], generator=torch.Generator().manual_seed(0))
    torch_decisions = bnrt.fold(model, (x,)).decisions
    onnx_decisions = fold_onnx(_torchscript_onnx(model, x)).decisions
    left = collections.Counter(_outcomes(onnx_decisions))
    assert left and left <= _outcomes(torch_decisions), (onnx_decisions, torch_decisions)
    if name != "preact":  # preact's conv -> BN pairs are fused by the exporter, its 4 refusals stay
        assert left == _outcomes(torch_decisions)
    else:
        assert sorted(d.codes for d in onnx_decisions) == [("no-layer-before", "no-layer-after")] * 3 + [
            ("shared-output", "no-layer-after")]


def test_conv_bn_bn_folds_both_into_the_conv_in_both_backends():
    bn1, bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn1, bn2)
    gen = torch.Generator().manual_seed(0)
    randomise_bn(bn1.double(), gen)
    randomise_bn(bn2.double(), gen)
    result = assert_folds_exactly(model, torch.randn(2, 3, 6, 6, dtype=torch.float64), 2)
    assert [(d.bn, d.rule, d.into) for d in result.decisions] == [("1", "conv->bn", ("0",)), ("2", "conv->bn", ("0",))]

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             *bn_params(4, rng, "bn1"), *bn_params(4, rng, "bn2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "h1", "bn1"),
             bn_node("h1", "y", "bn2")]
    folded = assert_onnx_folds(onnx_graph(nodes, inits, [2, 3, 6, 6]),
                               {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}, 2)
    assert [(d.bn, d.rule, d.into) for d in folded.decisions] == [("bn1", "conv->bn", ("conv",)),
                                                                  ("bn2", "conv->bn", ("conv",))]
    assert [n.op_type for n in folded.model.graph.node] == ["Conv"]


def test_a_folded_bn_with_another_reader_stops_the_next_fold():
    """conv -> bn1 -> bn2 where bn1's output is also a graph output: bn1 folds into the conv, bn2 must
    not (the graph output reads the conv's output)."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             *bn_params(4, rng, "bn1"), *bn_params(4, rng, "bn2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "h1", "bn1"),
             bn_node("h1", "y", "bn2")]
    model = onnx_graph(nodes, inits, [2, 3, 4, 4])
    model.graph.output.append(helper.make_tensor_value_info("h1", F32, [2, 4, 4, 4]))
    result = assert_onnx_folds(model, {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}, 1)
    assert [d.codes for d in result.decisions] == [(), ("shared-output", "no-layer-after")]
    assert result.decisions[1].refusals[0].subject == "bn1"
