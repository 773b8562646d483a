"""What each ONNX op is to the fold engine: the pass-through ops and their replay on channel-index
arrays (``replay``), per-channel poolings (``pooling``: average pooling without counted padding,
global pooling, max pooling, ``ReduceMean``/``ReduceMax`` over axes other than the channels), the
ops that read metadata only, and a Conv's geometry and padding. ``bnrt.folding.onnxgraph`` asks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from bnrt.folding.decision import NotFoldable

PASSTHROUGH_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
METADATA_OPS = {"Shape", "Size"}
Const = Callable[[str], "np.ndarray | None"]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _axes(node: onnx.NodeProto, const: Const) -> list[int] | None:
    """A node's ``axes``: its attribute, else its constant second input; None when absent."""
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = const(node.input[1])
        if axes is None:
            raise NotFoldable("unknown-shape", f"axes of '{_label(node)}' are not constant", _label(node))
        axes = [int(a) for a in np.atleast_1d(axes)]
    return axes


def pooling(node: onnx.NodeProto, const: Const):
    """``node`` as a per-channel pooling: ("avg" or "max", axes given the input's rank), or None."""
    op = node.op_type
    spatial = lambda rank: tuple(range(2, rank))  # noqa: E731
    if sum(1 for o in node.output if o) != 1:
        return None  # MaxPool's indices
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return ("avg" if op == "GlobalAveragePool" else "max"), spatial
    if op == "MaxPool" and not attr(node, "storage_order", 0):
        return "max", spatial
    if op == "AveragePool":
        counted = attr(node, "count_include_pad", 0) and (any(attr(node, "pads", None) or []) or attr(node, "ceil_mode", 0)
                                                          or attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"))
        return None if counted else ("avg", spatial)
    if op in ("ReduceMean", "ReduceMax"):
        try:
            axes = _axes(node, const)
        except NotFoldable:  # axes computed in the graph: not a pass-through
            return None
        if not axes:
            return None  # every axis (or noop_with_empty_axes): channels mixed; over the channels: replay refuses
        return ("avg" if op == "ReduceMean" else "max"), lambda rank: tuple(sorted(int(a) % rank for a in axes))
    return None


def replay(node: onnx.NodeProto, x: np.ndarray, const: Const, runtime: dict) -> np.ndarray:
    """A pass-through op applied to a channel-index array ``x``."""
    op = node.op_type
    if op in ("Identity", "Dropout", "BatchNormalization"):
        return x
    if op == "Flatten":
        axis = attr(node, "axis", 1) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    if op == "Transpose":
        return np.transpose(x, attr(node, "perm", None))
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(node, const)
        if op == "Squeeze":
            return np.squeeze(x, axis=None if axes is None else tuple(axes))
        out = x
        for a in sorted(int(a) % (x.ndim + len(axes)) for a in axes):
            out = np.expand_dims(out, a)
        return out
    shape = const(node.input[1])
    if shape is None:
        shape = runtime.get(node.input[1])
    if shape is None:
        raise NotFoldable("unknown-shape", f"target shape of '{_label(node)}' is not known", _label(node))
    target = [int(d) for d in shape]
    if not attr(node, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    try:
        return x.reshape(target)
    except ValueError:  # a target computed at other sizes than the ones planning replays
        raise NotFoldable("unknown-shape", f"target shape {target} of '{_label(node)}' does not fit its input "
                                           f"{list(x.shape)} at the planning shapes", _label(node)) from None


def geometry(node: onnx.NodeProto, kernel: tuple[int, ...]) -> dict:
    """Kernel, strides, symmetric padding (None when asymmetric or SAME_*) and dilations of a Conv."""
    rank = len(kernel)
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = list(attr(node, "pads", None) or [0] * 2 * rank)
    symmetric = pads[:rank] == pads[rank:] and auto_pad in ("NOTSET", "VALID")
    return {"kernel": tuple(int(k) for k in kernel), "stride": tuple(attr(node, "strides", None) or [1] * rank),
            "padding": tuple(pads[:rank]) if symmetric else None,
            "dilation": tuple(attr(node, "dilations", None) or [1] * rank)}


def zero_padded(node: onnx.NodeProto) -> bool:
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = attr(node, "kernel_shape", None)
        return kernel is None or any(k > 1 for k in kernel)
    return any(p != 0 for p in attr(node, "pads", []) or [])
