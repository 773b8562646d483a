"""Fold stage: apply a plan to a deep copy of the model.

Folded BatchNorm modules become ``nn.Identity``; layers gain a bias when they had none. Each
layer's weights are taken to float64 once, receive every fold planned for them (a layer can take
a forward fold from the BN before it and a backward fold from the BN after it) with
``bnrt.folding.foldmath``, and are cast back to the layer's dtype once. A folded functional
``F.batch_norm`` call is removed from the captured graph, so the model returned is then a
``torch.fx.GraphModule``; the user-structured copy (``structured``) keeps the call with identity
statistics. The input model is never modified.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx
from torch import nn

from bnrt.folding.capture import Capture, capture
from bnrt.folding.decision import Decision, DecisionSet
from bnrt.folding.engine import Plan
from bnrt.folding.weights import fold_weights
from bnrt.folding.reparam import Merge
from bnrt.folding.structure import set_identity_statistics, set_submodule, zero_affine
from bnrt.folding.torchgraph import plan
from bnrt.folding.torchops import statistics, to_f64
from bnrt.folding.unshare import unshare as unshared
from bnrt.folding.view import Layer


@dataclass
class FoldResult(DecisionSet):
    """``model``: the folded model to run and export (same train/eval mode as the input).
    ``structured``: the same weights in the user's module structure (equal to ``model`` unless a
    functional BN was folded or branches merged: there the merged convs and identity BNs keep
    their place with zero weights, so they add exact zeros). ``decisions``: one per BatchNorm.
    ``bias_added``: layers that had no bias before folding. ``fp16_overflow``: layers whose folded
    weights exceed float16's range. ``merges``: rep blocks merged into one conv.
    ``structured_decisions`` and ``structured_bias_added``: the same for ``structured`` where it
    differs, when a block merged the input itself, which the user's forward still adds: there the
    structured copy merges that block's convs only and keeps a BN after it (``checkpoint_keeps``)."""

    model: nn.Module
    decisions: list[Decision]
    bias_added: list[str]
    structured: nn.Module | None = None
    tracer: str = "torch.fx"
    fp16_overflow: dict[str, float] = field(default_factory=dict)
    merges: list[Merge] = field(default_factory=list)
    structured_decisions: list[Decision] | None = None
    structured_bias_added: list[str] | None = None
    unshared: dict[str, str] = field(default_factory=dict)  # copy path -> the shared layer it copies
    unshared_parameters: int = 0  # parameters the copies add

    def __post_init__(self) -> None:
        if self.structured is None:
            self.structured = self.model
        if self.structured_decisions is None:
            self.structured_decisions = self.decisions
        if self.structured_bias_added is None:
            self.structured_bias_added = self.bias_added

    @property
    def checkpoint_keeps(self) -> list[str]:
        """BNs folded in the runnable model (and its ONNX) but kept in the user-structured copy (by
        name: with ``--unshare`` a BN called several times has a copy per call in the runnable model)."""
        kept = {d.bn: not d.folded for d in self.structured_decisions}
        names = [self.unshared.get(d.bn, d.bn) for d in self.decisions if d.folded]
        return list(dict.fromkeys(n for n in names if kept.get(n)))

    def structure(self) -> dict[str, list]:
        """What ``bnrt.folding.structure.apply_folded_structure`` needs to rebuild the folded (structured)
        model from the user's class."""
        in_place = [d for d in self.structured_decisions if d.folded and d.direction != "merge"]
        return {
            "identity": [d.bn for d in in_place if not d.functional],
            "bias_added": list(self.structured_bias_added),
            "functional_identity": [{k: v for k, v in d.functional.items() if k != "node"}
                                    for d in in_place if d.functional],
        }


def layer_weights(model: nn.Module, layer: Layer) -> tuple[np.ndarray, np.ndarray | None]:
    """``layer``'s weight and bias in ``model``, as float64 (bias None when it has none)."""
    module = model.get_submodule(layer.name)
    return to_f64(module.weight), None if module.bias is None else to_f64(module.bias)


