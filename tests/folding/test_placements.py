"""The placements beyond layer -> BN -> layer: a BN after a concatenation of layers (mixed-kernel
blocks, YOLOv5's BottleneckCSP, Inception-style branches) splits into one backward fold per part.
Property tests exact in float64 (torch) and on ORT (ONNX); each refusal keeps the BN with its code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnrt
from bnrt.folding.onnxfold import fold_onnx

from ..conftest import (assert_folds_exactly, assert_onnx_folds, bn_node, bn_params, onnx_graph, randomise_bn, run_cli,
                       save_checkpoint)

PART = st.tuples(st.sampled_from(["conv", "convtranspose", "grouped", "identity-view"]), st.integers(1, 3),
                 st.sampled_from([1, 3]), st.integers(1, 2), st.booleans())


class Concat(nn.Module):
    """Each part a layer over the input (or over its channel split), concatenated, then a BN."""

    def __init__(self, cin: int, parts: list[tuple], split: bool, gen: torch.Generator):
        super().__init__()
        self.split, self.parts = split, parts
        self.cin = cin // len(parts) if split else cin
        layers, total = [], 0
        for kind, cout, kernel, dilation, bias in parts:
            pad = dilation * (kernel - 1) // 2
            if kind == "convtranspose":
                layers.append(nn.ConvTranspose2d(self.cin, cout, kernel, padding=pad, dilation=dilation, bias=bias))
            elif kind == "grouped" and self.cin % 2 == 0:
                layers.append(nn.Conv2d(self.cin, 2 * cout, kernel, padding=pad, dilation=dilation, groups=2,
                                        bias=bias))
            else:
                layers.append(nn.Conv2d(self.cin, cout, kernel, padding=pad, dilation=dilation, bias=bias))
            total += layers[-1].out_channels
        self.layers = nn.ModuleList(layers)
        self.bn = nn.BatchNorm2d(total)
        randomise_bn(self.bn, gen)

    def forward(self, x):
        inputs = torch.split(x, self.cin, dim=1) if self.split else [x] * len(self.layers)
        outs = []
        for layer, (kind, *_), part in zip(self.layers, self.parts, inputs):
            y = layer(part)
            outs.append(y.contiguous() if kind == "identity-view" else y)  # a view op between part and concat
        return self.bn(torch.cat(outs, dim=1))


@given(parts=st.lists(PART, min_size=1, max_size=4), split=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_a_bn_after_a_concat_of_layers_folds_into_each_part(parts, split, seed):
    gen = torch.Generator().manual_seed(seed)
    cin = 2 * len(parts)
    model = Concat(cin, parts, split, gen)
    result = assert_folds_exactly(model, torch.randn(2, cin, 6, 5, generator=gen), 1)
    decision = result.decisions[0]
    assert decision.direction == "backward" and decision.into == tuple(f"layers.{i}" for i in range(len(parts)))
    sizes = [layer.out_channels for layer in model.layers]
    starts = np.cumsum([0, *sizes])
    assert decision.maps == tuple(tuple(range(a, a + n)) for a, n in zip(starts, sizes))


class _Shared(nn.Module):
    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        a = self.a(x)
        if self.case == "shared":  # a's output also feeds the residual sum
            return self.bn(torch.cat([a, self.b(x)], 1)) + torch.cat([a, a], 1)
        if self.case == "twice":
            return self.bn(torch.cat([a, a], 1))
        if self.case == "relu":
            return self.bn(torch.cat([a, torch.relu(self.b(x))], 1))
        raise ValueError(self.case)


@pytest.mark.parametrize("case,code,message", [
    ("shared", "concat-producer-shared", "a part of 'cat': output of 'a' also feeds"),
    ("twice", "concat-producer-shared", "'a' is concatenated more than once by 'cat'"),
    ("relu", "no-layer-before", "input comes from 'cat', one of whose parts comes from"),
])
def test_a_concat_part_that_is_shared_or_no_layer_keeps_the_bn(case, code, message):
    model = _Shared(case).eval()
    randomise_bn(model.bn, torch.Generator().manual_seed(0))
    x = torch.randn(2, 2, 4, 4)
    result = bnrt.fold(model, (x,))
    refusal = result.decisions[0].refusals[0]
    assert (refusal.direction, refusal.code) == ("backward", code) and refusal.message.startswith(message)
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), atol=1e-6)


@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4), transpose=st.booleans(),
       split_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_onnx_concat_of_convs_then_bn_folds_into_each(sizes, transpose, split_bias, seed):
    rng = np.random.default_rng(seed)
    nodes, inits, parts = [], bn_params(sum(sizes), rng), []
    for i, c in enumerate(sizes):
        w = rng.standard_normal((3, c, 3, 3) if transpose else (c, 3, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("ConvTranspose" if transpose else "Conv", ["x", f"w{i}"], [f"c{i}"],
                                      pads=[1, 1, 1, 1], name=f"conv{i}"))
        parts.append(f"c{i}")
        if split_bias:  # paddle2onnx's conv bias
            inits.append(numpy_helper.from_array(rng.standard_normal((1, c, 1, 1)).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [f"c{i}", f"b{i}"], [f"a{i}"]))
            parts[-1] = f"a{i}"
    nodes += [helper.make_node("Concat", parts, ["cat"], axis=1, name="cat"), bn_node("cat", "y")]
    model = onnx_graph(nodes, inits, [2, 3, 5, 5], opset=13)
    result = assert_onnx_folds(model, {"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)}, 1)
    assert result.decisions[0].into == tuple(f"conv{i}" for i in range(len(sizes)))
    assert [n.op_type for n in result.model.graph.node] == ["ConvTranspose" if transpose else "Conv"] * len(sizes) + [
        "Concat"]


def test_onnx_concat_along_another_axis_keeps_the_bn():
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), f"w{i}") for i in (0, 1)]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Concat", ["c0", "c1"], ["cat"], axis=2, name="cat"), bn_node("cat", "y")]
    result = fold_onnx(onnx_graph(nodes, inits + bn_params(4, rng), [1, 3, 2, 2], opset=13))
    assert result.decisions[0].refusals[0].code == "channel-map"
    assert result.decisions[0].refusals[0].message == "'cat' concatenates along axis 2, not the BN's channels"


def test_bnrt_fold_of_a_csp_and_mixconv_model_leaves_no_batchnorm(tmp_path):
    from ..nets import CspMix

    model = CspMix().eval()
    gen = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        randomise_bn(bn, gen)
    save_checkpoint(tmp_path / "csp.pt", model, "tests.nets:CspMix", (1, 3, 16, 16))
    proc = run_cli("fold", str(tmp_path / "csp.pt"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "BatchNormalization nodes in ONNX: 0" in proc.stdout and "check passed" in proc.stdout
    report = json.loads((tmp_path / "out" / "csp.report.json").read_text())
    rows = {d["bn"]: (d["rule"], d["into"]) for d in report["decisions"]}
    assert rows["bn"] == ("conv->bn", ["cv3", "cv2"]) and rows["mix_bn"] == ("conv->bn", ["mix.0", "mix.1"])
    assert report["check"]["certificate"]["passed"] and report["check"]["certificate"]["layers"] == 6


# --- through pooling --------------------------------------------------------------------------------

POOLS = {
    "global-avg": (lambda: nn.AdaptiveAvgPool2d(1), "avg"), "adaptive-avg": (lambda: nn.AdaptiveAvgPool2d(2), "avg"),
    "avgpool": (lambda: nn.AvgPool2d(2), "avg"), "avgpool-pad-uncounted": (
        lambda: nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), "avg"),
    "mean": (lambda: _Reduce("mean"), "avg"), "maxpool": (lambda: nn.MaxPool2d(3, 2, padding=1), "max"),
    "adaptive-max": (lambda: nn.AdaptiveMaxPool2d(1), "max"), "amax": (lambda: _Reduce("amax"), "max"),
}


class _Reduce(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, x):
        return getattr(x, self.op)((2, 3), keepdim=True)


class Pooled(nn.Module):
    """forward: BN -> pool -> flatten -> Linear (or -> Conv); backward: Conv -> pool -> BN."""

    def __init__(self, pool: str, forward: bool, into_conv: bool, gen: torch.Generator, positive: bool):
        super().__init__()
        self.pool, self.forward_ = POOLS[pool][0](), forward
        self.conv = nn.Conv2d(3, 4, 3, padding=1 if not forward else 0)
        self.bn = nn.BatchNorm2d(3 if forward else 4)
        randomise_bn(self.bn, gen)
        if positive:
            with torch.no_grad():
                self.bn.weight.abs_()
        sizes = {"global-avg": 1, "adaptive-avg": 2, "avgpool": 3, "mean": 1, "maxpool": 3, "adaptive-max": 1,
                 "amax": 1, "avgpool-pad-uncounted": 6}
        self.head = nn.Conv2d(3, 2, 1) if into_conv else nn.Linear(3 * sizes[pool] ** 2, 2)

    def forward(self, x):
        if self.forward_:
            y = self.pool(self.bn(x))
            return self.head(y) if isinstance(self.head, nn.Conv2d) else self.head(torch.flatten(y, 1))
        return self.bn(self.pool(self.conv(x)))


@given(pool=st.sampled_from(sorted(POOLS)), forward=st.booleans(), into_conv=st.booleans(), positive=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_a_bn_folds_through_per_channel_pooling(pool, forward, into_conv, positive, seed):
    gen = torch.Generator().manual_seed(seed)
    model = Pooled(pool, forward, into_conv, gen, positive)
    negative = bool((model.bn.weight < 0).any())
    if POOLS[pool][1] == "max" and negative:  # max(s·x) is not s·max(x) for s < 0: kept, with its own code
        result = bnrt.fold(model.double().eval(), (torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64),))
        assert not result.decisions[0].folded
        assert result.decisions[0].codes == (("graph-input", "negative-scale-through-max") if forward else
                                             ("negative-scale-through-max", "no-layer-after"))
        return
    result = assert_folds_exactly(model, torch.randn(2, 3, 6, 6, generator=gen), 1)
    assert result.decisions[0].direction == ("forward" if forward else "backward")
    name = pool if pool in ("mean", "amax") else "pool"  # a reduction method is its own node
    assert result.decisions[0].through == (name,) + (("flatten",) if forward and not into_conv else ())


def test_average_pooling_that_counts_padded_zeros_is_not_passed():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.AvgPool2d(3, 1, padding=1), nn.BatchNorm2d(3)).eval()
    randomise_bn(model[2], torch.Generator().manual_seed(0))
    result = bnrt.fold(model, (torch.randn(1, 2, 4, 4),))
    assert result.decisions[0].refusals[0].code == "no-layer-before"
    assert "AvgPool2d '1'" in result.decisions[0].refusals[0].message


@pytest.mark.parametrize("op,attrs,folds,code", [
    ("GlobalAveragePool", {}, True, None), ("GlobalMaxPool", {}, True, None),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, True, None),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, True, None),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, False, "no-layer-before"),
    ("GlobalMaxPool", {"negative": True}, False, "negative-scale-through-max"),
])
def test_onnx_conv_pool_bn_folds_backward(op, attrs, folds, code):
    rng = np.random.default_rng(2)
    negative = attrs.pop("negative", False)
    params = bn_params(4, rng)
    scale = np.abs(numpy_helper.to_array(params[0])) * (-1 if negative else 1)
    params[0] = numpy_helper.from_array(scale.astype(np.float32), "bn.scale")
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")] + params
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node(op, ["h"], ["p"], name="pool", **attrs), bn_node("p", "y")]
    model = onnx_graph(nodes, inits, [2, 3, 6, 6], opset=13)
    if folds:
        result = assert_onnx_folds(model, {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}, 1)
        assert result.decisions[0].through == ("pool",)
    else:
        assert fold_onnx(model).decisions[0].refusals[0].code == code


def test_onnx_bn_global_pool_flatten_gemm_folds_forward():
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((2, 3)).astype(np.float32), "W")] + bn_params(3, rng)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "b"),
             helper.make_node("ReduceMean", ["b"], ["m"], axes=[2, 3], keepdims=0, name="mean"),
             helper.make_node("Gemm", ["m", "W"], ["y"], transB=1, name="fc")]
    model = onnx_graph(nodes, inits, [2, 3, 5, 5], opset=13)
    result = assert_onnx_folds(model, {"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)}, 1)
    assert (result.decisions[0].rule, result.decisions[0].through) == ("bn->gemm", ("mean",))


class _Unbatched(nn.Module):
    """A k-D pooling given a (k+1)-D tensor pools over the channels too: no pass-through."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.conv, self.bn2, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.BatchNorm1d(8)
        self.pool3 = nn.MaxPool3d((3, 1, 1), 1, (1, 0, 0))
        self.head, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(8, 4)

    def forward(self, x):
        if self.case == "avgpool3d":
            return self.bn2(nn.functional.avg_pool3d(self.conv(x), (3, 1, 1), 1, (1, 0, 0), count_include_pad=False))
        if self.case == "maxpool3d":
            return self.head(self.pool3(self.bn2(self.conv(x).relu())))
        if self.case == "maxpool1d":
            return self.fc(nn.functional.max_pool1d(self.bn1(self.conv(x).mean((2, 3))), 3, 1, 1))
        return self.fc(torch.flatten(nn.functional.max_pool2d(self.bn1(self.conv(x).flatten(2)), 2), 1)[:, :8])


