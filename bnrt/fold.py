"""Fold stage: apply a plan to a deep copy of the model.

Folded BatchNorms become ``nn.Identity``; layers gain a bias when they had none. Each layer's
weights are taken to float64 once, receive every fold planned for them (a layer can take a forward
fold from the BN before it and a backward fold from the BN after it) with ``bnrt.foldmath``, and
are cast back to the layer's dtype once. The input model is never modified.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .capture import capture
from .load import set_submodule
from .plan import Decision, bn_scale_shift, plan, rule_for, to_f64


@dataclass
class FoldResult:
    """``model``: the folded copy (same train/eval mode as the input). ``decisions``: one per
    BatchNorm of the input. ``bias_added``: layers that had no bias before folding (needed to
    load the weights back into the original class)."""

    model: nn.Module
    decisions: list[Decision]
    bias_added: list[str]
    tracer: str = "torch.fx"

    @property
    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.folded]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.folded]

    def structure(self) -> dict[str, list[str]]:
        """What ``bnrt.load.apply_folded_structure`` needs to rebuild this model from its class."""
        return {"identity": [d.bn for d in self.folded], "bias_added": list(self.bias_added)}


def _set_param(layer: nn.Module, name: str, value: np.ndarray, like: torch.Tensor) -> None:
    tensor = torch.from_numpy(value).to(dtype=like.dtype, device=like.device)
    setattr(layer, name, nn.Parameter(tensor, requires_grad=like.requires_grad))


def apply(model: nn.Module, decisions: list[Decision]) -> FoldResult:
    """Fold every ``folded`` decision into a deep copy of ``model``."""
    folded_model = copy.deepcopy(model)
    exact: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for decision in decisions:
        if not decision.folded:
            continue
        s, t = bn_scale_shift(folded_model.get_submodule(decision.bn))
        for layer_name, mapping in zip(decision.into, decision.maps or (None,) * len(decision.into)):
            layer = folded_model.get_submodule(layer_name)
            weight, bias = exact.get(layer_name) or (
                to_f64(layer.weight), None if layer.bias is None else to_f64(layer.bias))
            index = slice(None) if mapping is None else np.asarray(mapping)
            exact[layer_name] = rule_for(layer, decision.direction).fold(weight, bias, s[index], t[index], layer)
        set_submodule(folded_model, decision.bn, nn.Identity())
    bias_added = []
    with torch.no_grad():
        for layer_name, (weight, bias) in exact.items():
            layer = folded_model.get_submodule(layer_name)
            if layer.bias is None:
                bias_added.append(layer_name)
            _set_param(layer, "bias", bias, layer.weight if layer.bias is None else layer.bias)
            _set_param(layer, "weight", weight, layer.weight)
    return FoldResult(folded_model, decisions, bias_added)


def fold(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> FoldResult:
    """Capture, plan and fold ``model`` (which is left unchanged).

    ``example_inputs`` are run once to learn tensor shapes. Every BatchNorm gets a decision; those
    that cannot be folded exactly stay in the model with the reason in ``decisions``. Raises
    ``CaptureError`` when neither torch.fx nor torch.export can capture the model and
    ``HealthError`` for NaN/Inf or negative running statistics.
    """
    cap = capture(model, example_inputs)
    result = apply(model, plan(cap))
    result.tracer = cap.tracer
    return result
