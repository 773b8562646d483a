"""The recorded capture: one real eager run of the model, every torch call on the way recorded,
for models whose Python control flow neither torch.fx nor torch.export can capture (torchvision's
detectors: a list of images in, NMS, a list of dicts out).

A ``TorchFunctionMode`` sees every torch function and tensor method the model calls, with the
identity of the tensors it reads and returns; forward hooks on the conv / linear / BatchNorm
modules record each of their calls as one ``call_module`` node (what they compute inside is not
recorded). The result is the same module-level ``torch.fx.Graph`` the other captures give, with
each value's real shape, so one planner serves all three. It is the graph of this run only: a
model whose code takes another path on other inputs is caught by the check, which runs the eager
model. An in-place op reads the tensor it writes and its result is that tensor's from then on; a
tensor iterated over is read by the iteration (its items are recorded as the tensors they are).
Tensors the run did not compute (parameters and buffers read outside their module, plain tensor
attributes) become ``get_attr`` nodes.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Callable

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode

from bnrt.errors import CaptureError

SHAPE_KEY = "bnrt_shape"
VALUE_KEY = "bnrt_value"

OPERATORS = {"__add__": operator.add, "__iadd__": operator.iadd, "__sub__": operator.sub, "__mul__": operator.mul,
             "__truediv__": operator.truediv, "__matmul__": operator.matmul, "__getitem__": operator.getitem,
             "__neg__": operator.neg, "__pow__": operator.pow}
REVERSED = {"__radd__": operator.add, "__rsub__": operator.sub, "__rmul__": operator.mul,
            "__rtruediv__": operator.truediv, "__rmatmul__": operator.matmul}
IN_PLACE = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__", "__ior__", "__iand__"}
# Reads of a tensor's metadata only (folding changes values, never shapes, dtypes or devices); the
# recorder leaves out such reads that return no tensor (``new_zeros`` and the like are recorded)
METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "element_size", "stride",
                    "is_contiguous", "is_floating_point", "is_complex", "new_zeros", "new_ones", "new_empty",
                    "new_full", "new_tensor"}
UNRECORDED = METADATA_ATTRS | METADATA_METHODS | {"__len__", "__hash__", "names", "is_quantized", "is_meta",
                                                   "is_nested", "is_sparse", "grad_fn", "storage_offset"}


def _name(func: Callable) -> str:
    name = getattr(func, "__name__", "")
    return getattr(getattr(func, "__self__", None), "__name__", name) if name == "__get__" else name


def _tensors(value: Any, strict: bool = False) -> list[torch.Tensor]:
    """The tensors in ``value`` (nested tuples, lists, dicts); ``strict``: ``CaptureError`` for any
    other object that is not a plain number or string (tensors in it would be read unseen)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v, strict)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v, strict)]
    if strict and not isinstance(value, (int, float, bool, str, type(None))):
        raise CaptureError(f"the model returns a {type(value).__name__}: bnrt reads tensors in tuples, lists and dicts")
    return []