@pytest.mark.parametrize("case", ["avgpool3d", "maxpool3d", "maxpool1d", "maxpool2d-on-3d"])
def test_a_pooling_of_an_unbatched_input_is_no_pass_through(case):
    model = _Unbatched(case).double().eval()
    gen = torch.Generator().manual_seed(0)
    for bn in (model.bn1, model.bn2):
        randomise_bn(bn, gen)
        with torch.no_grad():
            bn.weight.abs_()
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    result = bnrt.fold(model, (x,))  # no traceback, and whatever folds is exact
    with torch.no_grad():
        assert float((model(x) - result.model(x)).abs().max()) <= 1e-10
    assert not any(d.folded and any(n.startswith(("pool", "avg_pool", "max_pool")) for n in d.through)
                   for d in result.decisions)


def test_onnx_reduce_mean_with_computed_axes_is_no_pass_through():
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.int64([2]), "two")] + bn_params(3, rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Shape", ["s"], ["r"]), helper.make_node("Sub", ["r", "two"], ["ax"]),
             helper.make_node("ReduceMean", ["c", "ax"], ["m"], name="rm"), helper.make_node("Add", ["c", "m"], ["a"]),
             bn_node("a", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 1, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    result = fold_onnx(model)  # planning does not stop at the axes it cannot read
    assert not result.decisions[0].folded and result.decisions[0].refusals[0].code == "no-layer-before"


# --- a BN read by several layers through pass-through ops --------------------------------------------

class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d with an identity activation: its forward is traced through, and its
    drop and act are Identity modules between the BN and its readers."""

    def __init__(self, c: int):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.Identity()

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                     self.eps)
        return self.act(self.drop(x))


READER = st.sampled_from(["1x1", "unpadded", "padded", "linear"])


class PreNorm(nn.Module):
    """A pre-norm BN (plain or the subclass) read by several layers (query/key/value projections),
    directly or through a shared flatten."""

    def __init__(self, readers: list[str], subclass: bool, gen: torch.Generator):
        super().__init__()
        self.norm = _BatchNormAct(4) if subclass else nn.BatchNorm2d(4)
        randomise_bn(self.norm, gen)
        self.kinds = readers
        self.readers = nn.ModuleList(
            nn.Conv2d(4, 3, 1) if kind == "1x1" else nn.Conv2d(4, 3, 3) if kind == "unpadded" else
            nn.Conv2d(4, 4, 3, padding=1, groups=4) if kind == "padded" else nn.Linear(4 * 5 * 5, 3)
            for kind in readers)

    def forward(self, x):
        y = self.norm(x)
        flat = torch.flatten(y, 1)
        outs = [r(flat) if kind == "linear" else r(y) for kind, r in zip(self.kinds, self.readers)]
        return sum(o.flatten(1).sum(1, keepdim=True) * (i + 1) for i, o in enumerate(outs))


@given(readers=st.lists(READER, min_size=1, max_size=4), subclass=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_a_bn_read_by_several_layers_through_pass_throughs_folds_into_all(readers, subclass, seed):
    gen = torch.Generator().manual_seed(seed)
    model = PreNorm(readers, subclass, gen)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    if "padded" in readers:  # the refusal names the padded reader, not a pass-through on the way
        result = bnrt.fold(model.double().eval(), (x.double(),))
        refusal = result.decisions[0].refusals[-1]
        assert (result.decisions[0].folded, refusal.code) == (False, "zero-padding")
        assert refusal.subject == f"readers.{readers.index('padded')}"
        return
    result = assert_folds_exactly(model, x, 1)
    flatten = "flatten" in result.decisions[0].through
    assert sorted(t.layer for t in result.decisions[0].targets) == [f"readers.{i}" for i in range(len(readers))]
    assert flatten == ("linear" in readers)


def test_onnx_bn_read_by_three_convs_through_identity_folds_into_all():
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), n)
             for n in ("wq", "wk", "wv")] + bn_params(3, rng)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "b"),
             helper.make_node("Identity", ["b"], ["i"], name="act"),
             helper.make_node("Conv", ["i", "wq"], ["q"], name="q"), helper.make_node("Conv", ["i", "wk"], ["k"], name="k"),
             helper.make_node("Conv", ["i", "wv"], ["v"], name="v"), helper.make_node("Mul", ["q", "k"], ["qk"]),
             helper.make_node("Add", ["qk", "v"], ["y"])]
    model = onnx_graph(nodes, inits, [2, 3, 4, 4], opset=13)
    result = assert_onnx_folds(model, {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}, 1)
    assert [t.layer for t in result.decisions[0].targets] == ["q", "k", "v"]
    inits.append(numpy_helper.from_array(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "wk3"))
    padded = onnx_graph([*nodes[:4], helper.make_node("Conv", ["i", "wk3"], ["k"], name="k", pads=[1, 1, 1, 1]),
                         *nodes[5:]], inits, [2, 3, 4, 4], opset=13)
    refusal = fold_onnx(padded).decisions[0].refusals[-1]
    assert (refusal.code, refusal.subject) == ("zero-padding", "k")


# --- partial merges: a rep block with a branch that does not line up --------------------------------

@given(kxk=st.integers(0, 3), one=st.booleans(), identity=st.booleans(), raw=st.booleans(),
       dilated=st.integers(0, 2), after=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_onnx_rep_block_merges_the_branches_that_line_up_and_keeps_the_others(kxk, one, identity, raw, dilated,
                                                                              after, seed):
    """k×k, 1×1 and dilated conv+BN branches, an identity BN and the input itself summed (then a BN):
    the dilated branches stay, added to the merged conv's output; exact on ORT."""
    rng = np.random.default_rng(seed)
    c, nodes, inits, terms = 3, [helper.make_node("Relu", ["x"], ["r"])], [], []
    branches = [("k", 3, 1, 1)] * kxk + [("one", 1, 0, 1)] * one + [("dil", 3, 2, 2)] * dilated
    for i, (kind, k, pad, dil) in enumerate(branches):
        inits += [numpy_helper.from_array(rng.standard_normal((c, c, k, k)).astype(np.float32), f"w{i}")]
        inits += bn_params(c, rng, f"bn{i}")
        nodes += [helper.make_node("Conv", ["r", f"w{i}"], [f"c{i}"], name=f"{kind}{i}", pads=[pad] * 4,
                                   dilations=[dil, dil]), bn_node(f"c{i}", f"b{i}", f"bn{i}")]
        terms.append(f"b{i}")
    if identity:
        inits += bn_params(c, rng, "idn")
        nodes.append(bn_node("r", "idn_out", "idn"))
        terms.append("idn_out")
    terms += ["r"] * raw
    if len(terms) < 2:
        return
    total = terms[0]
    for i, term in enumerate(terms[1:]):
        nodes.append(helper.make_node("Add", [total, term], [f"s{i}"], name=f"add{i}"))
        total = f"s{i}"
    if after:
        inits += bn_params(c, rng, "after")
        nodes.append(bn_node(total, "y", "after"))
    else:
        nodes.append(helper.make_node("Identity", [total], ["y"]))
    model = onnx_graph(nodes, inits, [2, c, 6, 6], opset=13)
    result = fold_onnx(model)
    aligned = kxk + one
    merges = aligned >= 1 and aligned + identity + raw >= 2
    assert [[c.name for c, _ in m.kept] for m in result.merges] == (
        [[f"dil{i}" for i in range(aligned, aligned + dilated)]] if merges else [])
    by_bn = {d.bn: d for d in result.decisions}
    assert all(by_bn[f"bn{i}"].direction == "backward" for i in range(len(branches)))
    if identity:
        assert by_bn["idn"].folded == merges
    if after:
        assert by_bn["after"].folded == (merges and not dilated)
    folded = sum(d.folded for d in result.decisions)
    feeds = {"x": rng.standard_normal((2, c, 6, 6)).astype(np.float32)}
    assert_onnx_folds(model, feeds, folded)


# --- a per-channel scale and shift after a Linear on (N, L, C) or a ConvTranspose ---------------------

class _ScaledLayer(nn.Module):
    """``γ·layer(x) + β`` (each optional) with γ, β per output channel: a LayerScale after a token
    MLP's Linear (channels last) or after a ConvTranspose (channels on axis 1)."""

    def __init__(self, kind, cin, cout, groups, scale, shift, gen):
        super().__init__()
        self.kind, self.scale, self.shift = kind, scale, shift
        if kind == "convtranspose":
            self.layer = nn.ConvTranspose2d(cin * groups, cout * groups, 3, 2, 1, groups=groups)
            shape = (1, cout * groups, 1, 1)
        else:
            self.layer = nn.Linear(cin, cout)
            shape = (cout,)
        self.gamma = nn.Parameter(torch.rand(shape, generator=gen) + 0.5)
        self.beta = nn.Parameter(torch.randn(shape, generator=gen))

    def forward(self, x):
        y = self.layer(x)
        if self.scale:
            y = self.gamma * y
        if self.shift:
            y = y + self.beta
        return y


@given(kind=st.sampled_from(["linear", "convtranspose"]), cin=st.integers(1, 3), cout=st.integers(1, 4),
       groups=st.integers(1, 2), tokens=st.integers(1, 4), scale_shift=st.sampled_from(["scale", "shift", "both"]),
       seed=st.integers(0, 2**31 - 1))
def test_a_per_channel_scale_and_shift_after_a_token_linear_or_a_convtranspose_folds_into_it(
        kind, cin, cout, groups, tokens, scale_shift, seed):
    gen = torch.Generator().manual_seed(seed)
    scale, shift = scale_shift in ("scale", "both"), scale_shift in ("shift", "both")
    model = _ScaledLayer(kind, cin, cout, groups, scale, shift, gen).double().eval()
    x = torch.randn((2, tokens, cin) if kind == "linear" else (2, cin * groups, 3, 3), generator=gen, dtype=torch.float64)
    result = bnrt.fold(model, (x,))
    assert [(m.target.name, m.scaled, m.constant is not None) for m in result.merges] == [("layer", scale, shift)]
    ops = [n.target for n in result.model.graph.nodes if n.op in ("call_function", "call_method")]
    assert ops == []  # the Mul and the Add are gone: γ and β are in the layer's weights
    with torch.no_grad():
        ref = model(x)
        assert float((result.model(x) - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("bias", [False, True])
def test_onnx_matmul_on_tokens_then_a_per_channel_mul_and_add_folds_into_it(bias):
    rng = np.random.default_rng(5)
    arrays = {"W": rng.standard_normal((3, 4)), "g": rng.random(4) + 0.5, "b": rng.standard_normal(4),
              "c": rng.standard_normal(4)}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="fc")]
    if bias:
        nodes.append(helper.make_node("Add", ["m", "c"], ["mb"], name="fc_bias"))
    nodes += [helper.make_node("Mul", ["mb" if bias else "m", "g"], ["s"], name="scale"),
              helper.make_node("Add", ["s", "b"], ["y"], name="shift")]
    model = onnx_graph(nodes, inits, [2, 5, 3], opset=13)
    result = fold_onnx(model)
    assert [(m.target.name, m.scaled, m.constant is not None) for m in result.merges] == [
        ("fc", True, True)]
    assert sorted(n.op_type for n in result.model.graph.node) == ["Add", "MatMul"]
    feeds = {"x": rng.standard_normal((2, 5, 3)).astype(np.float32)}
    assert_onnx_folds(model, feeds, 0)


def test_onnx_kept_branch_keeps_its_own_split_bias():
    """A kept (dilated) branch with no BN whose bias is a separate Add, as paddle2onnx writes it:
    the merged conv's output is added to the biased value, not to the raw Conv output."""
    rng = np.random.default_rng(9)
    arrays = {"w0": (3, 3, 3, 3), "w1": (3, 3, 1, 1), "wd": (3, 3, 3, 3), "bd": (1, 3, 1, 1)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in arrays.items()]
    inits += bn_params(3, rng, "bn0") + bn_params(3, rng, "bn1")
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Conv", ["r", "w0"], ["c0"], pads=[1] * 4, name="k3"), bn_node("c0", "b0", "bn0"),
             helper.make_node("Conv", ["r", "w1"], ["c1"], name="k1"), bn_node("c1", "b1", "bn1"),
             helper.make_node("Conv", ["r", "wd"], ["cd"], pads=[2] * 4, dilations=[2, 2], name="dil"),
             helper.make_node("Add", ["cd", "bd"], ["d"], name="dil_bias"),
             helper.make_node("Add", ["b0", "b1"], ["s0"], name="a0"), helper.make_node("Add", ["s0", "d"], ["y"])]
    model = onnx_graph(nodes, inits, [2, 3, 6, 6], opset=13)
    result = assert_onnx_folds(model, {"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}, 2)
    assert [m.to_json()["kept"] for m in result.merges] == [[{"conv": "dil", "reason": "'dil' is dilated"}]]


def test_onnx_bn_feeding_a_layer_as_its_weight_says_so():
    rng = np.random.default_rng(4)
    inits = bn_params(3, rng)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "b"), helper.make_node("Identity", ["b"], ["i"]),
             helper.make_node("MatMul", ["x", "i"], ["y"], name="qk")]
    refusal = fold_onnx(onnx_graph(nodes, inits, [3, 3], opset=13)).decisions[0].refusals[-1]
    assert (refusal.code, refusal.subject) == ("weight-input", "qk")
