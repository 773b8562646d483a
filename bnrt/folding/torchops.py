"""What each torch op is to the fold engine, in one place: which modules and calls are BatchNorms
(modules, functional calls, the eval-mode aten ops torch.export leaves), which are layers a BN
folds into, which are pure view ops or dropout (pass-throughs), which combine tensors linearly,
and which uses of a tensor read only its metadata (shape, dtype: not uses). Also a BN's
statistics as float64 arrays. ``torchgraph`` asks these questions of a capture's nodes.
"""

from __future__ import annotations

import builtins
import inspect
import operator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from bnrt.folding.capture import is_frozen_batchnorm
from bnrt.folding.record import METADATA_ATTRS, METADATA_METHODS
from bnrt.folding.decision import Decision, NotFoldable
from bnrt.folding.structure import tensor_at
from bnrt.folding.view import BnStats

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# kind, op label, the classes whose forward a module must keep
LAYERS: tuple[tuple[str, str, tuple[type[nn.Module], ...]], ...] = (
    ("conv-transpose", "convtranspose", (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)),
    ("conv", "conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
    ("linear", "linear", (nn.Linear,)),
)

_aten = torch.ops.aten
VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.movedim, torch.swapaxes, torch.swapdims,
                   _aten.flatten.using_ints, _aten.view.default, _aten.reshape.default, _aten.transpose.int,
                   _aten.permute.default, _aten.squeeze.dim, _aten.squeeze.dims, _aten.unsqueeze.default,
                   _aten.movedim.int, _aten.contiguous.default, _aten._unsafe_view.default}
VIEW_METHODS = {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "squeeze",
                 "unsqueeze", "movedim", "swapaxes", "swapdims", "view_as", "reshape_as"}
VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      _aten.dropout.default}

SECOND_OPERAND_METADATA = {"reshape_as", "view_as", "expand_as", "type_as"}
METADATA_FUNCTIONS = {builtins.getattr, builtins.len, torch.numel, torch.zeros_like, torch.ones_like,
                       torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
                       _aten.sym_size.int, _aten.sym_numel.default, _aten.sym_stride.int}

AVG_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d,
                    nn.AvgPool3d)
MAX_POOL_MODULES = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.MaxPool1d, nn.MaxPool2d,
                    nn.MaxPool3d)
AVG_POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d,
                      F.avg_pool3d}
MAX_POOL_FUNCTIONS = {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.max_pool1d, F.max_pool2d,
                      F.max_pool3d}
REDUCTIONS = {torch.mean: "avg", torch.amax: "max", "mean": "avg", "amax": "max"}
CONCATS = {torch.cat, torch.concat, torch.concatenate, _aten.cat.default}
ADDS = {operator.add, operator.iadd, torch.add, _aten.add.Tensor}
SUBS = {operator.sub, torch.sub}
MULS = {operator.mul, torch.mul}
FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default)
EVAL_BN_OPS = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default,
                operator.getitem}
BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


def to_f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()