class Recorder(TorchFunctionMode):
    """Records the torch calls made while it is active into ``graph``."""

    def __init__(self, model: nn.Module, collapsed: Callable[[nn.Module], bool]):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.nodes: dict[int, torch.fx.Node] = {}
        self.alive: list[Any] = []  # every recorded tensor kept alive: ids are not reused
        self.depth = 0
        self.pending: list[Any] = []
        self.names: dict[int, str] = {}
        for prefix, module in model.named_modules():
            for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                self.names.setdefault(id(tensor), f"{prefix}.{name}" if prefix else name)
        self.paths = {id(m): p for p, m in model.named_modules() if collapsed(m)}
        self.held = {id(t) for m in model.modules() for v in vars(m).values() for t in _tensors(v)}
        self.constants = 0
        self.problem: CaptureError | None = None

    # --- values ---
    def bind(self, value: Any, node: torch.fx.Node) -> None:
        """``value`` (a call's result) is ``node``'s; tensors inside tuples and lists get getitem nodes."""
        if isinstance(value, torch.Tensor):
            node.meta[SHAPE_KEY] = tuple(value.shape)
            self.nodes[id(value)] = node
            self.alive.append(value)
        elif isinstance(value, (tuple, list)) and _tensors(value):
            for i, item in enumerate(value):
                if _tensors(item):
                    self.bind(item, self.graph.call_function(operator.getitem, (node, i)))
        elif isinstance(value, (int, float, bool, str, type(None), torch.Size)):
            node.meta[VALUE_KEY] = value

    def node_of(self, tensor: torch.Tensor) -> torch.fx.Node:
        """The node of a tensor the run computed, or a ``get_attr`` node for one the model held
        before it (a parameter, buffer or tensor attribute); ``CaptureError`` for a tensor made where
        the recorder cannot see (torch functions disabled, a C++ extension)."""
        node = self.nodes.get(id(tensor))
        if node is None:
            name = self.names.get(id(tensor))
            if name is None and id(tensor) not in self.held:  # kept: the model's code may catch the raise
                self.problem = CaptureError(f"a tensor of shape {tuple(tensor.shape)} appeared that no recorded "
                                            "torch call made (code run with torch functions disabled, or a C++ extension)")
                raise self.problem
            if name is None:
                name, self.constants = f"_tensor_constant{self.constants}", self.constants + 1
            node = self.graph.get_attr(name)
            self.bind(tensor, node)
        return node

    def arg(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.node_of(value)
        if isinstance(value, tuple) and not isinstance(value, torch.Size):
            return tuple(self.arg(v) for v in value)
        if isinstance(value, list):
            return [self.arg(v) for v in value]
        if isinstance(value, dict):
            return {k: self.arg(v) for k, v in value.items()}
        return value

    # --- torch calls ---
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if self.depth or (name in UNRECORDED and not _tensors(out)):
            return out
        if name == "__iter__":  # the items are read: recorded as the tensors they are
            out = list(out)
            self.bind(out, self._call("unbind", (args[0],), {}))
            return iter(out)
        written = kwargs.get("out") if isinstance(kwargs.get("out"), torch.Tensor) else (
            args[0] if args and isinstance(args[0], torch.Tensor) and (
                name in IN_PLACE or (name.endswith("_") and not name.startswith("_")) or kwargs.get("inplace") is True)
            else None)
        node = self._call(name, args, kwargs, func)
        self.bind(written if written is not None else out, node)
        return out

    def _call(self, name: str, args: tuple, kwargs: dict, func: Callable | None = None) -> torch.fx.Node:
        args, kwargs = self.arg(tuple(args)), self.arg(dict(kwargs))
        if name in OPERATORS:
            return self.graph.call_function(OPERATORS[name], args, kwargs)
        if name in REVERSED:
            return self.graph.call_function(REVERSED[name], (args[1], args[0], *args[2:]), kwargs)
        if func is None or getattr(torch.Tensor, name, None) is func:
            return self.graph.call_method(name, args, kwargs)
        if getattr(func, "__name__", "") == "__get__":
            return self.graph.call_function(builtins.getattr, (args[0], name))
        return self.graph.call_function(func, args, kwargs)

    # --- module calls ---
    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.depth == 0:  # every tensor it reads: the first positional one is its input
            self.pending.append((args, kwargs))
        self.depth += 1

    def after(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.depth -= 1  # (called when the forward raised, too: the model may catch it)
        if self.depth == 0:
            args, kwargs = self.pending.pop()
            node = self.graph.call_module(self.paths[id(module)], self.arg(tuple(args)), self.arg(dict(kwargs)))
            self.bind(out, node)


def record(model: nn.Module, example_inputs: tuple[torch.Tensor, ...],
           collapsed: Callable[[nn.Module], bool]) -> torch.fx.Graph:
    """The graph of one eager run of ``model`` on ``example_inputs`` (no gradients), calls of the
    modules ``collapsed`` accepts as single ``call_module`` nodes. The model's exceptions propagate."""
    recorder = Recorder(model, collapsed)
    for i, x in enumerate(example_inputs):
        recorder.bind(x, recorder.graph.placeholder(f"input_{i}"))
    handles = []
    try:
        for module in model.modules():
            if id(module) in recorder.paths:
                handles.append(module.register_forward_pre_hook(recorder.before, with_kwargs=True))
                handles.append(module.register_forward_hook(recorder.after, with_kwargs=True, always_call=True))
        with torch.no_grad(), recorder:
            out = model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    recorder.graph.output(tuple(recorder.node_of(t) for t in _tensors(out, strict=True)))
    if recorder.problem is not None:
        raise recorder.problem
    if recorder.depth or recorder.pending:
        raise CaptureError("a module call was entered and never left during the recorded run")
    return recorder.graph
