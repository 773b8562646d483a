"""The ONNX backend of the fold engine: a ``GraphView`` over an ONNX model's main graph.

BatchNorms are ``BatchNormalization`` nodes (graph order). Layers are Conv, ConvTranspose, Gemm
and MatMul nodes with constant weights (``bnrt.folding.onnxconst``: initializers, Constant nodes,
either through Identity/Cast/Reshape/Unsqueeze), a per-channel constant ``Add`` straight after one
being its bias (a split bias). Pass-through ops are Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity and Dropout
in inference (no training_mode, mask unused) and per-channel poolings (``bnrt.folding.onnxops``), their channel
maps replayed with numpy; Reshape target shapes computed in the graph
(``Shape -> Gather -> Concat``) come from one ORT run of the model on zeros, and so do the shapes
static inference cannot give (symbolic dims), at the input shapes given for planning. ``Shape`` and
``Size`` read only metadata and are not uses of a value. A value an ``If``/``Loop``/``Scan`` body
reads by name is used by that body (``SubgraphRead``); BatchNorms inside bodies are listed and
refused (``in-subgraph``): bnrt folds the main graph only (``bnrt.folding.onnxscope``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from . import onnxops, onnxscope
from bnrt.folding.onnxops import attr
from bnrt.folding.onnxconst import Constants
from bnrt.folding.onnxshapes import ValueShapes
from bnrt.folding.decision import NotFoldable
from bnrt.folding.view import BnSite, BnStats, Layer, pooled

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class GraphValue:
    """A value no node produces (graph input or initializer), as ``input_of`` returns it."""

    def __init__(self, name: str):
        self.name = name


class GraphOutput:
    """The graph's outputs, as a user of the values they expose."""

    name = "the model output"


GRAPH_OUTPUT = GraphOutput()


class SubgraphRead:
    """The bodies of ``node`` (If branches, a Loop or Scan body) reading a value by name, as a user
    of that value: they read it as it is, so folding may not change it."""

    def __init__(self, node: onnx.NodeProto):
        self.node = node
        self.name = label(node)


def label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


@dataclass
class OnnxLayer:
    """A foldable node's weights in the neutral layout (conv layout, or [out, in] for Gemm/MatMul)."""

    kind: str  # conv, convtranspose, gemm, matmul
    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    add: onnx.NodeProto | None = None  # the bias Add after the node (a split bias), part of the layer
    add_const_index: int = 1

    @property
    def output_node(self) -> onnx.NodeProto:
        return self.add or self.node

    @property
    def final(self) -> onnx.NodeProto:
        """The node producing the layer's output once written (``onnxfold``): a Conv's or Gemm's
        split bias joins the node, a MatMul's stays in its Add."""
        return self.add if self.add is not None and self.kind == "matmul" else self.node


