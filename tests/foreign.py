"""ONNX graphs written the way other exporters write them, built with ``onnx.helper``: weights in
Constant nodes (paddle2onnx: no initializers at all), behind Identity nodes, TensorFlow kernels
transposed to ONNX's layout, float16 constants cast to float, biases unsqueezed or reshaped to (1, C, 1, 1), sparse and ``value_floats``
constants, a conv's bias as a separate ``Add`` (a split bias), symbolic batch/height/width, and
``BatchNormalization`` in its opset-9 and opset-14/15 forms.

``exporter_graph(style, opset)`` builds one small detector-like network in that style:
conv+Add(bias)->BN, convtranspose+Add(bias)->BN, BN->conv+Add(bias) (forward), grouped conv with
its own bias->BN, global pool -> MatMul+Add(bias)->BN and Gemm+Add(bias)->BN heads; every BN
follows or precedes a layer, so every one folds.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STYLES = {  # how each kind of tensor is stored, per exporter
    "paddle2onnx": {"weight": ["value"], "bias": ["value"], "bn": ["value"]},
    "tf2onnx": {"weight": ["transpose", "identity", "cast"], "bias": ["unsqueeze", "reshape"], "bn": ["cast", "identity"]},
    "mixed": {"weight": ["init", "sparse", "value", "identity", "cast"], "bias": ["floats", "unsqueeze", "init"],
              "bn": ["floats", "value", "init", "cast"]},
}
CASES = [("paddle2onnx", 11), ("paddle2onnx", 12), ("tf2onnx", 9), ("tf2onnx", 13), ("mixed", 13),
         ("mixed", 14), ("mixed", 15)]


class _Graph:
    def __init__(self, style: str, opset: int, seed: int):
        self.styles = {k: itertools.cycle(v) for k, v in STYLES[style].items()}
        self.opset, self.rng = opset, np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _constant(self, array: np.ndarray, **value) -> str:
        out = self._name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], name=out, **(value or {
            "value": numpy_helper.from_array(array, out + "_t")})))
        return out

    def tensor(self, kind: str, array: np.ndarray, per_channel: bool = False) -> str:
        """``array`` (float32) stored as the style's next form for ``kind``; ``per_channel``: a 1-D
        bias meant to broadcast over (N, C, H, W), stored as (1, C, 1, 1) in one form or another."""
        array = array.astype(np.float32)
        form = next(self.styles[kind])
        if form == "floats" and self.opset < 12 or form == "sparse" and self.opset < 11:
            form = "value"
        if per_channel and form in ("value", "init", "floats", "identity", "cast", "sparse", "transpose"):
            array = array.reshape(1, -1, 1, 1)
            form = "value" if form in ("floats", "sparse") else form
        if form == "init":
            name = self._name("w")
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        if form == "value":
            return self._constant(array)
        if form == "floats":
            return self._constant(array, value_floats=[float(v) for v in array.reshape(-1)]) if array.ndim == 1 \
                else self._constant(array)
        if form == "sparse":
            flat = array.reshape(-1)
            keep = np.flatnonzero(np.arange(flat.size) % 3 != 1)  # a third of the weights zero
            sparse = helper.make_sparse_tensor(numpy_helper.from_array(flat[keep], self._name("sv")),
                                               numpy_helper.from_array(keep.astype(np.int64), self._name("si")),
                                               list(array.shape))
            return self._constant(array, sparse_value=sparse)
        if form == "identity":
            return self.node("Identity", [self.tensor_init(array)])
        if form == "transpose":  # stored HWIO (a TensorFlow kernel), transposed to OIHW where used
            perm = [3, 2, 0, 1] if array.ndim == 4 else [1, 0]
            stored = np.transpose(array, np.argsort(perm))
            return self.node("Transpose", [self.tensor_init(stored)], perm=perm)
        if form == "cast":  # float16 storage, cast to float where used
            return self.node("Cast", [self._constant(array.astype(np.float16))], to=TensorProto.FLOAT)
        if form == "unsqueeze":  # a (C,) bias unsqueezed to (1, C, 1, 1)
            src = self._constant(array)
            if not per_channel:
                return src
            if self.opset >= 13:
                return self.node("Unsqueeze", [src, self._constant(np.array([0, 2, 3], dtype=np.int64))])
            return self.node("Unsqueeze", [src], axes=[0, 2, 3])
        if form == "reshape":
            src = self.tensor_init(array)
            if not per_channel:
                return src
            return self.node("Reshape", [src, self._constant(np.array([1, -1, 1, 1], dtype=np.int64))])
        raise ValueError(form)

    def tensor_init(self, array: np.ndarray) -> str:
        name = self._name("w")
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def bn(self, x: str, c: int) -> str:
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.standard_normal(c) * 0.2,
                  self.rng.standard_normal(c) * 0.2, self.rng.uniform(0.5, 2.0, c)]
        inputs = [x] + [self.tensor("bn", p) for p in params]
        attrs = {"epsilon": 1e-5, "momentum": 0.9}
        if self.opset >= 14:
            attrs = {"epsilon": 1e-5, "training_mode": 0}
        return self.node("BatchNormalization", inputs, **attrs)

    def weight(self, *shape: int) -> str:
        return self.tensor("weight", self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:])))

    def split_bias(self, x: str, c: int, per_channel: bool = True) -> str:
        return self.node("Add", [x, self.tensor("bias", self.rng.standard_normal(c) * 0.1, per_channel)])


def exporter_graph(style: str, opset: int, seed: int = 0) -> onnx.ModelProto:
    """The network above, every tensor stored in ``style``'s forms, at ``opset``; input ``x`` of
    shape (N, 3, H, W) with symbolic N, H and W; outputs ``feat`` (N, 5) and ``logits`` (N, 4)."""
    g = _Graph(style, opset, seed)
    h = g.node("Conv", ["x", g.weight(8, 3, 3, 3)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = g.node("Relu", [g.bn(g.split_bias(h, 8), 8)])
    h = g.node("ConvTranspose", [h, g.weight(8, 6, 2, 2)], kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Relu", [g.bn(g.split_bias(h, 6), 6)])
    h = g.node("Conv", [g.bn(h, 6), g.weight(6, 6, 1, 1)], kernel_shape=[1, 1])  # forward into a split-bias conv
    h = g.node("Relu", [g.split_bias(h, 6)])
    h = g.node("Conv", [h, g.weight(6, 3, 3, 3), g.tensor("bias", g.rng.standard_normal(6) * 0.1)],
               kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2, strides=[2, 2])
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Relu", [g.bn(h, 6)])])], axis=1)
    feat = g.bn(g.split_bias(g.node("MatMul", [pooled, g.weight(6, 5)]), 5,
                             per_channel=False), 5)
    c = [g.tensor("bias", g.rng.standard_normal(4) * 0.1)] if opset < 11 else []  # C is optional from opset 11
    logits = g.bn(g.split_bias(g.node("Gemm", [pooled, g.weight(4, 6), *c], transB=1), 4, per_channel=False), 4)
    g.nodes.append(helper.make_node("Identity", [feat], ["feat"], name="feat"))
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    outputs = [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 5]),
               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    model = helper.make_model(helper.make_graph(g.nodes, f"{style}_{opset}", [x], outputs, g.inits),
                              opset_imports=[helper.make_opsetid("", opset)], producer_name=style)
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def batchnorms(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)
