"""Plan stage: one ``Decision`` per BatchNorm, made before any weight is touched.

A fold rule is data: the layer types it folds into, the direction (``backward``: layer -> BN,
``forward``: BN -> layer), the layer's channel axis, a check that says why it does not apply, and
the fold itself (``bnrt.foldmath``). The walker is written once for all rules:

- it follows pure view ops (flatten, reshape, view, transpose, permute, squeeze, unsqueeze...)
  between the layer and the BN and replays them on a tensor of channel indices, which gives the
  exact map between the layer's channels and the BN's channels, or shows that there is none;
- it checks the conditions every fold needs (DESIGN.md): the BN has running statistics and is in
  eval; the layer's output has exactly one user on the way to the BN (backward) or every user of
  the BN output is a foldable layer (forward); no module on the path is called more than once; no
  parameter is shared with another module or read directly in forward; no hooks, parametrizations
  or forward overrides.

Backward is tried first, then forward; a BN that neither can fold keeps both reasons.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from . import foldmath
from .capture import VALUE_KEY, Capture
from .errors import HealthError
from .structure import tensor_at

NEAR_DEAD_SCALE = 1e3

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_aten = torch.ops.aten
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.movedim, torch.swapaxes, torch.swapdims,
                   _aten.flatten.using_ints, _aten.view.default, _aten.reshape.default, _aten.transpose.int,
                   _aten.permute.default, _aten.squeeze.dim, _aten.squeeze.dims, _aten.unsqueeze.default,
                   _aten.movedim.int, _aten.contiguous.default, _aten._unsafe_view.default}
_VIEW_METHODS = {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "squeeze",
                 "unsqueeze", "movedim", "swapaxes", "swapdims"}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)

Fold = Callable[[np.ndarray, "np.ndarray | None", np.ndarray, np.ndarray, nn.Module], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Decision:
    """What happens to one BatchNorm: folded into the layers ``into`` by ``rule`` (``direction``
    backward: the layer runs before the BN; forward: after it), through the view ops ``through``,
    or skipped for ``reason``. ``maps[i]`` gives, per channel of ``into[i]``, the BN channel whose
    scale it takes (None: channel i takes BN channel i). ``functional`` is set for an
    ``F.batch_norm`` call: the graph node's name and the paths of its tensors."""

    bn: str
    status: str
    rule: str | None = None
    into: tuple[str, ...] = ()
    direction: str | None = None
    reason: str | None = None
    warnings: tuple[str, ...] = ()
    through: tuple[str, ...] = ()
    maps: tuple[tuple[int, ...] | None, ...] = field(default=(), repr=False, compare=False)
    functional: dict | None = field(default=None, compare=False)

    @property
    def folded(self) -> bool:
        return self.status == "folded"

    def to_json(self) -> dict:
        return {"bn": self.bn, "kind": "functional" if self.functional else "module",
                "status": self.status, "rule": self.rule, "into": list(self.into),
                "direction": self.direction, "through": list(self.through), "reason": self.reason,
                "warnings": list(self.warnings)}


class DecisionSet:
    """Mixin for results that hold ``decisions``: the folded and the skipped ones."""

    decisions: list[Decision]

    @property
    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.folded]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.folded]


@dataclass(frozen=True)
class Rule:
    """One fold placement. ``channel_axis`` is the layer's channel axis in the activation it shares
    with the BN: its output (backward) or its input (forward)."""

    name: str
    direction: str
    layer_types: tuple[type[nn.Module], ...]
    channel_axis: int
    fold: Fold
    check: Callable[[str, nn.Module], str | None] = lambda name, layer: None


def _zero_padding(name: str, conv: nn.Module) -> str | None:
    if conv.padding_mode == "zeros" and any(conv._reversed_padding_repeated_twice):
        return f"'{name}' pads with zeros, which a BN folded into it would not see"
    return None


