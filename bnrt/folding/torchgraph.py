"""The torch backend of the fold engine: a ``GraphView`` over a ``Capture`` (torch.fx graph, or
torch.export's collapsed to module calls), and the torch plan (``plan(cap)``).

BatchNorms are ``_BatchNorm`` modules (module order) and ``F.batch_norm`` calls (graph order).
Layers are Conv/ConvTranspose/Linear modules whose forward is their class's own, without
parametrizations or hooks, called once, with parameters used by nobody else. Pass-through ops are
pure view ops (flatten, reshape, view, transpose, permute, squeeze, unsqueeze, ...), ``nn.Identity``
and ``nn.Flatten``/``nn.Unflatten``; their channel map is replayed on a tensor of channel indices.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import engine
from bnrt.folding.capture import OPS_KEY, SHAPE_KEY, VALUE_KEY, Capture, is_frozen_batchnorm
from bnrt.folding.decision import NotFoldable
from bnrt.folding.view import pooled, BnSite, BnStats, Layer
from bnrt.folding.structure import tensor_at
from bnrt.folding.torchops import (ADDS, BATCH_NORM_SIGNATURE, BN_TYPES, CONCATS, DROPOUT_FUNCTIONS, DROPOUT_MODULES, EVAL_BN_OPS, FUNCTIONAL_BN, LAYERS, MULS, SUBS, VIEW_FUNCTIONS, VIEW_METHODS, VIEW_MODULES, dropout_off, functional_stats, is_batchnorm, module_stats, not_called, pooling, reads_metadata_only, standard)


class TorchView:
    """``view.GraphView`` over a capture."""

    keeps_structure = True

    def __init__(self, cap: Capture):
        self.cap = cap
        self.folded: set[torch.fx.Node] = set()
        self.calls: dict[torch.fx.Node, dict] = {}
        self.baked = next((n.target for n in cap.graph.nodes
                           if n.op == "get_attr" and n.target.startswith("_tensor_constant")), None)

    # --- BatchNorms ---
    def batchnorms(self) -> list[BnSite]:
        """BatchNorm and frozen-BatchNorm modules in module order, then ``F.batch_norm`` calls in
        graph order. A BN module whose forward was traced through (a subclass adding an activation,
        as timm's ``BatchNormAct2d``) is one site: its ``F.batch_norm`` call, under the module's name."""
        cap = self.cap
        nodes = {n.target: n for n in cap.graph.nodes if is_batchnorm(cap.module_of(n))}
        calls = {n: self._functional(n) for n in cap.graph.nodes
                 if n.op == "call_function" and n.target in FUNCTIONAL_BN}
        inside = {f["mean"].rpartition(".")[0]: n for n, f in calls.items() if f.get("mean")}
        sites = []
        for name, module in cap.modules.items():
            if not is_batchnorm(module):
                continue
            call = inside.get(name)
            if name not in nodes and call is not None and calls[call]["mean"] == f"{name}.running_mean":
                sites.append(BnSite(name, call, calls.pop(call)))
            elif self._eval_batch_norm_only(name, nodes.get(name)) and standard(module, BN_TYPES):
                # a BN subclass (timm's BatchNormAct2d) that torch.export shows computing one eval
                # batch_norm on its own tensors, its activation a child: folded with identity statistics
                node = nodes[name]
                sites.append(BnSite(name, node, {
                    "node": node.name, "mean": f"{name}.running_mean", "var": f"{name}.running_var",
                    "weight": f"{name}.weight" if module.affine else None,
                    "bias": f"{name}.bias" if module.affine else None, "eps": float(module.eps)}, module))
            else:
                sites.append(BnSite(name, nodes.get(name), None, module))
        return sites + [BnSite(f"{n.name} (F.batch_norm)", n, f) for n, f in calls.items()]

    def _eval_batch_norm_only(self, name: str, node: torch.fx.Node | None) -> bool:
        """Whether the torch.export call of module ``name`` is one eval batch_norm on its own tensors."""
        ops, reads, training = node.meta.get(OPS_KEY, ((), (), ())) if node is not None else ((), (), ())
        return bool(ops) and set(ops) <= EVAL_BN_OPS and all(r.startswith(f"{name}.") for r in reads) and \
            all(t is False for t in training)

    def _functional(self, node: torch.fx.Node) -> dict:
        """The tensor paths of an ``F.batch_norm`` call (None where an argument is not a parameter
        or buffer); its bound arguments are kept for ``bn_stats``' checks."""
        paths = {"node": node.name}
        if node.target is F.batch_norm:
            bound = BATCH_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            self.calls[node] = a = bound.arguments
            paths["eps"] = float(a["eps"])
            for key, arg in zip(("mean", "var", "weight", "bias"),
                                (a["running_mean"], a["running_var"], a["weight"], a["bias"])):
                paths[key] = arg.target if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else None
        return paths

    def bn_stats(self, bn: BnSite) -> BnStats:
        if bn.functional is None or bn.module is not None:
            if bn.module.running_mean is None or bn.module.running_var is None:
                raise NotFoldable("no-running-stats", "no running statistics (track_running_stats=False): "
                                                      "normalises with batch statistics")
            return module_stats(bn.name, bn.module)
        a = self.calls.get(bn.node)
        if a is None:
            raise NotFoldable("unsupported-bn", f"{bn.node.target} is folded only in a torch.fx capture of F.batch_norm")
        if a["training"] is not False:
            raise NotFoldable("training-mode", "called with training=True (or a traced flag): uses batch statistics")
        for key in ("running_mean", "running_var", "weight", "bias"):
            arg = a[key]
            if arg is None and key in ("running_mean", "running_var"):
                raise NotFoldable("no-running-stats", "no running statistics: normalises with batch statistics")
            if arg is not None and (not isinstance(arg, torch.fx.Node) or arg.op != "get_attr"):
                raise NotFoldable("not-constant", f"{key} is computed in forward, not a parameter or buffer")
            if arg is not None and (len(arg.users) > 1 or sum(
                    n.op == "get_attr" and n.target == arg.target for n in self.cap.graph.nodes) > 1):
                raise NotFoldable("shared-parameters", f"{key} '{arg.target}' is also read elsewhere in forward",
                                  bn.name, arg.target)
        if self.baked:
            raise NotFoldable("not-constant", f"forward computes tensor '{self.baked}' at trace time, which may read "
                                              "the statistics: resetting them could change it")
        return functional_stats(self.cap.modules[""], bn.name, bn.functional)

    def check_bn(self, bn: BnSite) -> None:
        if bn.functional is not None and bn.module is None:
            return
        if is_frozen_batchnorm(bn.module):
            return self._single_use(bn.name) if bn.node is not None else not_called()
        if bn.module.training:
            raise NotFoldable("training-mode", "in training mode: call model.eval() before folding")
        if bn.node is None:
            not_called()
        reason = standard(bn.module, BN_TYPES) if bn.functional is None else None  # replaced by nn.Identity
        if reason:
            raise NotFoldable("custom-forward", reason, bn.name)
        self._single_use(bn.name)

    def mark_folded(self, bn: BnSite) -> None:
        self.folded.add(bn.node)

    # --- graph ---
    def input_of(self, node: Any) -> Any:
        return node.args[0] if isinstance(node, torch.fx.Node) and node.args else None

    def users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in node.users if not reads_metadata_only(u, node)]

    def is_graph_input(self, node: Any) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "placeholder"

    def concat(self, node: Any) -> tuple[list, int] | None:
        if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in CONCATS \
                or not node.args or not isinstance(node.args[0], (list, tuple)):
            return None
        parts = list(node.args[0])
        axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        if not all(isinstance(p, torch.fx.Node) for p in parts) or not isinstance(axis, int):
            return None
        return parts, axis

    def is_passthrough(self, node: Any) -> bool:
        if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        if node in self.folded:
            return True
        if node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
            return dropout_off(node)
        if self._pooling(node) is not None:
            return True
        if node.op == "call_function":
            return node.target in VIEW_FUNCTIONS
        if node.op == "call_method":
            return node.target in VIEW_METHODS
        module = self.cap.module_of(node)
        return isinstance(module, VIEW_MODULES) or (isinstance(module, DROPOUT_MODULES) and not module.training)

    def _pooling(self, node: torch.fx.Node) -> tuple[str, tuple[int, ...]] | None:
        source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        shape = self.cap.shape(source) if source is not None else None
        return pooling(node, self.cap.module_of(node) if node.op == "call_module" else None,
                       None if shape is None else len(shape))

    def takes_max(self, node: Any) -> bool:
        found = self._pooling(node) if isinstance(node, torch.fx.Node) and node not in self.folded else None
        return found is not None and found[0] == "max"

    def replay(self, node: torch.fx.Node, index: np.ndarray) -> np.ndarray:
        if node in self.folded or node.target in DROPOUT_FUNCTIONS or isinstance(
                self.cap.module_of(node), DROPOUT_MODULES):
            return index
        pool = self._pooling(node)
        if pool is not None:
            return pooled(index, pool[1], self.cap.shape(node), node.name)
        source = torch.from_numpy(index)

        def arg(a: torch.fx.Node):
            if a is node.args[0]:
                return source
            if VALUE_KEY in a.meta:
                return a.meta[VALUE_KEY]
            if SHAPE_KEY in a.meta:  # a tensor read for its shape only (reshape_as, view_as)
                return torch.empty(a.meta[SHAPE_KEY])
            raise NotFoldable("unknown-shape", f"cannot follow the shape argument '{a.name}' of a view op", node.name)

        args = torch.fx.node.map_arg(node.args, arg)
        kwargs = torch.fx.node.map_arg(node.kwargs, arg)
        if node.op == "call_function":
            out = node.target(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = self.cap.module_of(node)(*args, **kwargs)
        return out.numpy()

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        return self.cap.shape(node)

    def layer(self, node: Any) -> Layer | None:
        module = self.cap.module_of(node) if isinstance(node, torch.fx.Node) else None
        for kind, op, bases in LAYERS:
            if isinstance(module, bases):
                zero_padded = kind == "conv" and module.padding_mode == "zeros" and any(
                    module._reversed_padding_repeated_twice)
                if kind != "conv":
                    return Layer(node, node.target, kind, op, getattr(module, "groups", 1), data=bases)
                padding = None if isinstance(module.padding, str) else tuple(module.padding)
                return Layer(node, node.target, kind, op, module.groups, zero_padded, data=bases,
                             kernel=tuple(module.kernel_size), stride=tuple(module.stride), padding=padding,
                             dilation=tuple(module.dilation), pads_zeros=module.padding_mode == "zeros")
        return None

    def check_layer(self, layer: Layer) -> None:
        reason = standard(self.cap.modules[layer.name], layer.data)
        if reason:
            raise NotFoldable("custom-forward", f"'{layer.name}' {reason}", layer.name)
        self._single_use(layer.name)

    def _single_use(self, name: str) -> None:
        cap = self.cap
        if cap.call_counts[name] > 1:
            raise NotFoldable("reused-layer", f"'{name}' is called {cap.call_counts[name]} times", name)
        if cap.direct_uses[name]:
            raise NotFoldable("shared-parameters", f"parameters of '{name}' are read directly in forward", name)
        shared = cap.shared_with(name)
        if shared:
            raise NotFoldable("shared-parameters", f"parameters of '{name}' are shared with '{shared[0]}'", name,
                              shared[0])

    def adds(self) -> list[torch.fx.Node]:
        if self.cap.tracer != "torch.fx":  # a merge edits the graph; torch.export's aten graph is not run
            return []
        return [n for n in self.cap.graph.nodes if self.terms(n) is not None]

    @staticmethod
    def _binary(node: Any, functions: set, method: str) -> bool:
        return isinstance(node, torch.fx.Node) and len(node.args) == 2 and not node.kwargs and (
            (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target == method))

    def _same_shape(self, node: torch.fx.Node, operands: Iterable) -> bool:
        shape = self.cap.shape(node)
        return shape is not None and all(isinstance(v, torch.fx.Node) and self.cap.shape(v) == shape for v in operands)

    def terms(self, node: Any) -> list[tuple[Any, Any]] | None:
        sub = self._binary(node, SUBS, "sub")
        if sub or self._binary(node, ADDS, "add"):
            signs = (1.0, -1.0) if sub else (1.0, 1.0)
            operands = [(a, sign) for a, sign in zip(node.args, signs)
                        if not (isinstance(a, (int, float)) and a == 0)]  # 0 + x: x
            consts = [self._constant(a) for a, _ in operands]
            arrays = [None if c is None else self._array(c) for c in consts]
            data = [a for (a, _), c in zip(operands, consts) if c is None]
            if not data or not self._same_shape(node, data) or any(
                    c is not None and v is None for c, v in zip(consts, arrays)):
                return None
            return [(a, sign) if c is None else (None, v * sign)  # an added constant: operand None
                    for (a, sign), c, v in zip(operands, consts, arrays)]
        if self._binary(node, MULS, "mul"):
            consts = [self._constant(a) for a in node.args]
            data = [a for a, c in zip(node.args, consts) if c is None]
            if len(data) != 1 or not self._same_shape(node, data):
                return None
            value = self._array(next(c for c in consts if c is not None))
            return [(data[0], value)] if value is not None else None
        return None

    @staticmethod
    def _array(value: Any) -> Any:
        """A constant as float64 numbers (None for a non-float tensor)."""
        if isinstance(value, torch.Tensor):
            return value.detach().double().cpu().numpy() if value.is_floating_point() else None
        return np.float64(value)

    def _constant(self, node: Any) -> Any:
        """A number, or a tensor read from the model's parameters and buffers through view ops only
        (timm's ``gamma.view(1, -1, 1, 1)``); None for anything computed from the inputs."""
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return node
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "get_attr":
            try:
                tensor = tensor_at(self.cap.modules[""], node.target)
            except AttributeError:  # a constant the tracer made (``_tensor_constant0``): not the model's
                return None
            return tensor if isinstance(tensor, torch.Tensor) else None
        if not node.args or not ((node.op == "call_method" and node.target in VIEW_METHODS) or (
                node.op == "call_function" and node.target in VIEW_FUNCTIONS)):
            return None
        base = self._constant(node.args[0])
        rest = node.args[1:]
        if not isinstance(base, torch.Tensor) or node.kwargs or any(
                isinstance(a, torch.fx.Node) and VALUE_KEY not in a.meta for a in rest):
            return None
        rest = [a.meta[VALUE_KEY] if isinstance(a, torch.fx.Node) else a for a in rest]
        with torch.no_grad():
            return getattr(base, node.target)(*rest) if node.op == "call_method" else node.target(base, *rest)

    def is_value_identity(self, node: Any) -> bool:
        if not isinstance(node, torch.fx.Node) or not self.is_passthrough(node):
            return False
        return node in self.folded or node.target in DROPOUT_FUNCTIONS or isinstance(
            self.cap.module_of(node), (nn.Identity, *DROPOUT_MODULES))

    def name(self, node: Any) -> str:
        return node.name if isinstance(node, torch.fx.Node) else repr(node)

    def describe(self, node: Any) -> str:
        if not isinstance(node, torch.fx.Node):
            return repr(node)
        if node.op == "placeholder":
            return "a graph input"
        if node.op == "output":
            return "the model output"
        module = self.cap.module_of(node)
        if module is not None:
            return f"{type(module).__name__} '{node.target}'"
        return f"'{node.name}'"


def plan(cap: Capture) -> engine.Plan:
    """One decision per BatchNorm of the captured model (modules in module order, then functional
    ``F.batch_norm`` calls in graph order) and the rep blocks to merge (torch.fx captures only).
    The plan is the runnable graph's, where the input itself, differences and scales may be merged
    branches; when some block has them, ``structured`` holds the plan for the user-structured copy,
    whose forward still computes them (that block merges its plain sums only, a BN after it stays)."""
    runnable = engine.plan(TorchView(cap), rewrite=True)
    if any(m.rewrites for m in runnable.merges):
        runnable.structured = engine.plan(TorchView(cap), rewrite=False)
    return runnable

