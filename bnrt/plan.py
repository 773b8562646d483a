"""Plan stage: one ``Decision`` per BatchNorm, made before any weight is touched.

A fold rule is data: the layer types it folds into, a check that says why it does not apply and
the fold it performs (``bnrt.fold`` applies it with the shared math of ``bnrt.foldmath``). The
walker below is written once for all rules. Conditions every fold needs (DESIGN.md): the BN has
running statistics and is in eval; the layer's output has exactly one user, the BN; neither module
is called more than once; no parameter is shared with another module or read directly in forward;
neither module has hooks, parametrizations or a forward of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from . import foldmath
from .capture import Capture
from .errors import HealthError

NEAR_DEAD_SCALE = 1e3

_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


@dataclass(frozen=True)
class Decision:
    """What happens to one BatchNorm: folded into ``into`` (``direction`` backward means the layer
    runs before the BN) by ``rule``, or skipped for ``reason``."""

    bn: str
    status: str
    rule: str | None = None
    into: tuple[str, ...] = ()
    direction: str | None = None
    reason: str | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def folded(self) -> bool:
        return self.status == "folded"

    def to_json(self) -> dict:
        out = asdict(self)
        out["into"] = list(self.into)
        out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True)
class Rule:
    """A backward fold placement: ``layer -> BN``."""

    name: str
    layer_types: tuple[type[nn.Module], ...]
    check: Callable[[Capture, torch.fx.Node, torch.fx.Node], str | None]


def _check_conv(cap: Capture, layer_node: torch.fx.Node, bn_node: torch.fx.Node) -> str | None:
    layer, bn = cap.module_of(layer_node), cap.module_of(bn_node)
    expected = next(bn_t for conv_t, bn_t in _CONV_BN.items() if isinstance(layer, conv_t))
    if not isinstance(bn, expected):
        return f"{type(layer).__name__} output is normalised by {type(bn).__name__}, expected {expected.__name__}"
    return None


def _check_linear(cap: Capture, layer_node: torch.fx.Node, bn_node: torch.fx.Node) -> str | None:
    bn = cap.module_of(bn_node)
    if not isinstance(bn, nn.BatchNorm1d):
        return f"Linear output is normalised by {type(bn).__name__}, expected BatchNorm1d"
    shape = cap.shape(layer_node)
    if shape is None or len(shape) != 2:
        return (
            f"Linear output has shape {shape}: BatchNorm1d normalises dim 1, which is not the "
            "Linear's feature dim unless the output is (N, C)"
        )
    return None


RULES: tuple[Rule, ...] = (
    Rule("conv->bn", tuple(_CONV_BN), _check_conv),
    Rule("linear->bn", (nn.Linear,), _check_linear),
)


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


def _health(name: str, bn: _BatchNorm) -> tuple[str, ...]:
    """Raise ``HealthError`` for statistics that break a model; return warnings for weak ones."""
    tensors = {"running_mean": bn.running_mean, "running_var": bn.running_var,
               "weight": bn.weight, "bias": bn.bias}
    for field_name, tensor in tensors.items():
        if tensor is not None and not bool(tensor.detach().isfinite().all()):
            raise HealthError(f"BatchNorm '{name}': {field_name} holds NaN or Inf")
    if bool((bn.running_var < 0).any()):
        raise HealthError(f"BatchNorm '{name}': running_var is negative in some channels")
    s, _ = foldmath.bn_scale_shift(
        to_f64(bn.running_mean), to_f64(bn.running_var), bn.eps, None if bn.weight is None else to_f64(bn.weight)
    )
    dead = np.flatnonzero(np.abs(s) > NEAR_DEAD_SCALE)
    if dead.size:
        return (f"{dead.size} near-dead channel(s) with |gamma/sigma| > {NEAR_DEAD_SCALE:g} "
                f"(max {np.abs(s).max():.3g}), e.g. channel {int(dead[0])}",)
    return ()


def to_f64(tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()


def _bn_nodes(cap: Capture) -> dict[str, torch.fx.Node]:
    return {n.target: n for n in cap.graph.nodes if isinstance(cap.module_of(n), _BatchNorm)}


def plan(cap: Capture) -> list[Decision]:
    """One decision per BatchNorm module of the captured model, in module order."""
    nodes = _bn_nodes(cap)
    decisions = []
    for name, module in cap.modules.items():
        if isinstance(module, _BatchNorm):
            decisions.append(_decide(cap, name, module, nodes.get(name)))
    return decisions


def _decide(cap: Capture, name: str, bn: _BatchNorm, node: torch.fx.Node | None) -> Decision:
    def skip(reason: str, warnings: tuple[str, ...] = ()) -> Decision:
        return Decision(name, "skipped", reason=reason, warnings=warnings)

    if bn.running_mean is None or bn.running_var is None:
        return skip("no running statistics (track_running_stats=False): normalises with batch statistics")
    warnings = _health(name, bn)
    if bn.training:
        return skip("in training mode: call model.eval() before folding", warnings)
    if node is None:
        return skip("not called in forward", warnings)
    reason = _standard(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) or _single_use(cap, name)
    if reason:
        return skip(reason, warnings)

    producer = node.args[0] if node.args else None
    if not isinstance(producer, torch.fx.Node) or producer.op != "call_module":
        what = "a graph input" if getattr(producer, "op", None) == "placeholder" else f"'{getattr(producer, 'name', producer)}'"
        return skip(f"input comes from {what}, not from a foldable layer", warnings)
    layer_name, layer = producer.target, cap.module_of(producer)
    rule = next((r for r in RULES if isinstance(layer, r.layer_types)), None)
    if rule is None:
        return skip(f"input comes from {type(layer).__name__} '{layer_name}': no fold rule", warnings)
    others = [u.name for u in producer.users if u is not node]
    reason = (
        rule.check(cap, producer, node)
        or (f"output of '{layer_name}' also feeds '{others[0]}'" if others else None)
        or (f"'{layer_name}' " + r if (r := _standard(layer, rule.layer_types)) else None)
        or _single_use(cap, layer_name)
    )
    if reason:
        return skip(reason, warnings)
    return Decision(name, "folded", rule=rule.name, into=(layer_name,), direction="backward", warnings=warnings)

