"""The weight certificate: folded weights against an independent float64 recomputation of the fold,
within half an ULP of their stored dtype; and what it catches."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import helper, numpy_helper
from torch import nn

import bnrt
from bnrt.folding.capture import capture
from bnrt.folding.onnxfold import fold_onnx
from bnrt.folding.torchfold import apply, layer_weights, stored_weights
from bnrt.folding.torchgraph import plan
from bnrt.folding.torchops import statistics
from bnrt.verify.certify import ChannelMap, certify, ulp_distance
from models.zoo import ZOO, build

from ..conftest import bn_node, bn_params, onnx_graph, randomise_bn, report_schema


def channel_index(kind: str, shape: tuple[int, ...], groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference ``ChannelMap`` is tested against, with index arrays: for every element of a
    weight shaped ``shape``, the output channel it contributes to and the absolute input channel it
    reads."""
    first, second = (np.broadcast_to(a.reshape(a.shape + (1,) * (len(shape) - 2)), shape)
                     for a in np.indices(shape[:2]))
    if kind == "linear":
        return first, second
    group = first // (shape[0] // groups)
    if kind == "conv":
        return first, group * shape[1] + second
    return group * shape[1] + second, first  # conv-transpose


def _certificate(model: nn.Module, x: torch.Tensor, folded_model=None, original=None):
    """Capture, plan and fold ``model``; certify the folded model (or ``folded_model``) against
    ``original`` (default: ``model``)."""
    cap = capture(model, (x,))
    planned = plan(cap)
    result = apply(model, planned, cap)
    original = model if original is None else original
    held = result.model if folded_model is None else folded_model(result.model)
    return certify(planned, lambda layer: layer_weights(original, layer), lambda d: statistics(original, d),
                   lambda layer: stored_weights(held, layer)), result


def test_channel_index_of_grouped_conv_and_transposed_conv():
    out, inp = channel_index("conv", (4, 3, 1), groups=2)  # Cout 4, Cin 6: two groups of 2 outputs, 3 inputs
    assert out[:, :, 0].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]
    assert inp[:, :, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    out, inp = channel_index("conv-transpose", (4, 3, 1), groups=2)  # Cin 4, Cout 6
    assert inp[:, :, 0].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]]
    assert out[:, :, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    out, inp = channel_index("linear", (2, 3), groups=1)
    assert out.tolist() == [[0, 0, 0], [1, 1, 1]] and inp.tolist() == [[0, 1, 2], [0, 1, 2]]


@given(kind=st.sampled_from(["conv", "conv-transpose", "linear"]), groups=st.integers(1, 4), a=st.integers(1, 3),
       b=st.integers(1, 4), kernel=st.lists(st.integers(1, 3), max_size=3), seed=st.integers(0, 2**16))
def test_the_channel_map_scales_and_sums_as_the_channel_index_says(kind, groups, a, b, kernel, seed):
    """``ChannelMap`` (broadcast views, what the certificate runs) against ``channel_index``'s
    index arrays: the same scaled weights exactly, and per-output sums up to the summation order."""
    groups = 1 if kind == "linear" else groups
    shape = (groups * a, b) if kind == "linear" else (groups * a, b, *kernel)
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape)
    out, inp = channel_index(kind, shape, groups)
    outputs, inputs = int(out.max()) + 1, int(inp.max()) + 1
    v_out, v_in = rng.standard_normal(outputs), rng.standard_normal(inputs)
    channels = ChannelMap(kind, shape, groups)
    np.testing.assert_array_equal(channels.times(weight, v_out, "out"), weight * v_out[out])
    np.testing.assert_array_equal(channels.times(weight, v_in, "in"), weight * v_in[inp])
    np.testing.assert_allclose(channels.out_sums(weight, v_in),
                               np.bincount(out.ravel(), (weight * v_in[inp]).ravel(), minlength=outputs),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 18])