def stored_weights(model: nn.Module, layer: Layer) -> tuple[np.ndarray, np.ndarray] | None:
    """``layer``'s weight and bias as ``model`` stores them (their dtype), None when ``model`` has no
    such layer (a merged branch its graph dropped) or no numpy dtype holds them (bfloat16)."""
    try:
        module = model.get_submodule(layer.name)
    except AttributeError:
        return None
    if module.bias is None or module.weight.dtype == torch.bfloat16:
        return None
    return module.weight.detach().cpu().numpy(), module.bias.detach().cpu().numpy()


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _set_param(layer: nn.Module, name: str, value: np.ndarray, like: torch.Tensor) -> None:
    """``value`` (float64) rounded once to ``like``'s dtype: numpy rounds float64 to float16
    directly, where torch's cast goes through float32 (two roundings)."""
    dtype = _NUMPY_DTYPES.get(like.dtype)
    tensor = torch.from_numpy(value.astype(dtype) if dtype else value).to(dtype=like.dtype, device=like.device)
    setattr(layer, name, nn.Parameter(tensor, requires_grad=like.requires_grad))


def _edited(root: nn.Module, cap: Capture, bypass: set[str],
            replace: dict[str, tuple[str, list[str]]]) -> torch.fx.GraphModule:
    """A GraphModule over ``root`` running ``graph`` with the nodes ``bypass`` bypassed (their users
    read their input) and each node ``replace`` maps replaced by another plus the nodes listed (a
    merged sum by its conv, plus the branches kept beside it)."""
    new_graph = torch.fx.Graph()
    new_graph.output(new_graph.graph_copy(cap.graph, {}))
    by_name = {n.name: n for n in new_graph.nodes}
    for node in list(new_graph.nodes):
        if node.name in bypass:
            node.replace_all_uses_with(node.args[0])
            new_graph.erase_node(node)
        elif node.name in replace:
            target, kept = replace[node.name]
            value = by_name[target]
            with new_graph.inserting_before(node):
                for name in kept:
                    value = new_graph.call_function(operator.add, (value, by_name[name]))
            node.replace_all_uses_with(value)
            new_graph.erase_node(node)
    module = cap.module_with_constants(root, new_graph, f"{type(root).__name__}Folded")
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


_BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _sync_to_batchnorm(model: nn.Module, cap: Capture) -> None:
    """Replace, in place, every SyncBatchNorm module by the BatchNorm of its input's rank (from the
    capture): in eval they compute the same, and the plain one needs no process group."""
    for node in cap.graph.nodes:
        module = cap.module_of(node)
        if not isinstance(module, nn.SyncBatchNorm) or not isinstance(node.args[0], torch.fx.Node):
            continue
        shape = cap.shape(node.args[0])
        plain_type = _BN_BY_RANK.get(len(shape)) if shape else None
        current = model.get_submodule(node.target)
        if plain_type is None or not isinstance(current, nn.SyncBatchNorm):
            continue
        plain = plain_type(current.num_features, current.eps, current.momentum, current.affine,
                           current.track_running_stats)
        plain.load_state_dict(current.state_dict())
        plain.train(current.training)
        set_submodule(model, node.target, plain)


