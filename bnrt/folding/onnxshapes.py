"""Shapes of an ONNX graph's values for planning a fold: ONNX shape inference with the graph
inputs at the shapes given (``--input-shape``, or the check data's), and, where inference cannot
tell (symbolic dims it cannot follow, ops it does not type), the shapes measured by one ORT run of
the model on zeros at those input shapes. Without given shapes a free dim is taken as 2, in
inference (``OnnxView.shape`` replays it so) and in the runs alike.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from bnrt.session import probe


def declared_shapes(model: onnx.ModelProto) -> dict[str, tuple | None]:
    """The shapes a model's graph inputs declare, by name (None dims: symbolic; None: no shape)."""
    inits = {i.name for i in model.graph.initializer}
    return {vi.name: tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                           for d in vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else None
            for vi in model.graph.input if vi.name not in inits}


def inferred_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """Static shapes (None for symbolic dims) of every value ONNX shape inference can type, the
    graph inputs named in ``input_shapes`` taken at those shapes."""
    if input_shapes:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        for vi in fixed.graph.input:
            if vi.name in input_shapes and vi.type.tensor_type.HasField("shape"):
                for d, size in zip(vi.type.tensor_type.shape.dim, input_shapes[vi.name]):
                    d.Clear()
                    d.dim_value = int(size)
        model = fixed
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an op inference rejects: what it cannot type is measured instead
        inferred = model
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in vi.type.tensor_type.shape.dim)
    return shapes


class ValueShapes:
    """``get(name)``: a value's shape (None dims: symbolic), inferred, else measured. Folding keeps
    every value's shape, so both are computed once per model."""

    def __init__(self, model: onnx.ModelProto, input_shapes: dict[str, tuple] | None = None):
        self.model = model
        self.given = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
        self.static = inferred_shapes(model, self.given)
        self._measured: dict[str, tuple] | None = None

    def get(self, name: str) -> tuple | None:
        shape = self.static.get(name)
        if shape is None or (self.given and None in shape):
            shape = self.measured().get(name, shape)
        return shape

    def feeds(self) -> dict[str, np.ndarray]:
        """Zeros for every graph input: at the given shape, else the declared dims with free ones 2."""
        types = {vi.name: vi.type.tensor_type.elem_type for vi in self.model.graph.input}
        return {name: np.zeros(self.given.get(name) or [2 if d is None else d for d in shape or ()],
                               dtype=helper.tensor_dtype_to_np_dtype(types[name]))
                for name, shape in declared_shapes(self.model).items()}

    def values(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The values ``names`` take in one run on ``feeds``; empty when the model cannot run there."""
        wanted = list(dict.fromkeys(names))
        try:
            got = probe(self.model, wanted, self.feeds())
        except Exception:  # e.g. free spatial dims taken as 2 below a kernel's size
            return {}
        return {name: got[name] for name in wanted if name in got}

    def measured(self) -> dict[str, tuple]:
        """Shapes of the main graph's node outputs inference left unknown or (at given input
        shapes) partly symbolic, from one run."""
        if self._measured is None:
            wanted = [o for n in self.model.graph.node if n.op_type != "Constant" for o in n.output
                      if o and (self.static.get(o) is None or None in self.static[o])]
            self._measured = {k: tuple(v.shape) for k, v in self.values(wanted).items()} if wanted else {}
        return self._measured