class OnnxView:
    """``view.GraphView`` over ``model.graph``; node objects are those of ``self.nodes``."""

    keeps_structure = False

    def __init__(self, model: onnx.ModelProto, input_shapes: dict[str, tuple] | None = None):
        self.model = model
        self.graph = model.graph
        self.shapes = ValueShapes(model, input_shapes)
        self.folded: list[onnx.NodeProto] = []
        self.values: dict[str, GraphValue] = {}
        self.nested: dict[int, str] = {}  # id of a BN inside a body -> that body, for people
        self.refresh()
        self.runtime = _reshape_targets(self)

    def refresh(self) -> None:
        self.nodes = list(self.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        self.inits = {i.name: i for i in self.graph.initializer}
        self.constants = Constants(self.graph, self.producer)
        self._layers: dict[int, OnnxLayer | NotFoldable] = {}
        self.scoped = onnxscope.scope_readers(self.graph)

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant in any form an exporter writes one
        (``bnrt.folding.onnxconst``: an initializer, a Constant node, either through Identity, Cast,
        Reshape, Unsqueeze or Squeeze nodes)."""
        return self.constants.value(name)

    # --- BatchNorms ---
    def batchnorms(self) -> list[BnSite]:
        found = list(onnxscope.batchnorms(self.graph))
        self.nested = {id(node): holder for _, holder, node in found if holder is not None}
        return [BnSite(name, node) for name, _, node in found]

    def bn_stats(self, bn: BnSite) -> BnStats:
        node = bn.node
        if id(node) in self.nested:  # its neighbours, tensors and writer are another graph's
            raise NotFoldable("in-subgraph", f"inside {self.nested[id(node)]}: bnrt folds the main graph only")
        if attr(node, "training_mode", 0) or sum(1 for o in node.output if o) > 1:
            raise NotFoldable("training-mode", "in training mode (training_mode=1 or running-statistics outputs)")
        if attr(node, "spatial", 1) == 0:
            raise NotFoldable("unsupported-bn", "spatial=0 (per-element statistics, opset 7)")
        values = [self.const(i) if i else None for i in node.input[1:5]]
        if len(values) < 4 or any(v is None for v in values):
            raise NotFoldable("not-constant", "scale, bias, mean or variance is not a constant")
        scale, bias, mean, var = (v.astype(np.float64) for v in values)
        return BnStats(mean, var, scale, bias, attr(node, "epsilon", 1e-5), f"BatchNormalization '{bn.name}'",
                       ("mean", "var", "scale", "bias"))

    def check_bn(self, bn: BnSite) -> None:
        return None

    def mark_folded(self, bn: BnSite) -> None:
        self.folded.append(bn.node)

    # --- graph ---
    def input_of(self, node) -> object:
        if not isinstance(node, onnx.NodeProto) or not node.input:
            return None
        if node.op_type == "Add" and self._is_bias(node):  # a split bias: the layer's own input
            node = self.bias_owner(node)
        return self.producer.get(node.input[0]) or self.value(node.input[0])

    def value(self, name: str) -> GraphValue:
        """The one ``GraphValue`` of a graph input or initializer ``name`` (compared by identity)."""
        return self.values.setdefault(name, GraphValue(name))

    def users(self, node) -> list:
        out = self._output(node)
        found = [u for u in self.consumers.get(out, []) if u.op_type not in onnxops.METADATA_OPS]
        found += [SubgraphRead(n) for n in self.scoped.get(out, [])]
        return found + [GRAPH_OUTPUT] if out in self.outputs else found

    @staticmethod
    def _output(node) -> str:
        return node.name if isinstance(node, GraphValue) else node.output[0]

    def is_graph_input(self, node) -> bool:
        return isinstance(node, GraphValue)

    def concat(self, node) -> tuple[list, int] | None:
        if not isinstance(node, onnx.NodeProto) or node.op_type != "Concat" or not all(node.input):
            return None
        return [self.producer.get(i) or self.value(i) for i in node.input], attr(node, "axis", 0)

    def is_passthrough(self, node) -> bool:
        if not isinstance(node, onnx.NodeProto):
            return False
        if node.op_type == "Dropout":
            return self._dropout_off(node)
        return node.op_type in onnxops.PASSTHROUGH_OPS or any(node is f for f in self.folded) \
            or onnxops.pooling(node, self.const) is not None

    def _dropout_off(self, node: onnx.NodeProto) -> bool:
        """A Dropout in inference: no ``training_mode`` (or a constant false one), mask unused."""
        training = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        mask_used = len(node.output) > 1 and bool(node.output[1]) and (
            node.output[1] in self.consumers or node.output[1] in self.outputs or node.output[1] in self.scoped)
        return not mask_used and (training is None or not bool(np.asarray(training).any()))

    def replay(self, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
        pool = onnxops.pooling(node, self.const)
        if pool is not None:
            return pooled(x, pool[1](x.ndim), self.shape(node), label(node))
        return onnxops.replay(node, x, self.const, self.runtime)

    def takes_max(self, node) -> bool:
        pool = onnxops.pooling(node, self.const) if isinstance(node, onnx.NodeProto) else None
        return pool is not None and pool[0] == "max" and not any(node is f for f in self.folded)

    def shape(self, node) -> tuple[int, ...] | None:
        out = self._output(node)
        shape = self.shapes.get(out)
        if shape is None:
            return None
        return tuple(2 if d is None or d == 0 else d for d in shape)  # a free batch dim replays as 2

    def layer(self, node) -> Layer | None:
        if not isinstance(node, onnx.NodeProto):
            return None
        if node.op_type == "Add":
            owner = self.bias_owner(node)
            return None if owner is None else self.layer(owner)
        if node.op_type not in LAYER_OPS:
            return None
        data = self.onnx_layer(node)
        kind = {"conv": "conv", "convtranspose": "conv-transpose"}.get(data.kind, "linear")
        layer = Layer(data.output_node, label(node), kind, data.kind, attr(node, "group", 1),
                      data.kind == "conv" and onnxops.zero_padded(node), data.kind == "gemm" and bool(attr(node, "transA", 0)),
                      data)
        return replace(layer, **onnxops.geometry(node, data.weight.shape[2:])) if kind == "conv" else layer

    def bias_owner(self, add: onnx.NodeProto) -> onnx.NodeProto | None:
        """The layer node whose bias ``add`` is (``OnnxLayer.add``), or None. A layer whose weights
        are not constants raises ``NotFoldable`` here, as it does when reached directly."""
        for name in add.input:
            node = self.producer.get(name)
            if node is not None and node.op_type in LAYER_OPS and self.onnx_layer(node).add is add:
                return node
        return None

    def onnx_layer(self, node: onnx.NodeProto) -> OnnxLayer:
        """The weights of a Conv/ConvTranspose/Gemm/MatMul node and of the bias ``Add`` after it;
        ``NotFoldable`` when not constants. Read once per node."""
        key = id(node)
        if key not in self._layers:
            try:
                self._layers[key] = self._read_layer(node)
            except NotFoldable as exc:
                self._layers[key] = exc
        found = self._layers[key]
        if isinstance(found, NotFoldable):
            raise found
        return found

    def _read_layer(self, node: onnx.NodeProto) -> OnnxLayer:
        op, name = node.op_type, label(node)
        w = self.const(node.input[1])
        has_c = len(node.input) > 2 and bool(node.input[2])
        c = self.const(node.input[2]) if has_c else None
        if w is None or (op == "MatMul" and w.ndim != 2):
            raise NotFoldable("not-constant", f"{op} '{name}' has no constant 2-D weight" if op == "MatMul"
                              else f"weight of {op} '{name}' is not constant", name)
        if has_c and c is None:
            raise NotFoldable("not-constant", f"bias of {op} '{name}' is not constant", name)
        if op in ("Conv", "ConvTranspose"):
            layer = OnnxLayer(op.lower(), node, w.astype(np.float64), None if c is None else c.astype(np.float64),
                              w.dtype)
        elif op == "Gemm":
            eff = attr(node, "alpha", 1.0) * (w if attr(node, "transB", 0) else w.T).astype(np.float64)
            bias = None if c is None else np.broadcast_to(attr(node, "beta", 1.0) * c.astype(np.float64),
                                                           np.broadcast_shapes(c.shape, (eff.shape[0],))).copy()
            layer = OnnxLayer("gemm", node, eff, bias, w.dtype)
        else:
            layer = OnnxLayer("matmul", node, w.T.astype(np.float64), None, w.dtype)
        self._split_bias(layer)
        return layer

    def _split_bias(self, layer: OnnxLayer) -> None:
        """A per-channel constant ``Add`` straight after the layer (its only reader) is its bias:
        exporters write a conv's bias so (paddle2onnx), and a MatMul has no other. Per-channel: every
        axis of the constant is 1 but the layer's channel axis (1 for convs, the last for Gemm and
        MatMul), and it adds no axis to the layer's output."""
        out = layer.node.output[0]
        users = self.consumers.get(out, [])
        if len(users) != 1 or out in self.outputs or out in self.scoped or users[0].op_type != "Add" \
                or len(users[0].input) != 2 or users[0].input[0] == users[0].input[1]:
            return
        add = users[0]
        other = 1 if add.input[0] == out else 0
        b = self.const(add.input[other])
        if b is None or not np.issubdtype(b.dtype, np.floating):
            return
        conv = layer.kind in ("conv", "convtranspose")
        channels = layer.weight.shape[1] * attr(layer.node, "group", 1) if layer.kind == "convtranspose" \
            else layer.weight.shape[0]
        rank = layer.weight.ndim if conv else 2 if layer.kind == "gemm" else len(self.shapes.get(out) or ()) or 2
        axis = 1 if conv else rank - 1
        full = (1,) * (rank - b.ndim) + b.shape if b.ndim <= rank else None
        if full is None or any(d != 1 for i, d in enumerate(full) if i != axis) or full[axis] not in (1, channels):
            return
        layer.add, layer.add_const_index = add, other
        shift = np.broadcast_to(b.astype(np.float64).reshape(-1), (channels,))
        layer.bias = shift.copy() if layer.bias is None else layer.bias + shift

    def check_layer(self, layer: Layer) -> None:
        return None  # folded weights go to new initializers: a shared weight is never changed under a node

    def adds(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if self.terms(n) is not None]

    def terms(self, node) -> list[tuple[Any, Any]] | None:
        if not isinstance(node, onnx.NodeProto) or node.op_type not in ("Add", "Sub", "Mul") or len(node.input) != 2:
            return None
        if node.op_type == "Add" and self._is_bias(node):
            return None  # a layer's own bias, part of the layer
        shape = self.shapes.get(node.output[0])
        consts = [self.const(i) for i in node.input]
        data = [i for i, c in zip(node.input, consts) if c is None]
        if shape is None or any(self.shapes.get(i) != shape for i in data):
            return None
        operands = [self.producer.get(i) or self.value(i) for i in data]
        if any(c is not None and not np.issubdtype(c.dtype, np.floating) for c in consts) or not data:
            return None
        if node.op_type == "Mul":
            return [(operands[0], next(c for c in consts if c is not None))] if len(data) == 1 else None
        operands = iter(operands)  # an added constant is a term of its own, operand None
        return [(next(operands), sign) if c is None else (None, c.astype(np.float64) * sign)
                for c, sign in zip(consts, (1.0, -1.0 if node.op_type == "Sub" else 1.0))]

    def _is_bias(self, add: onnx.NodeProto) -> bool:
        try:
            return self.bias_owner(add) is not None
        except NotFoldable:
            return False

    def is_value_identity(self, node) -> bool:
        return self.is_passthrough(node) and node.op_type in ("Identity", "Dropout", "BatchNormalization")

    def name(self, node) -> str:
        return label(node) if isinstance(node, onnx.NodeProto) else node.name

    def describe(self, node) -> str:
        if isinstance(node, GraphValue):
            return "a graph input"
        if isinstance(node, GraphOutput):
            return node.name
        if isinstance(node, SubgraphRead):
            return f"a subgraph of {node.node.op_type} '{node.name}'"
        return f"{node.op_type} '{label(node)}'"


def _reshape_targets(view: OnnxView) -> dict[str, np.ndarray]:
    """Values of Reshape target shapes computed in the graph, from one ORT run of the model on
    zeros at the planning shapes; empty when it cannot run (the BNs behind these Reshapes are
    refused with a reason)."""
    wanted = [n.input[1] for n in view.nodes if n.op_type == "Reshape" and view.const(n.input[1]) is None]
    return view.shapes.values(wanted) if wanted else {}
