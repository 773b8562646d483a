"""Fold stage for ONNX graphs: BatchNormalization nodes folded into Conv, ConvTranspose, Gemm and
MatMul(+Add) nodes, backward (layer -> BN) and forward (BN -> layer), also through Reshape,
Flatten, Transpose, Squeeze and Unsqueeze when the channel map is exact. The arithmetic is
``bnrt.foldmath``'s; decisions are ``bnrt.plan.Decision``s, so reports look the same as for
torch models.

Folded weights are written to new initializers (copy on write), so a weight shared with another
node is never changed under it; initializers, Constant and Identity nodes left unused are removed.

Refuses, with a reason: a BN in training mode (``training_mode=1`` or extra outputs), BN
parameters that are not constants, a producer whose output has another consumer, a graph output in
the middle of a pattern, a forward fold into a zero-padded Conv or a transposed Gemm input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import foldmath
from .errors import HealthError, InputError, first_line
from .plan import NEAR_DEAD_SCALE, Decision, DecisionSet

FP16_MAX = 65504.0
_CHAIN_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
MIN_OPSET = 7


class _NotFoldable(Exception):
    pass


@dataclass
class OnnxFoldResult(DecisionSet):
    """``model``: the folded copy. ``decisions``: one per BatchNormalization node, graph order.
    ``fp16_overflow``: layers whose folded weights exceed float16's range."""

    model: onnx.ModelProto
    decisions: list[Decision]
    fp16_overflow: dict[str, float] = field(default_factory=dict)


