"""Structural reparameterization, found from the graph: parallel branches on one input summed by
``Add`` (k×k conv, 1×1 conv, several k×k convs — each with its BN already folded — an identity BN,
the input itself) become one conv with bias, exactly (float64, rounded once). This is what
RepVGG, MobileOne and their kin do in per-model ``reparameterize()`` code; here it is one rule over
the engine's ``GraphView``, for torch and ONNX graphs alike (see docs/ARCHITECTURE.md).

Conditions: every conv branch reads the same input, is called once with parameters of its own,
has an odd kernel with "same" zero padding (padding = kernel // 2), and all share stride, groups
and dilation 1; its output (through folded BNs and identities) feeds only the sum. An identity
branch (a BN in eval, or the input itself) needs stride 1 and as many output as input channels.
The input itself merges only with ``merge_inputs``: a model that keeps the user's forward (a folded
torch checkpoint) would still add it; torch plans twice (``bnrt.torchgraph.plan``), the runnable
graph with it, the user-structured copy without.
A BN that could have merged but does not keeps a ``branch-mismatch`` refusal naming why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import foldmath
from .decision import Decision, NotFoldable, Target, folded

if TYPE_CHECKING:
    from .engine import BnSite, GraphView, Layer


@dataclass
class Merge:
    """Branches merged into ``target`` (the conv with the largest kernel): the other ``convs``, the
    identity ``bns`` (their sites), ``inputs`` copies of the input itself, and the ``root`` Add whose
    output the target now produces (``adds``: every Add of the sum)."""

    target: Layer
    convs: list[Layer]
    bns: list[BnSite]
    inputs: int
    root: Any
    adds: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"into": self.target.name, "convs": [c.name for c in self.convs], "bns": [b.name for b in self.bns],
                "inputs": self.inputs}


def _leaves(view: GraphView, node: Any, adds: list) -> list:
    """Operands of the sum rooted at ``node``, through inner Adds (behind value identities such as
    an eval DropPath) whose only user is the sum."""
    inner = _source(view, node)[0] if adds else node
    operands = view.add_operands(inner)
    if operands is None or (adds and len(view.users(inner)) != 1):
        return [node]
    adds.append(inner)
    return [leaf for operand in operands for leaf in _leaves(view, operand, adds)]


def _source(view: GraphView, leaf: Any) -> tuple[Any, list]:
    """The node behind ``leaf`` through value identities (folded BNs, Identity, Dropout in eval),
    and the nodes passed, each of which must have a single user."""
    path = []
    while view.is_value_identity(leaf) and len(view.users(leaf)) == 1:
        path.append(leaf)
        leaf = view.input_of(leaf)
    return leaf, path


def _behind(view: GraphView, node: Any) -> Any:
    """The value ``node`` carries, through value identities (an ``nn.Identity`` branch, a folded BN):
    two branches read the same input when their inputs are the same behind them."""
    while view.is_value_identity(node):
        node = view.input_of(node)
    return node


def _aligned(conv: Layer) -> str | None:
    """Why a conv branch cannot be padded into another, or None."""
    if any(d != 1 for d in conv.dilation):
        return f"'{conv.name}' is dilated"
    if conv.padding is None or any(k % 2 == 0 or p != k // 2 for k, p in zip(conv.kernel, conv.padding)):
        return f"'{conv.name}' is not a centred 'same' conv (kernel {conv.kernel}, padding {conv.padding})"
    if not conv.pads_zeros and any(conv.padding):
        return f"'{conv.name}' does not pad with zeros"
    return None


def _merge(view: GraphView, root: Any, bn_sites: dict[int, tuple[int, BnSite, Decision]],
           merge_inputs: bool) -> Merge | None:
    """The merge rooted at the Add ``root``; None when the sum is not a rep block; ``NotFoldable``
    when it is one whose branches do not line up."""
    adds: list = []
    leaves = _leaves(view, root, adds)
    if len(leaves) < 2:
        return None
    convs, bns, others = [], [], []
    for leaf in leaves:
        source, _ = _source(view, leaf)
        layer = view.layer(source) if not view.is_graph_input(source) else None
        site = bn_sites.get(id(source))
        if layer is not None and layer.kind == "conv" and len(view.users(source)) == 1:
            convs.append(layer)
        elif site is not None and not site[2].folded and site[2].refusals and site[2].refusals[0].direction \
                and len(view.users(source)) == 1 and view.bn_stats(site[1]).weight is not None:
            bns.append(site[1])
        else:
            others.append(leaf)
    if not convs or len({c.name for c in convs}) < len(convs) or len({id(b.node) for b in bns}) < len(bns):
        return None  # a branch summed twice (y + y) is not a rep block
    x = view.input_of(convs[0].node)
    same = _behind(view, x)
    if any(_behind(view, view.input_of(c.node)) is not same for c in convs) \
            or any(_behind(view, view.input_of(b.node)) is not same for b in bns) \
            or any(_behind(view, o) is not same for o in others):
        return None
    if not bns and not others and len(convs) < 2:
        return None
    if others and not merge_inputs:  # the user's forward would still add the input: no weight to zero
        return None
    first = convs[0]
    for conv in convs:
        reason = _aligned(conv) or (f"'{conv.name}' has stride {conv.stride} and groups {conv.groups}, "
                                    f"'{first.name}' {first.stride} and {first.groups}"
                                    if (conv.stride, conv.groups) != (first.stride, first.groups) else None)
        if reason:
            raise NotFoldable("branch-mismatch", reason, conv.name)
        view.check_layer(conv)
    if (bns or others) and (any(s != 1 for s in first.stride) or view.shape(x) != view.shape(first.node)):
        raise NotFoldable("branch-mismatch", f"an identity branch beside '{first.name}' needs stride 1 and as many "
                                             "output as input channels", first.name)
    target = max(convs, key=lambda c: int(np.prod(c.kernel)))
    return Merge(target, [c for c in convs if c is not target], bns, len(others), root, adds)


def plan_merges(view: GraphView, sites: list[BnSite], decisions: list[Decision],
                merge_inputs: bool) -> tuple[list[Merge], list[Decision]]:
    """Rep blocks of the graph, after the BN folds of ``decisions``; identity BNs merged get a
    folded decision (direction ``merge``), those in a block that does not line up a
    ``branch-mismatch`` refusal. ``merge_inputs``: the input itself may be a branch."""
    bn_sites = {id(s.node): (i, s, d) for i, (s, d) in enumerate(zip(sites, decisions)) if s.node is not None}
    decisions = list(decisions)
    merges: list[Merge] = []
    inner: set[int] = set()
    for node in reversed(view.adds()):  # roots first: a sum's inner Adds are claimed by its root
        if id(node) in inner:
            continue
        try:
            merge = _merge(view, node, bn_sites, merge_inputs)
        except NotFoldable as exc:
            adds: list = []
            for leaf in _leaves(view, node, adds):
                hit = bn_sites.get(id(_source(view, leaf)[0]))
                if hit is not None and not hit[2].folded:
                    i, site, d = hit
                    decisions[i] = replace(d, refusals=d.refusals + (replace(exc.refusal, direction="merge"),))
            inner.update(id(a) for a in adds)
            continue
        if merge is None:
            continue
        inner.update(id(a) for a in merge.adds)
        merges.append(merge)
        for site in merge.bns:
            i, _, d = bn_sites[id(site.node)]
            decisions[i] = folded(site.name, "merge", [Target("bn->rep", merge.target.name, "conv", merge.target.groups,
                                                              handle=merge.target)], d.warnings, site.functional)
    merges.reverse()  # graph order
    return merges, decisions


def merged_weights(merge: Merge, weights: dict[str, tuple[np.ndarray, np.ndarray | None]],
                   identity_scales: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The target's float64 weight and bias: every conv branch padded to its kernel and summed,
    plus a centred identity kernel per identity branch (scale ``s``, shift ``t`` of a BN; ones and
    zeros for the input itself)."""
    w, b = weights[merge.target.name]
    kernel = w.shape[2:]
    total_w = np.array(w, dtype=np.float64)
    total_b = np.zeros(w.shape[0]) if b is None else np.array(b, dtype=np.float64)
    for conv in merge.convs:
        cw, cb = weights[conv.name]
        total_w += foldmath.pad_kernel(cw, kernel)
        total_b += 0.0 if cb is None else cb
    ones = [(np.ones(w.shape[0]), np.zeros(w.shape[0]))] * merge.inputs
    for s, t in list(identity_scales) + ones:
        total_w += foldmath.identity_kernel(s, w.shape[1], kernel)
        total_b += t
    return total_w, total_b

