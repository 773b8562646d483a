"""ONNX subgraphs (the bodies of ``If``, ``Loop``, ``Scan``, held in graph attributes) as the fold
sees them. A body reads values of the graphs around it by name, without listing them as inputs of
the node that holds it: such a read is a use of the outer value all the same (``outer_reads``),
and the BatchNorms inside a body are BatchNorms of the model (``batchnorms``) that bnrt does not
fold. A name a body defines itself (input, initializer, node output) is the body's own.
"""

from __future__ import annotations

from typing import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The bodies ``node`` holds, with the attribute holding each (``then_branch``, ``body``...)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        for g in a.graphs:
            yield a.name, g


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The names ``graph`` (a body) and the bodies inside it read without defining them: values
    of an enclosing graph. A body output may name an outer value directly, so outputs are reads."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer} | {o for n in graph.node for o in n.output}
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        read |= node_reads(node)
    return read - defined - {""}


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The values of ``node``'s graph that its bodies read by name."""
    return set().union(*(outer_reads(g) for _, g in subgraphs(node)))


def scope_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """For each value of ``graph`` read inside a body, the nodes of ``graph`` holding such bodies."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in sorted(node_reads(node)):
            readers.setdefault(name, []).append(node)
    return readers


def batchnorms(graph: onnx.GraphProto, prefix: str = "",
               holder: str | None = None) -> Iterator[tuple[str, str | None, onnx.NodeProto]]:
    """``(name, holder, node)`` for every BatchNormalization of ``graph`` and of the bodies inside
    it, in graph order (a body's right after the node holding it). In a body, ``name`` is prefixed
    ``holder-node/attribute/`` per level, so it names one node of the model, and ``holder`` names
    the innermost body for people ("the then_branch subgraph of If 'if'"); None in ``graph``."""
    for node in graph.node:
        name = node.name or node.output[0]
        if node.op_type == "BatchNormalization":
            yield prefix + name, holder, node
        for attr_name, body in subgraphs(node):
            yield from batchnorms(body, f"{prefix}{name}/{attr_name}/",
                                  f"the {attr_name} subgraph of {node.op_type} '{name}'")