class _Graph:
    """Indexes over one ONNX graph: producers, consumers, constants, static shapes."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple] | None = None):
        self.model = model
        self.graph = model.graph
        self.refresh()
        self.shapes = shapes if shapes is not None else inferred_shapes(model)
        self._fresh = len(model.graph.initializer)
        self.fp16_overflow: dict[str, float] = {}
        self.runtime: dict[str, np.ndarray] = {}

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        self.inits = {i.name: i for i in self.graph.initializer}

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or a Constant (through Identity nodes)."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            return self.const(node.input[0])
        if node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_float", "value_int"):
                return np.array(helper.get_attribute_value(attr))
            if attr.name in ("value_floats", "value_ints"):
                return np.array(helper.get_attribute_value(attr))
        return None

    def new_const(self, base: str, value: np.ndarray) -> str:
        self._fresh += 1
        name = f"{base}.bnrt{self._fresh}"
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def only_consumer(self, value: str) -> onnx.NodeProto | None:
        users = self.consumers.get(value, [])
        return users[0] if len(users) == 1 and value not in self.outputs else None

    def static_shape(self, value: str) -> tuple[int, ...]:
        shape = self.shapes.get(value)
        if shape is None:
            raise _NotFoldable(f"shape of '{value}' is unknown")
        return tuple(2 if d is None or d == 0 else d for d in shape)  # a free batch dim replays as 2


def inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Static shapes (None for symbolic dims) of every value ONNX shape inference can type. Folding
    keeps every value's shape (a renamed value takes the BN output's name and shape), so this is
    computed once per model."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in vi.type.tensor_type.shape.dim)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _replay(g: _Graph, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """Run one chain op on an index array."""
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Flatten":
        axis = _attr(node, "axis", 1) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    if op == "Transpose":
        return np.transpose(x, _attr(node, "perm", None))
    if op in ("Squeeze", "Unsqueeze"):
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = g.const(node.input[1])
            if axes is None:
                raise _NotFoldable(f"axes of '{_label(node)}' are not constant")
            axes = [int(a) for a in np.atleast_1d(axes)]
        if op == "Squeeze":
            return np.squeeze(x, axis=None if axes is None else tuple(axes))
        out = x
        for a in sorted(int(a) % (x.ndim + len(axes)) for a in axes):
            out = np.expand_dims(out, a)
        return out
    shape = g.const(node.input[1])
    if shape is None:
        shape = g.runtime.get(node.input[1])
    if shape is None:
        raise _NotFoldable(f"target shape of '{_label(node)}' is not known")
    target = [int(d) for d in shape]
    if not _attr(node, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _index(shape: tuple[int, ...], axis: int) -> np.ndarray:
    axis %= len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(np.arange(shape[axis]).reshape(view), shape).copy()


# --- layers ---------------------------------------------------------------------------------------

@dataclass
class _Layer:
    """A foldable node seen as ``weight`` (conv layout, or [out, in] for Gemm/MatMul) and ``bias``."""

    kind: str  # conv, convtranspose, gemm, matmul
    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    add: onnx.NodeProto | None = None  # MatMul's bias Add
    add_const_index: int = 1

    @property
    def output(self) -> str:
        return (self.add or self.node).output[0]


def _layer(g: _Graph, node: onnx.NodeProto, *, as_input_of: str | None = None) -> _Layer:
    """The layer ``node`` (with a MatMul's following Add when foldable), or ``_NotFoldable``."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        w = g.const(node.input[1])
        if w is None:
            raise _NotFoldable(f"weight of {op} '{_label(node)}' is not constant")
        b = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and b is None:
            raise _NotFoldable(f"bias of {op} '{_label(node)}' is not constant")
        return _Layer(op.lower(), node, w.astype(np.float64), None if b is None else b.astype(np.float64), w.dtype)
    if op == "Gemm":
        w = g.const(node.input[1])
        if w is None:
            raise _NotFoldable(f"B of Gemm '{_label(node)}' is not constant")
        if as_input_of is not None and _attr(node, "transA", 0):
            raise _NotFoldable(f"Gemm '{_label(node)}' transposes its input (transA=1)")
        if as_input_of is not None and node.input[0] != as_input_of:
            raise _NotFoldable(f"the BN feeds Gemm '{_label(node)}' as its weight, not its input")
        eff = _attr(node, "alpha", 1.0) * (w if _attr(node, "transB", 0) else w.T).astype(np.float64)
        c = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and c is None:
            raise _NotFoldable(f"C of Gemm '{_label(node)}' is not constant")
        bias = None if c is None else np.broadcast_to(_attr(node, "beta", 1.0) * c.astype(np.float64),
                                                       np.broadcast_shapes(c.shape, (eff.shape[0],))).copy()
        return _Layer("gemm", node, eff, bias, w.dtype)
    if op == "MatMul":
        w = g.const(node.input[1])
        if w is None or w.ndim != 2:
            raise _NotFoldable(f"MatMul '{_label(node)}' has no constant 2-D right operand")
        if as_input_of is not None and node.input[0] != as_input_of:
            raise _NotFoldable(f"the BN feeds MatMul '{_label(node)}' as its weight, not its input")
        layer = _Layer("matmul", node, w.T.astype(np.float64), None, w.dtype)
        add = g.only_consumer(node.output[0])
        if add is not None and add.op_type == "Add":
            other = 1 if add.input[0] == node.output[0] else 0
            c = g.const(add.input[other])
            if c is not None and np.broadcast_shapes(c.shape, (w.shape[1],)) == (w.shape[1],):
                layer.add, layer.add_const_index = add, other
                layer.bias = np.broadcast_to(c.astype(np.float64), (w.shape[1],)).copy()
        return layer
    raise _NotFoldable(f"no fold rule for {op} '{_label(node)}'")


def _write(g: _Graph, layer: _Layer, weight: np.ndarray, bias: np.ndarray) -> None:
    """Store a folded layer back into the graph, in new initializers cast once to the layer dtype."""
    node, name = layer.node, _label(layer.node)
    largest = max(float(np.abs(weight).max(initial=0)), float(np.abs(bias).max(initial=0)))
    if largest > FP16_MAX:
        g.fp16_overflow[name] = largest
    if layer.kind in ("conv", "convtranspose"):
        node.input[1] = g.new_const(f"{name}.weight", weight.astype(layer.dtype))
        bias_name = g.new_const(f"{name}.bias", bias.astype(layer.dtype))
        if len(node.input) > 2:
            node.input[2] = bias_name
        else:
            node.input.append(bias_name)
    elif layer.kind == "gemm":
        node.input[1] = g.new_const(f"{name}.B", weight.astype(layer.dtype))
        _set_attr(node, "transB", 1)
        _set_attr(node, "alpha", 1.0)
        _set_attr(node, "beta", 1.0)
        bias_name = g.new_const(f"{name}.C", bias.astype(layer.dtype))
        if len(node.input) > 2:
            node.input[2] = bias_name
        else:
            node.input.append(bias_name)
    else:
        node.input[1] = g.new_const(f"{name}.B", weight.T.astype(layer.dtype))
        bias_name = g.new_const(f"{name}.bias", bias.astype(layer.dtype))
        if layer.add is not None:
            layer.add.input[layer.add_const_index] = bias_name
        else:  # a MatMul without bias gains an Add that takes over its output name
            out = node.output[0]
            node.output[0] = f"{out}.bnrt_matmul"
            g.shapes[node.output[0]] = g.shapes.get(out)
            add = helper.make_node("Add", [node.output[0], bias_name], [out], name=f"{name}.bnrt_bias")
            index = list(g.graph.node).index(node)
            g.graph.node.insert(index + 1, add)
            layer.add = g.graph.node[index + 1]  # protobuf stored a copy


_BACKWARD: dict[str, tuple[str, int, Callable]] = {  # kind: (rule, channel axis of output, fold)
    "conv": ("conv->bn", 1, lambda l, s, t: foldmath.fold_backward(l.weight, l.bias, s, t)),
    "convtranspose": ("convtranspose->bn", 1, lambda l, s, t: foldmath.fold_convtranspose_backward(
        l.weight, l.bias, s, t, _attr(l.node, "group", 1))),
    "gemm": ("gemm->bn", -1, lambda l, s, t: foldmath.fold_backward(l.weight, l.bias, s, t)),
    "matmul": ("matmul->bn", -1, lambda l, s, t: foldmath.fold_backward(l.weight, l.bias, s, t)),
}
_FORWARD: dict[str, tuple[str, int, Callable]] = {  # kind: (rule, channel axis of input, fold)
    "conv": ("bn->conv", 1, lambda l, s, t: foldmath.fold_forward_conv(l.weight, l.bias, s, t, _attr(l.node, "group", 1))),
    "gemm": ("bn->gemm", -1, lambda l, s, t: foldmath.fold_forward_linear(l.weight, l.bias, s, t)),
    "matmul": ("bn->matmul", -1, lambda l, s, t: foldmath.fold_forward_linear(l.weight, l.bias, s, t)),
}


def _zero_padded(node: onnx.NodeProto) -> bool:
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = _attr(node, "kernel_shape", None)
        return kernel is None or any(k > 1 for k in kernel)
    return any(p != 0 for p in _attr(node, "pads", []) or [])


def _backward(g: _Graph, bn: onnx.NodeProto):
    chain, value = [], bn.input[0]
    node = g.producer.get(value)
    while node is not None and node.op_type in _CHAIN_OPS:
        if g.only_consumer(node.output[0]) is None:
            raise _NotFoldable(f"output of {node.op_type} '{_label(node)}' has another consumer or is a graph output")
        chain.append(node)
        node = g.producer.get(node.input[0])
    if node is None:
        raise _NotFoldable("input is a graph input or an initializer")
    chain.reverse()
    if node.op_type == "Add":  # MatMul + Add
        matmul = next((g.producer.get(i) for i in node.input if g.producer.get(i) is not None
                       and g.producer[i].op_type == "MatMul"), None)
        if matmul is None:
            raise _NotFoldable(f"input comes from Add '{_label(node)}': no fold rule")
        layer = _layer(g, matmul)
        if layer.add is not node:
            raise _NotFoldable(f"Add '{_label(node)}' is not a constant bias of MatMul '{_label(matmul)}'")
    else:
        layer = _layer(g, node)
    first = chain[0] if chain else bn
    users = g.consumers.get(layer.output, [])
    if layer.output in g.outputs:
        raise _NotFoldable(f"output of '{_label(layer.node)}' is a graph output")
    if len(users) != 1 or users[0] is not first:
        raise _NotFoldable(f"output of '{_label(layer.node)}' has another consumer")
    if layer.add is not None and (len(g.consumers.get(layer.node.output[0], [])) != 1 or layer.node.output[0] in g.outputs):
        raise _NotFoldable(f"output of MatMul '{_label(layer.node)}' has another consumer")
    rule, axis, fold = _BACKWARD[layer.kind]
    where = _index(g.static_shape(layer.output), axis)
    for node in chain:
        where = _replay(g, node, where)
    channels = where.shape[1] if where.ndim > 1 else 0
    pos = np.broadcast_to(np.arange(channels).reshape([1, -1] + [1] * (where.ndim - 2)), where.shape)
    n = layer.weight.shape[1] * _attr(layer.node, "group", 1) if layer.kind == "convtranspose" else layer.weight.shape[0]
    lowest = np.full(n, channels)
    highest = np.full(n, -1)
    np.minimum.at(lowest, where.ravel(), pos.ravel())
    np.maximum.at(highest, where.ravel(), pos.ravel())
    if (lowest != highest).any():
        raise _NotFoldable(f"channels of '{_label(layer.node)}' do not map one-to-one onto BN channels")
    return rule, [(layer, lowest, chain)], fold


def _forward(g: _Graph, bn: onnx.NodeProto):
    out = bn.output[0]
    if out in g.outputs:
        raise _NotFoldable("output is a graph output")
    targets = []
    for user in g.consumers.get(out, []):
        chain, node, value = [], user, out
        while node.op_type in _CHAIN_OPS:
            nxt = g.only_consumer(node.output[0])
            if nxt is None:
                raise _NotFoldable(f"output of {node.op_type} '{_label(node)}' has another consumer or is a graph output")
            chain.append(node)
            value, node = node.output[0], nxt
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            raise _NotFoldable(f"output feeds {node.op_type} '{_label(node)}', not a layer it can fold into")
        if node.input[0] != value:
            raise _NotFoldable(f"output feeds {node.op_type} '{_label(node)}' as its weight")
        layer = _layer(g, node, as_input_of=value)
        if layer.kind == "conv" and _zero_padded(node):
            raise _NotFoldable(f"Conv '{_label(node)}' pads with zeros, which a BN folded into it would not see")
        rule, axis, fold = _FORWARD[layer.kind]
        where = _index(g.static_shape(out), 1)
        for c in chain:
            where = _replay(g, c, where)
        moved = np.moveaxis(where, axis, 0).reshape(where.shape[axis], -1)
        if (moved.min(axis=1) != moved.max(axis=1)).any():
            raise _NotFoldable(f"input channels of '{_label(node)}' mix several BN channels")
        targets.append((layer, moved[:, 0], chain))
    if not targets:
        raise _NotFoldable("output is unused")
    return _FORWARD[targets[0][0].kind][0], targets, None


def _bn_scale_shift(g: _Graph, bn: onnx.NodeProto, name: str):
    values = [g.const(i) if i else None for i in bn.input[1:5]]
    if len(values) < 4 or any(v is None for v in values):
        raise _NotFoldable("scale, bias, mean or variance is not a constant")
    scale, bias, mean, var = (v.astype(np.float64) for v in values)
    for label, v in zip(("scale", "bias", "mean", "var"), (scale, bias, mean, var)):
        if not np.isfinite(v).all():
            raise HealthError(f"BatchNormalization '{name}': {label} holds NaN or Inf")
    if (var < 0).any():
        raise HealthError(f"BatchNormalization '{name}': var is negative in some channels")
    return foldmath.bn_scale_shift(mean, var, _attr(bn, "epsilon", 1e-5), scale, bias)


def _decide(g: _Graph, bn: onnx.NodeProto) -> tuple[Decision, Callable[[], None] | None]:
    name = _label(bn)

    def skip(reason: str, warnings=()) -> tuple[Decision, None]:
        return Decision(name, "skipped", reason=reason, warnings=warnings), None

    if _attr(bn, "training_mode", 0) or sum(1 for o in bn.output if o) > 1:
        return skip("in training mode (training_mode=1 or running-statistics outputs)")
    if _attr(bn, "spatial", 1) == 0:
        return skip("spatial=0 (per-element statistics, opset 7)")
    try:
        s, t = _bn_scale_shift(g, bn, name)
    except _NotFoldable as exc:
        return skip(str(exc))
    warnings = ()
    if (np.abs(s) > NEAR_DEAD_SCALE).any():
        warnings = (f"{int((np.abs(s) > NEAR_DEAD_SCALE).sum())} near-dead channel(s) with |gamma/sigma| > "
                    f"{NEAR_DEAD_SCALE:g} (max {np.abs(s).max():.3g})",)
    try:
        rule, targets, fold = _backward(g, bn)
        direction = "backward"
    except _NotFoldable as back:
        try:
            rule, targets, fold = _forward(g, bn)
            direction = "forward"
        except _NotFoldable as fwd:
            return skip(f"{back}; forward: {fwd}", warnings)

    def apply() -> None:
        for layer, mapping, _ in targets:
            f = fold or _FORWARD[layer.kind][2]
            weight, bias = f(layer, s[mapping], t[mapping])
            _write(g, layer, weight, bias)
        if direction == "backward":  # the layer (or the chain's end) now produces the BN's output name
            end = targets[0][2][-1] if targets[0][2] else (targets[0][0].add or targets[0][0].node)
            end.output[0] = bn.output[0]
        else:
            for node in g.graph.node:
                for i, v in enumerate(node.input):
                    if v == bn.output[0]:
                        node.input[i] = bn.input[0]
        g.graph.node.remove(bn)
        g.refresh()

    rules = ",".join(dict.fromkeys(_FORWARD[l.kind][0] if direction == "forward" else rule for l, _, _ in targets))
    decision = Decision(name, "folded", rule=rules, into=tuple(_label(l.node) for l, _, _ in targets),
                        direction=direction, warnings=warnings,
                        through=tuple(_label(n) for _, _, chain in targets for n in chain))
    return decision, apply


def _runtime_shapes(model: onnx.ModelProto, g: _Graph) -> dict[str, np.ndarray]:
    """Values of Reshape target shapes computed in the graph (``Shape -> Gather -> Concat``), from
    one ORT run of the original model on zeros, free dimensions set to 2 as in the replay."""
    wanted = [n.input[1] for n in model.graph.node if n.op_type == "Reshape" and g.const(n.input[1]) is None]
    if not wanted:
        return {}
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 2 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = np.zeros(dims, dtype=helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = session.run(list(dict.fromkeys(wanted)), feeds)
    except Exception:  # the shapes stay unknown; the BNs behind these Reshapes are refused with a reason
        return {}
    return dict(zip(dict.fromkeys(wanted), values))


def _prune(g: _Graph) -> None:
    """Drop initializers, Constant and Identity nodes that nothing uses any more."""
    changed = True
    while changed:
        g.refresh()
        changed = False
        for node in list(g.graph.node):
            if node.op_type in ("Constant", "Identity") and not any(
                    o in g.consumers or o in g.outputs for o in node.output):
                g.graph.node.remove(node)
                changed = True
    g.refresh()
    graph_inputs = {i.name for i in g.graph.input}
    for init in list(g.graph.initializer):
        if init.name not in g.consumers and init.name not in g.outputs and init.name not in graph_inputs:
            g.graph.initializer.remove(init)
    live = {o for n in g.graph.node for o in n.output} | {i.name for i in g.graph.input}
    for vi in list(g.graph.value_info):
        if vi.name not in live:
            g.graph.value_info.remove(vi)


def check_model(model: onnx.ModelProto, where: str) -> None:
    """``InputError`` for graphs bnrt cannot fold: unknown opset, invalid graph."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or not MIN_OPSET <= version <= onnx.defs.onnx_opset_version():
        raise InputError(f"{where}: opset {version} is not supported (this onnx knows {MIN_OPSET} to "
                         f"{onnx.defs.onnx_opset_version()})")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{where}: invalid ONNX graph ({first_line(exc)})") from exc


def fold_onnx(model: onnx.ModelProto, where: str = "model") -> OnnxFoldResult:
    """Fold every foldable BatchNormalization of ``model``'s main graph (a copy; ``model`` is left
    unchanged). Each BN gets a decision, in graph order."""
    check_model(model, where)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    decisions = []
    g = _Graph(folded)
    g.runtime = _runtime_shapes(model, g)
    for bn in [n for n in folded.graph.node if n.op_type == "BatchNormalization"]:
        decision, apply = _decide(g, bn)
        if apply is not None:
            apply()
        decisions.append(decision)
    _prune(g)
    return OnnxFoldResult(folded, decisions, g.fp16_overflow)


def load_onnx(path) -> onnx.ModelProto:
    """Read an ONNX file (and its external data); ``InputError`` naming the file otherwise."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, missing external data files, ...
        raise InputError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {first_line(exc)})") from exc