def f64_or_none(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else to_f64(tensor)


def module_stats(name: str, bn: _BatchNorm) -> BnStats:
    return BnStats(to_f64(bn.running_mean), to_f64(bn.running_var), f64_or_none(bn.weight), f64_or_none(bn.bias),
                   bn.eps, f"BatchNorm '{name}'")


def functional_stats(root: nn.Module, name: str, f: dict) -> BnStats:
    """The tensors an ``F.batch_norm`` call reads, from the paths recorded in ``f``."""
    def at(key):
        return to_f64(tensor_at(root, f[key])) if f[key] else None

    return BnStats(at("mean"), at("var"), at("weight"), at("bias"), f["eps"], f"BatchNorm '{name}'")


def statistics(root: nn.Module, decision: Decision) -> BnStats:
    """The statistics a decision folds, read from ``root`` (the model or its folded copy)."""
    if decision.functional:
        return functional_stats(root, decision.bn, decision.functional)
    return module_stats(decision.bn, root.get_submodule(decision.bn))


def reads_metadata_only(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether ``user`` reads only the shape, dtype or device of ``node``'s output."""
    args = user.args
    if user.op == "call_function" and user.target is builtins.getattr:
        return len(args) > 1 and args[1] in METADATA_ATTRS
    if user.op == "call_function":
        return user.target in METADATA_FUNCTIONS and args[:1] == (node,) and node not in args[1:]
    if user.op == "call_method" and user.target in METADATA_METHODS:
        return args[:1] == (node,) and node not in args[1:] and node not in user.kwargs.values()
    if user.op == "call_method" and user.target in SECOND_OPERAND_METADATA:
        return len(args) > 1 and args[1] is node and args[0] is not node
    return False


def standard(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> str | None:
    """Why ``module`` cannot be trusted to compute what its base class computes, or None."""
    if not any(type(module).forward is base.forward for base in bases if isinstance(module, base)):
        return f"{type(module).__name__} overrides forward"
    if parametrize.is_parametrized(module):
        return "has parametrizations"
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks"
    return None


def is_batchnorm(module: nn.Module | None) -> bool:
    return isinstance(module, _BatchNorm) or is_frozen_batchnorm(module)


def not_called() -> None:
    raise NotFoldable("not-called", "not called in forward")


def dropout_off(node: torch.fx.Node) -> bool:
    """An ``F.dropout``-family call traced with ``training=False`` (an identity)."""
    if node.target is _aten.dropout.default:
        return (node.args[2] if len(node.args) > 2 else node.kwargs.get("train")) is False
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    bound.apply_defaults()
    return bound.arguments.get("training") is False


def pooling(node: torch.fx.Node, module: nn.Module | None, rank: int | None) -> tuple[str, tuple[int, ...]] | None:
    """``node`` as a per-channel pooling: ("avg" or "max", the axes it pools over), or None. Exact
    for a BN's affine: average pooling without zero padding counted (``padding=0`` or
    ``count_include_pad=False``, no ``divisor_override``), global/adaptive average pooling, max
    pooling without indices, ``mean``/``amax`` over axes other than the channels (axis 1)."""
    if rank is None:
        return None
    spatial = tuple(range(2, rank))
    dims = _pool_dims(module if module is not None else node.target)
    if dims is not None and rank != dims + 2:
        return None  # an unbatched input: the pool would run over the channels too
    if module is not None:
        if isinstance(module, AVG_POOL_MODULES):
            exact = not hasattr(module, "padding") or _no_counted_padding(
                module.padding, module.count_include_pad, getattr(module, "divisor_override", None))
            return ("avg", spatial) if exact else None
        if isinstance(module, MAX_POOL_MODULES) and not module.return_indices:
            return "max", spatial
        return None
    kwargs = dict(zip(("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                       "divisor_override"), node.args)) | dict(node.kwargs)
    if node.op == "call_function" and node.target in AVG_POOL_FUNCTIONS:
        exact = "kernel_size" not in kwargs or _no_counted_padding(kwargs.get("padding", 0),
                                                                   kwargs.get("count_include_pad", True),
                                                                   kwargs.get("divisor_override"))
        return ("avg", spatial) if exact else None
    if node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS:
        indices = node.kwargs.get("return_indices", False) or any(a is True for a in node.args[1:])
        return None if indices else ("max", spatial)
    kind = REDUCTIONS.get(node.target) if node.op in ("call_function", "call_method") else None
    if kind is None:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None  # a mean over everything (or computed dims) mixes channels
    axes = tuple(sorted(d % rank for d in dims))
    return None if 1 in axes else (kind, axes)


def _pool_dims(op) -> int | None:
    """The spatial dims a pooling module or function takes (1, 2, 3), None for other ops."""
    name = type(op).__name__ if isinstance(op, nn.Module) else getattr(op, "__name__", "")
    if isinstance(op, (*AVG_POOL_MODULES, *MAX_POOL_MODULES)) or op in AVG_POOL_FUNCTIONS | MAX_POOL_FUNCTIONS:
        return int(name.rstrip("d")[-1])
    return None


def _no_counted_padding(padding, count_include_pad, divisor_override) -> bool:
    """Average pooling divides by the positions it averages: no padded zero counted, no override."""
    pads = (padding,) if isinstance(padding, int) else tuple(padding)
    return divisor_override is None and (not count_include_pad or not any(pads))