def test_the_worst_element_is_the_same_measured_in_chunks(monkeypatch, chunk):
    """``_worst`` measures a chunk at a time: the same element as one pass over all of them (the
    worst failing one, else the worst; the first of equals), across chunk boundaries."""
    from bnrt.verify import certify as module

    monkeypatch.setattr(module, "CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    for trial in range(40):
        exact = rng.standard_normal((3, 4)) * 10.0 ** rng.integers(-3, 3)
        exact.flat[7] = exact.flat[2]  # equal values: the first of equals is the answer
        stored = exact.astype(np.float32)
        for at in rng.choice(12, size=int(rng.integers(0, 3)), replace=False):  # some elements off by ULPs
            stored.flat[at] = np.nextafter(stored.flat[at], np.float32(np.inf) if trial % 2 else np.float32(0))
        if trial % 3 == 0:
            stored.flat[7] = stored.flat[2]
        ulps, ok = ulp_distance(stored, exact, np.abs(exact), 1)
        at = int(np.argmax(ulps if ok.all() else np.where(ok, -np.inf, ulps)))
        expected = (float(ulps.flat[at]), f"w[{', '.join(map(str, np.unravel_index(at, ulps.shape)))}]", bool(ok.all()))
        assert module._worst("w", stored, exact, np.abs(exact), 1) == expected


def test_ulp_distance_is_measured_in_the_gap_around_the_exact_value():
    exact = np.array([1.0 + 2.0 ** -24, 1.0 - 2.0 ** -26, 3.0])  # a float32 tie; just below 1; representable
    stored = exact.astype(np.float32)
    ulps, ok = ulp_distance(stored, exact, np.abs(exact), terms=1)
    # the tie is half the gap above 1 (2^-23); below 1 the gap is 2^-24, and 1 - 2^-26 rounds to 1
    assert ulps.tolist() == [0.5, 0.25, 0.0] and ok.all()
    nudged = np.nextafter(stored, np.float32(np.inf))
    ulps, ok = ulp_distance(nudged, exact, np.abs(exact), terms=1)
    assert ulps.tolist() == [0.5, 2.25, 1.0] and ok.tolist() == [True, False, False]
    half = np.array([1.0]), np.array([np.float16(1.0)])
    ulps, ok = ulp_distance(half[1], half[0] + 2.0 ** -11, np.ones(1), terms=1)  # float16 gap at 1: 2^-10
    assert ulps.tolist() == [0.5] and ok.all()



@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ulp_distance_at_the_ends_of_the_range(dtype):
    """Zero and the subnormals: the smallest subnormal apart; the largest finite value: the gap below
    it (one step down from it is 1 ULP, not 0); and exactly as np.spacing says across the range."""
    info = np.finfo(dtype)
    tiny, top = float(info.smallest_subnormal), float(info.max)
    exact = np.array([0.0, tiny, 3 * tiny, float(info.tiny), top])
    stored = np.nextafter(exact.astype(dtype), dtype(0)) + np.array([tiny, 0, 0, 0, 0], dtype)
    ulps, ok = ulp_distance(stored, exact, np.abs(exact), terms=1)
    assert ulps.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0] and not ok.any()
    rng = np.random.default_rng(0)
    exact = rng.standard_normal(4096) * 2.0 ** rng.integers(info.minexp - info.nmant, info.maxexp - 1, 4096)
    stored = exact.astype(dtype)
    below = np.where(np.abs(stored.astype(np.float64)) > np.abs(exact), np.nextafter(np.abs(stored), dtype(0)),
                     np.abs(stored))
    ulps, ok = ulp_distance(stored, exact, np.abs(exact), terms=1)
    np.testing.assert_array_equal(ulps, np.abs(stored.astype(np.float64) - exact) / np.spacing(below))
    assert ok.all() and ulps.max() <= 0.5

