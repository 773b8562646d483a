"""Constants of an ONNX graph, in whatever form an exporter wrote them: an initializer (dense or
sparse), a ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``, ``sparse_value``),
or one of those reached through ``Identity``, ``Cast``, ``Reshape``, ``Unsqueeze``, ``Squeeze`` or
``Transpose`` nodes whose other inputs are constants too (paddle2onnx and tf2onnx keep every weight in a
Constant node; others cast float16 weights to float or reshape a scale to ``(1, C, 1, 1)``). Every
part of bnrt that reads, re-rounds or prunes weights sees them here, so a tensor is a tensor.

``weight_sources`` names the stored float tensors that layers and affine ops (``WEIGHT_OPS``) read
beside the model's data (weights, biases, statistics, per-channel constants): what re-rounding
changes. Tensors that shape the computation or must stay exact (``Resize`` scales, values that
flow into shape arithmetic, a ``Pow`` exponent) are left out: moving them by one ULP could change
an output's size or turn it into NaN.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnrt.folding import onnxops
from bnrt.folding.decision import NotFoldable

CHAIN_OPS = {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Transpose"}  # a constant through these is one
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# ops whose constant inputs are weights: what a fold (or any re-export) may re-round. Others keep
# theirs exact: a Pow's exponent (x ** 2.0000002 of a negative x is NaN), Resize scales, Clip bounds.
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
              "LayerNormalization", "GroupNormalization", "PRelu", "Add", "Sub", "Mul", "Div", "Sum", "Einsum"}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def sparse_to_array(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A ``SparseTensorProto`` as a dense array (indices linear ``[NNZ]`` or ``[NNZ, rank]``)."""
    values = numpy_helper.to_array(sparse.values)
    dense = np.zeros(int(np.prod(sparse.dims, dtype=np.int64)), dtype=values.dtype)
    if values.size:
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        if indices.ndim == 2:
            indices = np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
        dense[indices] = values
    return dense.reshape(tuple(sparse.dims))


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a ``Constant`` node holds; None for string values."""
    if not node.attribute:
        return None
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name == "sparse_value":
        return sparse_to_array(a.sparse_tensor)
    if a.name in ("value_float", "value_floats"):
        return np.array(helper.get_attribute_value(a), dtype=np.float32)
    if a.name in ("value_int", "value_ints"):
        return np.array(helper.get_attribute_value(a), dtype=np.int64)
    return None


class Constants:
    """The constant values of one graph, by value name (``value``); the graph must not change while
    this is in use (values are computed once and kept: weights are read many times in planning)."""

    def __init__(self, graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto] | None = None):
        self.inits = {i.name: i for i in graph.initializer}
        self.sparse = {s.values.name: s for s in graph.sparse_initializer}
        self.producer = producer if producer is not None else {o: n for n in graph.node for o in n.output}
        self._values: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is a constant, else None."""
        if name not in self._values:
            self._values[name] = self._compute(name)
        return self._values[name]

    def _compute(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.sparse:
            return sparse_to_array(self.sparse[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return constant_node_value(node)
        if node.op_type not in CHAIN_OPS or not node.input:
            return None
        data = self.value(node.input[0])
        if data is None:
            return None
        if node.op_type == "Cast":
            to = _attr(node, "to")
            return data.astype(helper.tensor_dtype_to_np_dtype(to)) if to is not None else None
        try:  # the same rearrangement the engine replays on channel indices
            return onnxops.replay(node, data, self.value, {})
        except (NotFoldable, ValueError):  # a shape or axes computed in the graph
            return None


def _data_values(graph: onnx.GraphProto, constants: Constants) -> set[str]:
    """Values computed from the graph inputs' data: a graph input that is not an initializer, and
    every output of a node reading one (``Shape`` and ``Size`` read metadata only)."""
    data = {i.name for i in graph.input if i.name not in constants.inits}
    for node in graph.node:  # graph order is topological
        if node.op_type not in ("Shape", "Size") and any(i in data for i in node.input):
            data.update(o for o in node.output if o)
    return data


def _source(name: str, constants: Constants) -> str | onnx.NodeProto | None:
    """Where the constant ``name`` is stored: an initializer's name or a Constant node, through the
    chain ops' data input; None when it is computed otherwise or is not floating point."""
    while True:
        if name in constants.inits:
            return name if constants.inits[name].data_type in FLOAT_TYPES else None
        node = constants.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return node
        if node.op_type not in CHAIN_OPS or (node.op_type == "Cast" and _attr(node, "to") not in FLOAT_TYPES):
            return None
        name = node.input[0]


def weight_sources(graph: onnx.GraphProto) -> Iterator[str | onnx.NodeProto]:
    """The stored float tensors (initializer names, Constant nodes) that only layers and affine ops
    (``WEIGHT_OPS``) read, each beside the model's data: the values a fold may re-round, each once,
    in graph order. A tensor any other op also reads (a Pow exponent a Mul shares, a ``Cast`` to an
    integer, shape arithmetic) keeps its value."""
    constants = Constants(graph)
    data = _data_values(graph, constants)
    order: dict = {}
    exact: set = set()
    for node in graph.node:
        if node.op_type in ("Shape", "Size") or (node.op_type in CHAIN_OPS and not (
                node.op_type == "Cast" and _attr(node, "to") not in FLOAT_TYPES)):
            continue  # metadata reads; a constant passing through (its readers decide)
        weights = node.op_type in WEIGHT_OPS and any(i in data for i in node.input)
        for name in node.input[:1] if node.op_type in CHAIN_OPS else node.input:
            source = _source(name, constants) if name and name not in data else None
            if source is None:
                continue
            key = source if isinstance(source, str) else id(source)
            order.setdefault(key, source)
            if not weights:
                exact.add(key)
    yield from (source for key, source in order.items() if key not in exact)