RULES: tuple[Rule, ...] = (
    Rule("conv->bn", "backward", _CONVS, 1, lambda w, b, s, t, layer: foldmath.fold_backward(w, b, s, t)),
    Rule("convtranspose->bn", "backward", _CONV_TRANSPOSES, 1,
         lambda w, b, s, t, layer: foldmath.fold_convtranspose_backward(w, b, s, t, layer.groups)),
    Rule("linear->bn", "backward", (nn.Linear,), -1, lambda w, b, s, t, layer: foldmath.fold_backward(w, b, s, t)),
    Rule("bn->linear", "forward", (nn.Linear,), -1, lambda w, b, s, t, layer: foldmath.fold_forward_linear(w, b, s, t)),
    Rule("bn->conv", "forward", _CONVS, 1,
         lambda w, b, s, t, layer: foldmath.fold_forward_conv(w, b, s, t, layer.groups), _zero_padding),
)


class _NotFoldable(Exception):
    """A reason, raised where it is found and turned into a skipped decision by ``_decide``."""


def to_f64(tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()


@dataclass(frozen=True)
class Statistics:
    """The tensors of one BatchNorm, a module's or a functional call's (weight/bias None: affine=False)."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """``(s, t)`` in float64."""
        return foldmath.bn_scale_shift(
            to_f64(self.mean), to_f64(self.var), self.eps,
            None if self.weight is None else to_f64(self.weight), None if self.bias is None else to_f64(self.bias),
        )


def _functional_statistics(root: nn.Module, f: dict) -> Statistics:
    """The tensors an ``F.batch_norm`` call reads, from the paths recorded in ``f``."""
    return Statistics(tensor_at(root, f["mean"]), tensor_at(root, f["var"]),
                      tensor_at(root, f["weight"]) if f["weight"] else None,
                      tensor_at(root, f["bias"]) if f["bias"] else None, f["eps"])


def statistics(root: nn.Module, decision: "Decision") -> Statistics:
    """The statistics a decision folds, read from ``root`` (the model or its folded copy)."""
    if decision.functional:
        return _functional_statistics(root, decision.functional)
    bn = root.get_submodule(decision.bn)
    return Statistics(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _standard(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> str | None:
    """Why ``module`` cannot be trusted to compute what its base class computes, or None."""
    if not any(type(module).forward is base.forward for base in bases if isinstance(module, base)):
        return f"{type(module).__name__} overrides forward"
    if parametrize.is_parametrized(module):
        return "has parametrizations"
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks"
    return None


def _single_use(cap: Capture, name: str) -> str | None:
    if cap.call_counts[name] > 1:
        return f"'{name}' is called {cap.call_counts[name]} times"
    if cap.direct_uses[name]:
        return f"parameters of '{name}' are read directly in forward"
    shared = cap.shared_with(name)
    if shared:
        return f"parameters of '{name}' are shared with '{shared[0]}'"
    return None


def _health(name: str, stats: Statistics) -> tuple[str, ...]:
    """Raise ``HealthError`` for statistics that break a model; return warnings for weak ones."""
    tensors = {"running_mean": stats.mean, "running_var": stats.var, "weight": stats.weight, "bias": stats.bias}
    for field_name, tensor in tensors.items():
        if tensor is not None and not bool(tensor.detach().isfinite().all()):
            raise HealthError(f"BatchNorm '{name}': {field_name} holds NaN or Inf")
    if bool((stats.var < 0).any()):
        raise HealthError(f"BatchNorm '{name}': running_var is negative in some channels")
    s, _ = stats.scale_shift()
    dead = np.flatnonzero(np.abs(s) > NEAR_DEAD_SCALE)
    if dead.size:
        return (f"{dead.size} near-dead channel(s) with |gamma/sigma| > {NEAR_DEAD_SCALE:g} "
                f"(max {np.abs(s).max():.3g}), e.g. channel {int(dead[0])}",)
    return ()


def _is_view(cap: Capture, node) -> bool:
    if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_module" and isinstance(cap.module_of(node), _VIEW_MODULES)


def _describe(cap: Capture, node) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "placeholder":
        return "a graph input"
    if node.op == "output":
        return "the model output"
    module = cap.module_of(node)
    if module is not None:
        return f"{type(module).__name__} '{node.target}'"
    return f"'{node.name}'"


def _replay(cap: Capture, src: torch.fx.Node, chain: list[torch.fx.Node], axis: int) -> torch.Tensor:
    """Run ``chain`` (view ops starting at ``src``) on a tensor shaped like ``src``'s output whose
    elements hold their index along ``axis``: the result says where each channel ends up."""
    shape = cap.shape(src)
    if shape is None:
        raise _NotFoldable(f"shape of '{src.name}' is unknown")
    axis %= len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    value = torch.arange(shape[axis]).reshape(view).expand(shape).contiguous()
    env = {src: value}

    def arg(a):
        if a in env:
            return env[a]
        if VALUE_KEY in a.meta:
            return a.meta[VALUE_KEY]
        raise _NotFoldable(f"cannot follow the shape argument '{a.name}' of a view op")

    for node in chain:
        args = torch.fx.node.map_arg(node.args, arg)
        kwargs = torch.fx.node.map_arg(node.kwargs, arg)
        if node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            env[node] = cap.module_of(node)(*args, **kwargs)
    return env[chain[-1]] if chain else value


def _layer_reason(cap: Capture, rule: Rule, node: torch.fx.Node) -> str | None:
    layer = cap.module_of(node)
    return (
        rule.check(node.target, layer)
        or (f"'{node.target}' " + r if (r := _standard(layer, rule.layer_types)) else None)
        or _single_use(cap, node.target)
    )


def rule_for(module: nn.Module | None, direction: str) -> Rule | None:
    """The rule that folds a BN into ``module`` in ``direction``, if any."""
    return next((r for r in RULES if r.direction == direction and isinstance(module, r.layer_types)), None)


def _rule_for(cap: Capture, node, direction: str) -> Rule | None:
    return rule_for(cap.module_of(node) if isinstance(node, torch.fx.Node) else None, direction)


def _identity_or(mapping: torch.Tensor) -> tuple[int, ...] | None:
    values = tuple(int(v) for v in mapping)
    return None if values == tuple(range(len(values))) else values


def _backward(cap: Capture, bn_node: torch.fx.Node) -> tuple[Rule, torch.fx.Node, list, tuple | None]:
    chain = []
    node = bn_node.args[0] if bn_node.args else None
    while _is_view(cap, node) and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    chain.reverse()
    rule = _rule_for(cap, node, "backward")
    if rule is None:
        raise _NotFoldable(f"input comes from {_describe(cap, node)}: no fold rule")
    first = chain[0] if chain else bn_node
    others = [u.name for u in node.users if u is not first]
    if others:
        raise _NotFoldable(f"output of '{node.target}' also feeds '{others[0]}'")
    reason = _layer_reason(cap, rule, node)
    if reason:
        raise _NotFoldable(reason)
    where = _replay(cap, node, chain, rule.channel_axis)
    channels = cap.shape(node)[rule.channel_axis]
    bn_pos = torch.arange(where.shape[1]).reshape([1, -1] + [1] * (where.dim() - 2)).expand(where.shape)
    channel, pos = where.reshape(-1), bn_pos.reshape(-1)
    lowest = torch.full((channels,), where.shape[1]).scatter_reduce(0, channel, pos, "amin")
    highest = torch.full((channels,), -1).scatter_reduce(0, channel, pos, "amax")
    if bool((lowest != highest).any()):
        via = f" through {', '.join(n.name for n in chain)}" if chain else ""
        raise _NotFoldable(f"channels of '{node.target}' do not map one-to-one onto BN channels{via}")
    return rule, node, chain, _identity_or(lowest)


def _forward(cap: Capture, bn_node: torch.fx.Node) -> list[tuple[Rule, torch.fx.Node, list, tuple | None]]:
    targets = []
    for user in bn_node.users:
        chain, node = [], user
        while _is_view(cap, node) and node.args[0] is (chain[-1] if chain else bn_node) and len(node.users) == 1:
            chain.append(node)
            node = next(iter(node.users))
        rule = _rule_for(cap, node, "forward")
        if rule is None or node.args[0] is not (chain[-1] if chain else bn_node):
            raise _NotFoldable(f"output feeds {_describe(cap, node)}, not a layer it can fold into")
        reason = _layer_reason(cap, rule, node)
        if reason:
            raise _NotFoldable(reason)
        where = _replay(cap, bn_node, chain, 1).movedim(rule.channel_axis, 0)
        where = where.reshape(where.shape[0], -1)
        if bool((where.amin(dim=1) != where.amax(dim=1)).any()):
            raise _NotFoldable(f"input channels of '{node.target}' mix several BN channels")
        targets.append((rule, node, chain, _identity_or(where[:, 0])))
    if not targets:
        raise _NotFoldable("output is unused")
    return targets


def _bn_nodes(cap: Capture) -> dict[str, torch.fx.Node]:
    return {n.target: n for n in cap.graph.nodes if isinstance(cap.module_of(n), _BatchNorm)}


_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default)
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


def plan(cap: Capture) -> list[Decision]:
    """One decision per BatchNorm of the captured model: modules in module order, then functional
    ``F.batch_norm`` calls in graph order."""
    nodes = _bn_nodes(cap)
    decisions = [_decide_module(cap, name, module, nodes.get(name))
                 for name, module in cap.modules.items() if isinstance(module, _BatchNorm)]
    decisions += [_decide_functional(cap, n) for n in cap.graph.nodes
                  if n.op == "call_function" and n.target in _FUNCTIONAL_BN]
    return decisions


def _decide_module(cap: Capture, name: str, bn: _BatchNorm, node: torch.fx.Node | None) -> Decision:
    if bn.running_mean is None or bn.running_var is None:
        return Decision(name, "skipped", reason="no running statistics (track_running_stats=False): "
                                                "normalises with batch statistics")
    warnings = _health(name, Statistics(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps))
    if bn.training:
        return Decision(name, "skipped", reason="in training mode: call model.eval() before folding", warnings=warnings)
    if node is None:
        return Decision(name, "skipped", reason="not called in forward", warnings=warnings)
    reason = _standard(bn, _BN_TYPES) or _single_use(cap, name)
    if reason:
        return Decision(name, "skipped", reason=reason, warnings=warnings)
    return _fold_or_skip(cap, name, node, warnings, None)


def _decide_functional(cap: Capture, node: torch.fx.Node) -> Decision:
    name = f"{node.name} (F.batch_norm)"
    if node.target is not F.batch_norm:
        return Decision(name, "skipped", reason=f"{node.target} is folded only in a torch.fx capture of F.batch_norm")
    bound = _BATCH_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["training"] is not False:
        return Decision(name, "skipped", reason="called with training=True (or a traced flag): uses batch statistics")
    tensors = {k: a[k] for k in ("running_mean", "running_var", "weight", "bias")}
    for key, arg in tensors.items():
        if arg is None and key in ("running_mean", "running_var"):
            return Decision(name, "skipped", reason="no running statistics: normalises with batch statistics")
        if arg is not None and (not isinstance(arg, torch.fx.Node) or arg.op != "get_attr"):
            return Decision(name, "skipped", reason=f"{key} is computed in forward, not a parameter or buffer")
        if arg is not None and (len(arg.users) > 1 or sum(
                n.op == "get_attr" and n.target == arg.target for n in cap.graph.nodes) > 1):
            return Decision(name, "skipped", reason=f"{key} '{arg.target}' is also read elsewhere in forward")
    baked = next((n.target for n in cap.graph.nodes if n.op == "get_attr" and n.target.startswith("_tensor_constant")), None)
    if baked:
        return Decision(name, "skipped", reason=f"forward computes tensor '{baked}' at trace time, which may read "
                                                "the statistics: resetting them could change it")
    functional = {"node": node.name, "eps": float(a["eps"]),
                  **{k: (None if v is None else v.target) for k, v in
                     zip(("mean", "var", "weight", "bias"), tensors.values())}}
    stats = _functional_statistics(cap.modules[""], functional)
    return _fold_or_skip(cap, name, node, _health(name, stats), functional)


def _fold_or_skip(cap: Capture, name: str, node: torch.fx.Node, warnings: tuple[str, ...],
                  functional: dict | None) -> Decision:
    def folded(targets, direction):
        return Decision(
            name, "folded", rule=",".join(dict.fromkeys(t[0].name for t in targets)),
            into=tuple(t[1].target for t in targets), direction=direction, warnings=warnings,
            through=tuple(n.name for t in targets for n in t[2]), maps=tuple(t[3] for t in targets),
            functional=functional,
        )

    try:
        return folded([_backward(cap, node)], "backward")
    except _NotFoldable as exc:
        backward_reason = str(exc)
    try:
        return folded(_forward(cap, node), "forward")
    except _NotFoldable as exc:
        return Decision(name, "skipped", reason=f"{backward_reason}; forward: {exc}", warnings=warnings,
                        functional=functional)