@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_fold_is_certified_within_half_an_ulp(name):
    model = build(name)
    x = torch.randn(2, *ZOO[name].input_shape[1:], generator=torch.Generator().manual_seed(0))
    certificate, result = _certificate(model, x)
    assert certificate.passed, certificate.summary()
    assert all(c.worst_ulp <= 0.5 + 1e-6 for c in certificate.layers), certificate.summary()
    folded_layers = {t for d in result.decisions if d.folded for t in d.into} | {m.target.name for m in result.merges}
    assert folded_layers <= {c.layer for c in certificate.layers}


def _nudge(model: nn.Module, layer: str, index: tuple, ulps: int = 2) -> nn.Module:
    model = copy.deepcopy(model)
    weight = model.get_submodule(layer).weight
    with torch.no_grad():
        value = weight[index].float().numpy()
        for _ in range(ulps):
            value = np.nextafter(value, np.float32(np.inf))
        weight[index] = torch.tensor(value)
    return model


@pytest.mark.parametrize("name, layer", [("resnet", "layers.4.conv1"), ("repnet", "blocks.1.kxk.0.0"),
                                         ("unet", "up2"), ("token_mlp", "fc2")])
def test_two_ulps_on_one_element_fail_the_certificate_and_name_it(name, layer):
    model = build(name)
    x = torch.randn(2, *ZOO[name].input_shape[1:], generator=torch.Generator().manual_seed(0))
    index = (1,) + (0,) * (model.get_submodule(layer).weight.dim() - 1)
    certificate, _ = _certificate(model, x, folded_model=lambda m: _nudge(m, layer, index))
    assert not certificate.passed
    (bad,) = certificate.failed
    assert bad.layer == layer and bad.where == f"weight[{', '.join(map(str, index))}]"
    assert 1.5 <= bad.worst_ulp <= 2.5
    assert f"'{layer}'" in certificate.summary() and "not the exact fold" in certificate.summary()


