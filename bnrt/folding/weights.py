"""The plan applied to the weights, in float64, for both backends (``folding.torchfold``,
``folding.onnxfold``): ``fold_weights`` hands each layer over as soon as its last fold is done,
and ``fp16_overflow`` names the layers whose folded weights leave float16's range.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from bnrt.folding.decision import Decision
from bnrt.folding.engine import FP16_MAX, Plan
from bnrt.folding.reparam import merged_weights
from bnrt.folding.rules import RULES
from bnrt.folding.view import Layer


def fp16_overflow(exact: dict[str, tuple[Any, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Layers whose folded weights or bias leave float16's range, with the largest magnitude."""
    found = {}
    for name, (_, weight, bias) in exact.items():  # |x| as the larger of max and -min: no |x| array made
        largest = max(float(max(a.max(initial=0), -a.min(initial=0))) for a in (weight, bias))
        if largest > FP16_MAX:
            found[name] = largest
    return found


def fold_weights(plan: Plan, read: Callable[[Layer], tuple[np.ndarray, np.ndarray | None]],
                 scale_shift: Callable[[Decision], tuple[np.ndarray, np.ndarray]],
                 write: Callable[[str, Layer, np.ndarray, np.ndarray], None]) -> dict[str, float]:
    """Every folded decision applied, in order, in float64, then every merge, then the late folds.
    A layer's weights are read once (``read``) and take every fold planned for them (a forward fold
    from the BN before it, a backward fold from the BN after it, a merge of the branches beside it),
    so the backend rounds once: ``write(name, layer, weight, bias)`` hears each layer as soon as its
    last step is done, and its float64 copies go then (only the layers between their first and last
    steps are held at once, never the whole model). A conv merged into another gets zero weight and
    bias (its node is dropped where the graph can be edited). Returns the layers whose folded
    weights leave float16's range (``fp16_overflow``)."""
    late = set(plan.late)
    early = [d for i, d in enumerate(plan.decisions) if d.folded and d.direction != "merge" and i not in late]
    steps: list[list[Layer]] = [[t.handle for t in d.targets] for d in early]
    steps += [[m.target, *m.convs] for m in plan.merges] + [[t.handle for t in plan.decisions[i].targets]
                                                            for i in plan.late]
    last = {layer.name: i for i, layers in enumerate(steps) for layer in layers}
    exact: dict[str, tuple] = {}
    overflow: dict[str, float] = {}

    def current(layer: Layer) -> tuple[np.ndarray, np.ndarray | None]:
        return exact[layer.name][1:] if layer.name in exact else read(layer)

    def done(step: int) -> None:
        for layer in steps[step]:
            if last[layer.name] == step and layer.name in exact:
                handle, weight, bias = exact.pop(layer.name)
                overflow.update(fp16_overflow({layer.name: (handle, weight, bias)}))
                write(layer.name, handle, weight, bias)

    def fold(decision: Decision) -> None:
        s, t = scale_shift(decision)
        for target in decision.targets:
            weight, bias = current(target.handle)
            index = slice(None) if target.channels is None else np.asarray(target.channels)
            rule = RULES[(decision.direction, target.kind)]
            exact[target.layer] = (target.handle, *rule.fold(weight, bias, s[index], t[index], target.groups))

    for step, decision in enumerate(early):
        fold(decision)
        done(step)
    decision_of = {id(s.node): d for s, d in zip(plan.sites, plan.decisions)}
    for step, merge in enumerate(plan.merges, len(early)):
        weights = {layer.name: current(layer) for layer in [merge.target, *merge.convs]}
        scales = [scale_shift(decision_of[id(site.node)]) for site in merge.bns]
        exact[merge.target.name] = (merge.target, *merged_weights(merge, weights, scales))
        for conv in merge.convs:
            w = weights[conv.name][0]
            exact[conv.name] = (conv, np.zeros_like(w), np.zeros(w.shape[0]))
        del weights
        done(step)
    for step, i in enumerate(plan.late, len(early) + len(plan.merges)):  # a BN after a rep block scales the merged conv
        fold(plan.decisions[i])
        done(step)
    return overflow
