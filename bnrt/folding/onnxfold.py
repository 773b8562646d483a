"""Fold stage for ONNX graphs: the engine's plan over ``bnrt.folding.onnxgraph.OnnxView`` applied to a
copy of the model. BatchNormalization nodes fold into Conv, ConvTranspose, Gemm and MatMul(+Add)
nodes, backward and forward, through Reshape, Flatten, Transpose, Squeeze, Unsqueeze and Identity
when the channel map is exact; decisions are the same ``bnrt.folding.decision.Decision``s as for torch.

Folded weights are written to new initializers (copy on write), so a weight shared with another
node is never changed under it; initializers, Constant and Identity nodes left unused are removed.
Subgraphs (``If``/``Loop``/``Scan`` bodies) are not edited: a value a body reads by name is a use
of it (a read of the weights or statistics keeps those tensors, a read of an output the fold would
change refuses the fold), and a folded BN whose output a body reads leaves that name in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import engine, onnxscope
from bnrt.folding.decision import Decision, DecisionSet
from bnrt.errors import InputError, first_line
from bnrt.folding.onnxconst import CHAIN_OPS
from bnrt.folding.onnxgraph import OnnxLayer, OnnxView, label
from bnrt.folding.engine import Plan
from bnrt.folding.weights import fold_weights
from bnrt.folding.reparam import Merge
from bnrt.folding.view import BnStats, Layer

MIN_OPSET = 7


@dataclass
class OnnxFoldResult(DecisionSet):
    """``model``: the folded copy. ``decisions``: one per BatchNormalization node, graph order.
    ``fp16_overflow``: layers whose folded weights exceed float16's range."""

    model: onnx.ModelProto
    decisions: list[Decision]
    fp16_overflow: dict[str, float] = field(default_factory=dict)
    merges: list[Merge] = field(default_factory=list)
    plan: Plan | None = None
    statistics: dict[int, BnStats] = field(default_factory=dict, repr=False)  # by id of a folded decision
    written: dict[str, tuple[str, str, bool]] = field(default_factory=dict, repr=False)

    @cached_property
    def _initializers(self) -> dict[str, onnx.TensorProto]:
        return {i.name: i for i in self.model.graph.initializer}

    def stored(self, layer: Layer) -> tuple[np.ndarray, np.ndarray] | None:
        """The weight (neutral layout: [out, in] for Gemm and MatMul) and bias a folded layer has in
        ``model``, read back from its initializers; None when the graph no longer holds them (a
        merged branch dropped)."""
        names = self.written.get(layer.name)
        tensors = self._initializers
        if names is None or names[0] not in tensors or names[1] not in tensors:
            return None
        weight = numpy_helper.to_array(tensors[names[0]])
        return weight.T if names[2] else weight, numpy_helper.to_array(tensors[names[1]])