def test_a_fold_with_another_eps_is_not_certified():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3)).eval()
    randomise_bn(model[1], torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[1].running_var.mul_(1e-3)  # eps matters: var ~ eps
    wrong = copy.deepcopy(model)
    wrong[1].eps = 1e-5  # what a fold that used torch's default eps computes
    certificate, _ = _certificate(wrong, torch.randn(2, 3, 8, 8), original=model)
    assert not certificate.passed and certificate.failed[0].layer == "0"
    assert certificate.failed[0].worst_ulp > 1e3


@st.composite
def _layers(draw):
    kind = draw(st.sampled_from(["conv", "convtranspose", "linear", "bn-conv", "bn-linear"]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    if kind == "conv":
        layers = [nn.Conv2d(cin, cout, k, stride, dilation=dilation, groups=groups, bias=bias), nn.BatchNorm2d(cout)]
    elif kind == "convtranspose":
        layers = [nn.ConvTranspose2d(cin, cout, k, stride, dilation=dilation, groups=groups, bias=bias),
                  nn.BatchNorm2d(cout)]
    elif kind == "bn-conv":  # forward: no zero padding
        layers = [nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, k, stride, dilation=dilation, groups=groups, bias=bias)]
    elif kind == "linear":
        layers = [nn.Flatten(), nn.Linear(cin * 64, cout, bias=bias), nn.BatchNorm1d(cout)]
    else:  # forward through a flatten: the scale repeats over positions
        layers = [nn.BatchNorm2d(cin), nn.Flatten(), nn.Linear(cin * 64, cout, bias=bias)]
    return nn.Sequential(*layers).eval(), cin, seed


@settings(max_examples=40, deadline=None)
@given(_layers())
def test_certificate_agrees_with_every_fold_rule_and_catches_one_ulp_more(case):
    model, cin, seed = case
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomise_bn(m, gen)
    x = torch.randn(2, cin, 8, 8, generator=gen)
    certificate, result = _certificate(model, x)
    assert len(result.folded) == 1 and certificate.passed, certificate.summary()
    (entry,) = certificate.layers
    assert entry.worst_ulp <= 0.5 + 1e-6
    bad, _ = _certificate(model, x, folded_model=lambda m: _nudge(m, entry.layer, (0,) * m.get_submodule(
        entry.layer).weight.dim(), ulps=1))
    assert bad.layers[0].worst_ulp > 0.5  # one ULP from the correctly rounded value is past half an ULP
    assert not bad.passed or bad.layers[0].worst_ulp <= 0.5 + 1e-3  # only an exact tie may still pass


def test_onnx_fold_certificate_reads_back_the_written_initializers(tmp_path):
    """Conv -> BN (backward) and BN -> Flatten -> MatMul (forward, the weight stored transposed)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "b", "bn1"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"), bn_node("r", "n", "bn2"),
             helper.make_node("Flatten", ["n"], ["f"], name="flat"), helper.make_node("MatMul", ["f", "m"], ["y"],
                                                                                    name="mm")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             *bn_params(4, rng, "bn1"), *bn_params(4, rng, "bn2"),
             numpy_helper.from_array(rng.standard_normal((4 * 4 * 4, 5)).astype(np.float32), "m")]
    model = onnx_graph(nodes, inits, (1, 3, 6, 6))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    outcome = bnrt.fold_file(path, tmp_path / "out")
    cert = outcome.report["check"]["certificate"]
    assert cert["passed"] and cert["layers"] == 2 and cert["failed"] == [] and cert["worst_ulp"] <= 0.5 + 1e-6
    result = fold_onnx(model)
    assert set(result.written) == {"conv", "mm"} and result.written["mm"][2]  # MatMul: [in, out] stored
    tensors = {t.name: t for t in result.model.graph.initializer}
    for layer, index in (("conv", 2), ("mm", 3)):
        name = result.written[layer][1]
        saved = onnx.TensorProto()
        saved.CopyFrom(tensors[name])
        bias = numpy_helper.to_array(tensors[name]).copy()
        bias[index] = np.nextafter(np.nextafter(bias[index], np.float32(np.inf)), np.float32(np.inf))
        tensors[name].CopyFrom(numpy_helper.from_array(bias, name))
        bad = certify(result.plan, lambda layer: (layer.data.weight, layer.data.bias),
                      lambda d: result.statistics[id(d)], result.stored)
        assert [(c.layer, c.where) for c in bad.failed] == [(layer, f"bias[{index}]")]
        tensors[name].CopyFrom(saved)


def test_fold_report_carries_the_certificate(tmp_path):
    model = build("resnet")
    torch.save(model, tmp_path / "m.pt")
    outcome = bnrt.fold_file(bnrt.ModelSource(tmp_path / "m.pt", trust_pickle=True, input_shapes=[(1, 3, 32, 32)]),
                             tmp_path / "out")
    check = json.loads((tmp_path / "out" / "m.report.json").read_text())["check"]
    import jsonschema
    jsonschema.validate(check, report_schema("check-3"))
    cert = check["certificate"]
    assert cert["passed"] and cert["layers"] == 20 and cert["failed"] == [] and 0.49 <= cert["worst_ulp"] <= 0.5 + 1e-6
    assert outcome.check.certificate.passed


def test_a_half_model_is_folded_with_one_rounding_and_certified_in_float16():
    model = nn.Sequential(nn.Conv2d(64, 256, 3), nn.BatchNorm2d(256)).eval()
    randomise_bn(model[1], torch.Generator().manual_seed(0))
    model = model.half()
    certificate, _ = _certificate(model, torch.randn(2, 64, 6, 6).half())
    assert certificate.passed, certificate.summary()
    assert [(c.layer, c.dtype) for c in certificate.layers] == [("0", "float16")]
    # torch's float64 -> float16 cast rounds twice (through float32): on this layer it is off somewhere
    from bnrt.verify.certify import exact_folds
    planned = plan(capture(model, (torch.randn(2, 64, 6, 6).half(),)))
    ((_, _, exact),) = exact_folds(planned, lambda layer: layer_weights(model, layer), lambda d: statistics(model, d))
    twice = torch.from_numpy(exact.weight).to(torch.float16).numpy()
    assert np.sum(twice != exact.weight.astype(np.float16)) > 0
