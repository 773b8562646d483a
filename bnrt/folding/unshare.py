"""Shared layers given a copy per call (``--unshare``): one conv applied at several places, each
call followed by a BN of its own (EfficientDet's box and class nets apply one conv to every pyramid
level; mmdetection's shared heads), folds no BN, since a fold would change the weights every other
call uses too. Unsharing gives every call after the first a deep copy of the layer in the runnable
graph, so each BN folds into its own copy: the folded model has one more layer per further call,
and says how many parameters that adds. The user-structured copy (the folded checkpoint) cannot
express a copy the user's forward does not call: it keeps the shared layer and its BNs.

Only torch.fx captures are unshared (their graph becomes the runnable model); an ONNX graph needs
no unsharing, since a fold writes each node's folded weight to an initializer of its own.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch.fx
from torch import nn

from typing import Callable

from bnrt.folding.capture import Capture, facts
from bnrt.folding.engine import Plan

ROUNDS = 8  # a copied BN can reveal the conv before it as shared too: plan again, a few times at most


@dataclass
class Unshared:
    """``model``: a deep copy of the user's model with the layer copies added beside the shared
    layers; ``cap``: its capture, each further call of a shared layer calling its copy;
    ``copies``: each copy's module path and the path of the layer it copies; ``parameters``: the
    parameters the copies add."""

    model: nn.Module
    cap: Capture
    copies: dict[str, str]
    parameters: int


def reused(plan: Plan) -> list[str]:
    """The layers whose several calls kept a BN (the subjects of ``reused-layer`` refusals)."""
    return sorted({r.subject for d in plan.decisions if not d.folded for r in d.refusals
                   if r.code == "reused-layer" and r.subject})


def unshare(model: nn.Module, cap: Capture, plan: Plan, planner: Callable[[Capture], Plan]
            ) -> tuple[Unshared | None, Plan]:
    """The copies that let ``plan``'s BNs kept by a reused module fold, and the plan of the copy
    (``planner``: the backend's plan). Unsharing repeats while the new plan shows other reused
    modules (a shared conv -> BN pair: the BN's reuse hides the conv's). (None, ``plan``) when no BN
    is kept by reuse, when the copies fold no more BNs than the shared model, or when the capture
    is not torch.fx's (another capture's graph is not the model run)."""
    twin, twin_plan = None, plan
    for _ in range(ROUNDS):
        step = _unshared(twin.model if twin else model, twin.cap if twin else cap, twin_plan)
        if step is None:
            break
        twin = step if twin is None else Unshared(
            step.model, step.cap, {**twin.copies, **{k: twin.copies.get(v, v) for k, v in step.copies.items()}},
            twin.parameters + step.parameters)
        twin_plan = planner(twin.cap)
    if twin is None or len(twin_plan.folded) <= len(plan.folded):
        return None, plan
    return twin, twin_plan


def _unshared(model: nn.Module, cap: Capture, plan: Plan) -> Unshared | None:
    """One round: every further call of a module whose reuse keeps one of ``plan``'s BNs calls a
    copy of it."""
    layers = set(reused(plan))
    if not layers or cap.tracer != "torch.fx":
        return None
    twin = copy.deepcopy(model)
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(cap.graph, {}))  # node_copy keeps each node's meta (shapes)
    calls: Counter = Counter()
    copies: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers:
            continue
        calls[node.target] += 1
        if calls[node.target] == 1:
            continue
        parent, _, leaf = node.target.rpartition(".")
        owner = twin.get_submodule(parent)
        name = f"{leaf}_call{calls[node.target]}"
        while hasattr(owner, name):
            name += "_"
        owner.add_module(name, copy.deepcopy(twin.get_submodule(node.target)))
        path = f"{parent}.{name}" if parent else name
        copies[path] = node.target
        node.target = path
    added = sum(p.numel() for path in copies for p in twin.get_submodule(path).parameters())
    return Unshared(twin, facts(graph, twin, cap.tracer, cap.constants), copies, added)
