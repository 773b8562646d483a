"""Fold stage: apply a plan to a deep copy of the model.

Folded BatchNorms become ``nn.Identity``; layers gain a bias when they had none. The arithmetic is
``bnrt.foldmath``'s, in float64, cast back to each layer's dtype once. The input model is never
modified.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import foldmath
from .capture import capture
from .load import set_submodule
from .plan import Decision, plan, to_f64


@dataclass
class FoldResult:
    """``model``: the folded copy (same train/eval mode as the input). ``decisions``: one per BatchNorm of the input.
    ``bias_added``: layers that had no bias before folding (needed to load the weights back)."""

    model: nn.Module
    decisions: list[Decision]
    bias_added: list[str]

    @property
    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.folded]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.folded]

    def structure(self) -> dict[str, list[str]]:
        """What ``bnrt.load.apply_folded_structure`` needs to rebuild this model from its class."""
        return {"identity": [d.bn for d in self.folded], "bias_added": list(self.bias_added)}


def _set_param(layer: nn.Module, name: str, value, like: torch.Tensor) -> None:
    tensor = torch.from_numpy(value).to(dtype=like.dtype, device=like.device)
    setattr(layer, name, nn.Parameter(tensor, requires_grad=like.requires_grad))


def fold_into(layer: nn.Module, bn: nn.Module) -> bool:
    """Fold eval-mode ``bn`` into the layer that feeds it, in place. Returns True if a bias was added."""
    weight = None if bn.weight is None else to_f64(bn.weight)
    bias = None if bn.bias is None else to_f64(bn.bias)
    s, t = foldmath.bn_scale_shift(to_f64(bn.running_mean), to_f64(bn.running_var), bn.eps, weight, bias)
    had_bias = layer.bias is not None
    w, b = foldmath.fold_backward(to_f64(layer.weight), to_f64(layer.bias) if had_bias else None, s, t)
    _set_param(layer, "weight", w, layer.weight)
    _set_param(layer, "bias", b, layer.bias if had_bias else layer.weight)
    return not had_bias


def apply(model: nn.Module, decisions: list[Decision]) -> FoldResult:
    """Fold every ``folded`` decision into a deep copy of ``model``."""
    folded_model = copy.deepcopy(model)
    bias_added = []
    with torch.no_grad():
        for decision in decisions:
            if not decision.folded:
                continue
            bn = folded_model.get_submodule(decision.bn)
            for layer_name in decision.into:
                if fold_into(folded_model.get_submodule(layer_name), bn):
                    bias_added.append(layer_name)
            set_submodule(folded_model, decision.bn, nn.Identity())
    return FoldResult(folded_model, decisions, bias_added)


def fold(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> FoldResult:
    """Capture, plan and fold ``model`` (which is left unchanged).

    ``example_inputs`` are run once to learn tensor shapes. Every BatchNorm gets a decision; those
    that cannot be folded exactly stay in the model with the reason in ``decisions``. Raises
    ``CaptureError`` when torch.fx cannot trace the model and ``HealthError`` for NaN/Inf or
    negative running statistics.
    """
    return apply(model, plan(capture(model, example_inputs)))