def convert_sync_batchnorm(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """A deep copy of ``model`` with every called SyncBatchNorm replaced by BatchNorm1d/2d/3d
    (by the rank of its input on ``example_inputs``), for deployment without torch.distributed."""
    converted = copy.deepcopy(model)
    _sync_to_batchnorm(converted, capture(model, example_inputs))
    return converted


def _fold_into(model: nn.Module, plan: Plan) -> tuple[list[str], dict[str, float]]:
    """Apply ``plan``'s folds and merges to ``model`` in place: the layers that gained a bias, and
    those whose folded weights leave float16's range."""

    bias_added = []

    def write(layer_name: str, _layer, weight, bias) -> None:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            bias_added.append(layer_name)
        _set_param(layer, "bias", bias, layer.weight if layer.bias is None else layer.bias)
        _set_param(layer, "weight", weight, layer.weight)

    with torch.no_grad():
        overflow = fold_weights(plan, lambda layer: layer_weights(model, layer),
                                lambda d: statistics(model, d).scale_shift(), write)
    for decision in plan.decisions:
        if decision.folded and decision.direction == "merge":  # the BN stays, adding an exact zero
            zero_affine(model, decision.functional or {"weight": f"{decision.bn}.weight",
                                                       "bias": f"{decision.bn}.bias"})
        elif decision.folded and decision.functional:
            set_identity_statistics(model, decision.functional)
        elif decision.folded:
            set_submodule(model, decision.bn, nn.Identity())
    return bias_added, overflow


def apply(model: nn.Module, plan: Plan, cap: Capture | None = None, graph: bool = False) -> FoldResult:
    """Fold every ``folded`` decision and merge every rep block of ``plan`` into a deep copy of
    ``model`` (two copies when ``plan.structured`` differs: the runnable graph's and the
    user-structured one). With ``cap`` (the capture the plan came from), SyncBatchNorms left in the
    model become plain BatchNorms; ``cap`` is required when a functional BN is folded or branches
    merged. ``graph``: the runnable model is the captured graph's even when nothing edits it (an
    unshared layer's copies are called by the graph only)."""
    folded_model = copy.deepcopy(model)
    bias_added, overflow = _fold_into(folded_model, plan)
    structured, structured_plan, structured_bias = folded_model, plan, bias_added
    if plan.structured is not None:
        structured, structured_plan = copy.deepcopy(model), plan.structured
        structured_bias, _ = _fold_into(structured, structured_plan)
    if cap is not None:
        for copied in [folded_model] + ([structured] if structured is not folded_model else []):
            _sync_to_batchnorm(copied, cap)
    decisions = plan.decisions
    functional = {d.functional["node"] for d in decisions if d.folded and d.functional and d.direction != "merge"}
    merged = {m.root.name: (m.target.node.name, [c.node.name for c, _ in m.kept]) for m in plan.merges}
    runnable = folded_model
    if functional or merged or graph:
        if cap is None:
            raise ValueError("folding a functional batch_norm or merging branches needs the capture")
        if cap.tracer == "torch.fx":  # a torch.export graph is specialised to the example's shapes: the
            runnable = _edited(folded_model, cap, functional, merged)  # identity statistics stay
            runnable.train(folded_model.training)
    for copied, its_plan in ((runnable, plan), (structured, structured_plan)):  # what a check needs to know
        copied.bnrt_folded = (its_plan.decisions, plan.merges)  # read by the check's torch sides (fold partners)
    return FoldResult(runnable, decisions, bias_added, structured=structured, fp16_overflow=overflow,
                      merges=plan.merges, structured_decisions=structured_plan.decisions,
                      structured_bias_added=structured_bias)


def fold_captured(model: nn.Module, cap: Capture, planned: Plan, unshare: bool = False
                  ) -> tuple[FoldResult, Plan, nn.Module]:
    """``apply`` the plan, after unsharing reused layers when ``unshare`` (bnrt.folding.unshare):
    the result, the plan the runnable model follows and the model whose layers it names (the
    user's, or its copy with the unshared layers' copies)."""
    twin, twin_plan = unshared(model, cap, planned, plan) if unshare else (None, planned)
    if twin is None:
        return apply(model, planned, cap), planned, model
    result = apply(twin.model, twin_plan, twin.cap, graph=True)
    kept = apply(model, planned, cap)  # the user's structure: the shared layers and their BNs stay
    result.structured, result.structured_decisions = kept.structured, kept.structured_decisions
    result.structured_bias_added = kept.structured_bias_added
    result.unshared, result.unshared_parameters = twin.copies, twin.parameters
    return result, twin_plan, twin.model


def fold(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], unshare: bool = False) -> FoldResult:
    """Capture, plan and fold ``model`` (which is left unchanged).

    ``example_inputs`` are run once to learn tensor shapes. Every BatchNorm gets a decision; those
    that cannot be folded exactly stay in the model with the reason in ``decisions``. ``unshare``:
    a layer called at several places gets a copy per further call in the runnable model, so that
    each call's BN folds into its own copy (``unshared``, ``unshared_parameters``). Raises
    ``CaptureError`` when neither torch.fx nor torch.export can capture the model and
    ``HealthError`` for NaN/Inf or negative running statistics.
    """
    cap = capture(model, example_inputs)
    result, _, _ = fold_captured(model, cap, plan(cap), unshare)
    result.tracer = cap.tracer
    return result