class _Writer:
    """Edits of the folded copy: new initializers, renamed values, removed nodes."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.fresh = len(graph.initializer)
        self.written: dict[str, tuple[str, str, bool]] = {}  # layer -> (weight, bias, weight transposed)

    def const(self, base: str, value: np.ndarray) -> str:
        self.fresh += 1
        name = f"{base}.bnrt{self.fresh}"
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def set_input(self, node: onnx.NodeProto, index: int, value: str) -> None:
        if len(node.input) > index:
            node.input[index] = value
        else:
            node.input.append(value)

    def rename(self, old: str, new: str) -> None:
        """Every read of value ``old`` reads ``new`` instead."""
        for node in self.graph.node:
            for i, v in enumerate(node.input):
                if v == old:
                    node.input[i] = new

    def write(self, layer_name: str, layer: OnnxLayer, weight: np.ndarray, bias: np.ndarray) -> None:
        """Store a folded layer, cast once to the layer's dtype; ``written[layer_name]`` names its
        tensors. A split bias (``OnnxLayer.add``) joins a Conv's or Gemm's own bias input (the Add
        goes, the node produces its output); a MatMul's stays in its Add."""
        node, name = layer.node, label(layer.node)
        if layer.kind in ("conv", "convtranspose"):
            node.input[1] = self.const(f"{name}.weight", weight.astype(layer.dtype))
            self.set_input(node, 2, self.const(f"{name}.bias", bias.astype(layer.dtype)))
            self.written[layer_name] = (node.input[1], node.input[2], False)
        elif layer.kind == "gemm":
            node.input[1] = self.const(f"{name}.B", weight.astype(layer.dtype))
            for key, value in (("transB", 1), ("alpha", 1.0), ("beta", 1.0)):
                for a in [a for a in node.attribute if a.name == key]:
                    node.attribute.remove(a)
                node.attribute.append(helper.make_attribute(key, value))
            self.set_input(node, 2, self.const(f"{name}.C", bias.astype(layer.dtype)))
            self.written[layer_name] = (node.input[1], node.input[2], False)
        else:
            node.input[1] = self.const(f"{name}.B", weight.T.astype(layer.dtype))
            bias_name = self.const(f"{name}.bias", bias.astype(layer.dtype))
            self.written[layer_name] = (node.input[1], bias_name, True)
            if layer.add is not None:
                layer.add.input[layer.add_const_index] = bias_name
            else:  # a MatMul without bias gains an Add that takes over its output name
                out = node.output[0]
                node.output[0] = f"{out}.bnrt_matmul"
                add = helper.make_node("Add", [node.output[0], bias_name], [out], name=f"{name}.bnrt_bias")
                index = list(self.graph.node).index(node)
                self.graph.node.insert(index + 1, add)
                layer.add = self.graph.node[index + 1]  # the layer's output node from now on (``final``)
            return
        if layer.add is not None and layer.add in self.graph.node:
            node.output[0] = layer.add.output[0]
            self.graph.node.remove(layer.add)

    def bypass(self, node: onnx.NodeProto, outputs: set[str]) -> None:
        """Remove a folded BN: its readers read its input; a BN output in ``outputs`` (graph outputs,
        values bodies read by name) is produced by the BN's producer instead (whose only reader the
        BN was, for a backward fold; a forward fold has layers as the BN's only readers)."""
        src, out = node.input[0], node.output[0]
        self.graph.node.remove(node)
        if out in outputs:
            producer = next(n for n in self.graph.node if src in n.output)
            producer.output[list(producer.output).index(src)] = out
            self.rename(src, out)
        else:
            self.rename(out, src)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop initializers, and Constant nodes and the nodes constants pass through
    (``onnxconst.CHAIN_OPS``), that nothing uses any more (bodies' reads by name are uses)."""
    outputs = {o.name for o in graph.output} | set(onnxscope.scope_readers(graph))
    removable = {"Constant", *CHAIN_OPS}
    changed = True
    while changed:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in removable and not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        changed = bool(dead)
    used = {i for n in graph.node for i in n.input} | outputs | {i.name for i in graph.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    for sparse in [s for s in graph.sparse_initializer if s.values.name not in used]:
        graph.sparse_initializer.remove(sparse)
    live = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    for vi in [v for v in graph.value_info if v.name not in live]:
        graph.value_info.remove(vi)


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
    except ValueError:  # over protobuf's 2 GiB (weights in external data, loaded): the folded file is checked from disk
        return


def fold_onnx(model: onnx.ModelProto, where: str = "model",
              input_shapes: dict[str, tuple] | None = None) -> OnnxFoldResult:
    """Fold every foldable BatchNormalization of ``model``'s main graph (a copy; ``model`` is left
    unchanged). Each BN gets a decision, in graph order. ``input_shapes`` (by input name, with
    batch): the shapes symbolic dims take where planning needs values' shapes
    (``bnrt.folding.onnxshapes``)."""
    check_model(model, where)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    view = OnnxView(folded, input_shapes)
    plan = engine.plan(view)
    stats = {id(d): view.bn_stats(bn) for d, bn in zip(plan.decisions, plan.sites) if d.folded}
    writer = _Writer(folded.graph)
    overflow = fold_weights(plan, lambda layer: (layer.data.weight, layer.data.bias),
                            lambda d: stats[id(d)].scale_shift(),
                            lambda name, layer, weight, bias: writer.write(name, layer.data, weight, bias))
    for decision, bn in zip(plan.decisions, plan.sites):
        if decision.folded and decision.direction != "merge":
            writer.bypass(bn.node, view.outputs | set(view.scoped))
    for merge in plan.merges:  # the target produces the sum; the other branches and the Adds go
        total = merge.root.output[0]
        if merge.kept:  # the branches kept beside the merged conv are added to its output
            place = list(folded.graph.node).index(merge.root)
            value = f"{total}.merged"
            for i, (conv, _) in enumerate(merge.kept):
                out = total if i == len(merge.kept) - 1 else f"{total}.merged{i + 1}"
                folded.graph.node.insert(place + i, helper.make_node(
                    "Add", [value, conv.node.output[0]], [out], name=f"{merge.root.name or total}.kept{i}"))
                value = out
        for node in [*merge.adds, *(c.data.node for c in merge.convs), *(b.node for b in merge.bns)]:
            folded.graph.node.remove(node)
        merge.target.data.final.output[0] = f"{total}.merged" if merge.kept else total
    _prune(folded.graph)
    return OnnxFoldResult(folded, plan.decisions, overflow, plan.merges, plan, stats,
                          writer.written)


def load_onnx(path) -> onnx.ModelProto:
    """Read an ONNX file (and its external data); ``InputError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, missing external data files, ...
        raise InputError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {first_line(exc)})") from exc
    if not model.opset_import:  # bytes that happen to parse as a protobuf message
        raise InputError(f"{path}: not an ONNX model (it declares no opset)")
    return model
