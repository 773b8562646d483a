"""The fold engine: one walker, one channel map and one health check for every graph backend,
applying the rule table (``rules``). A backend (``torchgraph`` for torch captures, ``onnxgraph``
for ONNX graphs) shows its graph through the ``GraphView`` protocol (``view``); the engine never
looks at torch or ONNX objects itself. The arithmetic is ``foldmath``'s (float64, rounded once by
the backend that writes the weights). See docs/ARCHITECTURE.md for how a rule or a pass-through op
is added.

For each BatchNorm, backward (layer -> BN) is tried first, then forward (BN -> layer); a BN that
neither can fold keeps one coded refusal per direction. The conditions every fold needs: the BN has running statistics and is in eval; on the way from the layer to the BN
(backward) every value has exactly one user that reads its values, or every user of the BN output
is a foldable layer reached through pass-through ops (forward); the view ops on the way map
channels one-to-one; the backend's own checks (modules called once, parameters not shared,
constants in ONNX) pass. Uses of a value's metadata only (shape, dtype) are not uses: folding
changes values, never shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bnrt.errors import HealthError
from bnrt.folding.decision import Decision, DecisionSet, NotFoldable, Refusal, Target, folded, skipped
from bnrt.folding.reparam import Merge, plan_merges
from bnrt.folding.rules import RULES, Rule
from bnrt.folding.view import BnSite, BnStats, GraphView, Layer

NEAR_DEAD_SCALE = 1e3
FP16_MAX = 65504.0


# --- health -----------------------------------------------------------------------------------------

def health(stats: BnStats) -> tuple[str, ...]:
    """``HealthError`` for statistics that break a model, each with a code: ``nonfinite-statistics``
    (NaN/Inf in a tensor or eps), ``shape-mismatch`` (tensors of different lengths),
    ``negative-variance``, ``zero-variance`` (var + eps <= 0: the
    normalisation divides by zero, -0.0 included); warnings for weak ones (near-dead channels)."""
    for label, value in zip((*stats.fields, "eps"), (stats.mean, stats.var, stats.weight, stats.bias, stats.eps)):
        if value is not None and not np.isfinite(value).all():
            raise HealthError(f"{stats.label}: {label} holds NaN or Inf", "nonfinite-statistics")
    lengths = {name: np.size(v) for name, v in zip(stats.fields, (stats.mean, stats.var, stats.weight, stats.bias))
               if v is not None}
    if len(set(lengths.values())) > 1:
        raise HealthError(f"{stats.label}: its tensors differ in length ("
                          + ", ".join(f"{n} {k}" for n, k in lengths.items()) + ")", "shape-mismatch")
    if (stats.var < 0).any():
        raise HealthError(f"{stats.label}: {stats.fields[1]} is negative in some channels", "negative-variance")
    zero = np.flatnonzero(stats.var + stats.eps <= 0)
    if zero.size:
        raise HealthError(f"{stats.label}: {stats.fields[1]} + eps ({stats.eps:g}) is 0 in {zero.size} channel(s), "
                          f"e.g. channel {int(zero[0])}: the normalisation divides by zero", "zero-variance")
    s, _ = stats.scale_shift()
    dead = np.flatnonzero(np.abs(s) > NEAR_DEAD_SCALE)
    if dead.size:
        return (f"{dead.size} near-dead channel(s) with |gamma/sigma| > {NEAR_DEAD_SCALE:g} "
                f"(max {np.abs(s).max():.3g}), e.g. channel {int(dead[0])}",)
    return ()


# --- channel maps -----------------------------------------------------------------------------------

def _index(shape: tuple[int, ...], axis: int) -> np.ndarray:
    """An array shaped ``shape`` whose elements hold their index along ``axis``."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(np.arange(shape[axis], dtype=np.int64).reshape(view), shape).copy()


def _known_shape(view: GraphView, node: Any) -> tuple[int, ...]:
    shape = view.shape(node)
    if shape is None:
        raise NotFoldable("unknown-shape", f"shape of '{view.name(node)}' is unknown", view.name(node))
    return shape


def _identity_or(mapping: np.ndarray) -> tuple[int, ...] | None:
    values = tuple(int(v) for v in mapping)
    return None if values == tuple(range(len(values))) else values


def _backward_map(view: GraphView, layer: Layer, chain: list, axis: int) -> tuple[int, ...] | None:
    """Per layer output channel, the BN channel (axis 1 after ``chain``) it lands on."""
    shape = _known_shape(view, layer.node)
    axis %= len(shape)
    if not chain and axis == 1:
        return None
    where = _index(shape, axis)
    for node in chain:
        where = view.replay(node, where)
    bn_channels = where.shape[1] if where.ndim > 1 else 0
    pos = np.broadcast_to(np.arange(bn_channels).reshape([1, -1] + [1] * (where.ndim - 2)), where.shape)
    lowest, highest = np.full(shape[axis], bn_channels), np.full(shape[axis], -1)
    np.minimum.at(lowest, where.ravel(), pos.ravel())
    np.maximum.at(highest, where.ravel(), pos.ravel())
    if (lowest != highest).any():
        via = f" through {', '.join(view.name(n) for n in chain)}" if chain else ""
        raise NotFoldable("channel-map", f"channels of '{layer.name}' do not map one-to-one onto BN channels{via}",
                          layer.name)
    return _identity_or(lowest)


def _forward_map(view: GraphView, bn: Any, layer: Layer, chain: list, axis: int) -> tuple[int, ...] | None:
    """Per layer input channel (``axis`` after ``chain``), the BN channel it reads."""
    shape = _known_shape(view, bn)
    if not chain and axis % len(shape) == 1:
        return None
    where = _index(shape, 1)
    for node in chain:
        where = view.replay(node, where)
    moved = np.moveaxis(where, axis, 0).reshape(where.shape[axis], -1)
    if (moved.min(axis=1) != moved.max(axis=1)).any():
        raise NotFoldable("channel-map", f"input channels of '{layer.name}' mix several BN channels", layer.name)
    return _identity_or(moved[:, 0])


# --- the walker -------------------------------------------------------------------------------------

def _only_user(view: GraphView, node: Any, user: Any, name: str | None = None) -> None:
    others = [u for u in view.users(node) if u is not user]
    if others:
        name = name or view.name(node)
        raise NotFoldable("shared-output", f"output of '{name}' also feeds {view.describe(others[0])}",
                          name, view.name(others[0]))


def _target(view: GraphView, rule: Rule, layer: Layer, chain: list, channels) -> Target:
    return Target(rule.label(layer), layer.name, layer.kind, layer.groups, tuple(view.name(n) for n in chain),
                  channels, layer)


def _checked(view: GraphView, rule: Rule, layer: Layer) -> None:
    rule.check(layer)
    view.check_layer(layer)


def _backward(view: GraphView, bn: BnSite) -> list[Target]:
    chain, user = [], bn.node
    node = view.input_of(bn.node)
    while view.is_passthrough(node):
        _only_user(view, node, user)
        chain.append(node)
        user, node = node, view.input_of(node)
    if view.is_graph_input(node):
        raise NotFoldable("graph-input", "input comes from a graph input")
    joined = view.concat(node)
    if joined is not None and not chain:
        _only_user(view, node, user)
        return _concat_targets(view, bn, node, *joined)
    layer = view.layer(node)
    rule = RULES.get(("backward", layer.kind)) if layer else None
    if rule is None:
        raise NotFoldable("no-layer-before", f"input comes from {view.describe(node)}: no fold rule", view.name(node))
    _only_user(view, layer.node, user, layer.name)
    _checked(view, rule, layer)
    chain.reverse()
    _positive_through_max(view, bn, chain)
    return [_target(view, rule, layer, chain, _backward_map(view, layer, chain, rule.channel_axis))]


def _positive_through_max(view: GraphView, bn: BnSite, chain: list) -> None:
    """A per-channel affine commutes with a maximum (max-pooling, amax) only where its scale is not
    negative: ``max(s·x) = s·max(x)`` needs ``s >= 0``."""
    taking = next((n for n in chain if view.takes_max(n)), None)
    if taking is None:
        return
    negative = int(np.sum(view.bn_stats(bn).scale_shift()[0] < 0))
    if negative:
        raise NotFoldable("negative-scale-through-max", f"'{view.name(taking)}' takes a maximum and the BN's scale "
                                                        f"is negative in {negative} channel(s)", view.name(taking))


def _concat_targets(view: GraphView, bn: BnSite, cat: Any, parts: list, axis: int) -> list[Target]:
    """A BN straight after a concatenation along its channel axis: each part's channels are a
    contiguous run of the BN's, so the BN splits into one backward fold per part, each into a
    layer (through view ops) whose output feeds only the concat."""
    shape = _known_shape(view, cat)
    if axis % len(shape) != 1:
        raise NotFoldable("channel-map", f"'{view.name(cat)}' concatenates along axis {axis}, not the BN's channels",
                          view.name(cat))
    targets, offset, seen = [], 0, set()
    for part in parts:
        chain, user, node = [], cat, part
        while view.is_passthrough(node):
            _shared_part(view, cat, node, user)
            chain.append(node)
            user, node = node, view.input_of(node)
        layer = None if view.is_graph_input(node) else view.layer(node)
        rule = RULES.get(("backward", layer.kind)) if layer else None
        if rule is None:
            raise NotFoldable("no-layer-before", f"input comes from '{view.name(cat)}', one of whose parts comes "
                                                 f"from {view.describe(node)}: no fold rule", view.name(node))
        if layer.name in seen:
            raise NotFoldable("concat-producer-shared", f"'{layer.name}' is concatenated more than once by "
                                                        f"'{view.name(cat)}'", layer.name, view.name(cat))
        seen.add(layer.name)
        _shared_part(view, cat, layer.node, user, layer.name)
        _checked(view, rule, layer)
        chain.reverse()
        _positive_through_max(view, bn, chain)
        channels = _backward_map(view, layer, chain, rule.channel_axis)
        size = _known_shape(view, part)[1]
        channels = tuple(offset + c for c in (range(size) if channels is None else channels))
        targets.append(_target(view, rule, layer, chain, channels))
        offset += size
    return targets


def _shared_part(view: GraphView, cat: Any, node: Any, user: Any, name: str | None = None) -> None:
    try:
        _only_user(view, node, user, name)
    except NotFoldable as exc:
        raise NotFoldable("concat-producer-shared", f"a part of '{view.name(cat)}': {exc}", exc.refusal.subject,
                          exc.refusal.other) from None


def _forward_ends(view: GraphView, start: Any) -> list[tuple[list, Any, Any]]:
    """Every path from ``start`` through pass-through ops to what ends it, as (the pass-throughs,
    the node read, the end): a view op read by several nodes (a pre-norm feeding query, key and
    value projections) branches into a path per reader."""
    ends, stack = [], [([], start, user) for user in reversed(view.users(start))]
    while stack:
        chain, previous, node = stack.pop()
        if view.is_passthrough(node) and view.input_of(node) is previous:
            # a view nobody reads (a dead flatten left in a traced graph) ends no path
            stack.extend((chain + [node], node, user) for user in reversed(view.users(node)))
        else:
            ends.append((chain, previous, node))
    return ends


def _forward(view: GraphView, bn: BnSite) -> list[Target]:
    targets, ends = [], _forward_ends(view, bn.node)
    if not ends:
        raise NotFoldable("unused", "output is unused")
    for chain, previous, node in ends:
        try:
            layer = view.layer(node)
        except NotFoldable:  # a layer with a computed weight: the BN's output may be that weight
            if view.input_of(node) is not previous:
                raise NotFoldable("weight-input", f"output feeds {view.describe(node)} as its weight, not its input",
                                  view.name(node)) from None
            raise
        rule = RULES.get(("forward", layer.kind)) if layer else None
        if rule is None:
            raise NotFoldable("no-layer-after", f"output feeds {view.describe(node)}, not a layer it can fold into",
                              view.name(node))
        if view.input_of(node) is not previous:
            raise NotFoldable("weight-input", f"output feeds {view.describe(node)} as its weight, not its input",
                              layer.name)
        _checked(view, rule, layer)
        _positive_through_max(view, bn, chain)
        targets.append(_target(view, rule, layer, chain, _forward_map(view, bn.node, layer, chain, rule.channel_axis)))
    return targets


def decide(view: GraphView, bn: BnSite) -> Decision:
    """The decision for one BN: its statistics checked, then backward, then forward."""
    try:
        stats = view.bn_stats(bn)
    except NotFoldable as exc:
        return skipped(bn.name, [exc.refusal], functional=bn.functional)
    warnings = health(stats)
    try:
        view.check_bn(bn)
    except NotFoldable as exc:
        return skipped(bn.name, [exc.refusal], warnings, bn.functional)
    refusals: list[Refusal] = []
    for direction, walk in (("backward", _backward), ("forward", _forward)):
        try:
            targets = walk(view, bn)
        except NotFoldable as exc:
            refusals.append(replace(exc.refusal, direction=direction))
            continue
        view.mark_folded(bn)
        return folded(bn.name, direction, targets, warnings, bn.functional)
    return skipped(bn.name, refusals, warnings, bn.functional)


@dataclass
class Plan(DecisionSet):
    """What folding will do, before any weight is touched: one decision per BatchNorm (``sites``,
    aligned), the rep blocks merged into one conv (``merges``, bnrt.folding.reparam), and the decisions
    (indexes, ``late``) that fold a BN into a merged conv, applied after the merges. ``structured``:
    where the backend keeps the user's forward and this plan merges what that forward cannot
    express (the input itself, a difference or a scale as a branch), the plan for the
    user-structured copy."""

    decisions: list[Decision]
    merges: list[Merge]
    sites: list[BnSite]
    late: list[int] = field(default_factory=list)
    structured: Plan | None = None


class _Merged:
    """``view`` with each merged sum seen as its target conv, which produces the sum once the
    branches are merged: a BN after a rep block folds into it."""

    def __init__(self, view: GraphView, merges: list[Merge]):
        self._view = view
        self._roots = {id(m.root): m for m in merges if not m.kept}  # a kept branch adds to the merged conv

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view, name)

    def layer(self, node: Any) -> Layer | None:
        merge = self._roots.get(id(node))
        return replace(merge.target, node=node) if merge is not None else self._view.layer(node)


def _late(view: GraphView, sites: list[BnSite], decisions: list[Decision], merges: list[Merge]) -> list[int]:
    """Backward folds into merged convs, for BNs whose input was a sum before the merge; their
    decisions are replaced in ``decisions``, their indexes returned."""
    late = []
    merged = _Merged(view, merges)
    for i, (bn, d) in enumerate(zip(sites, decisions)):
        if d.folded or bn.node is None or not any(r.direction == "backward" and r.code == "no-layer-before"
                                                  for r in d.refusals):
            continue
        try:
            targets = _backward(merged, bn)
        except NotFoldable:
            continue
        view.mark_folded(bn)
        decisions[i] = folded(bn.name, "backward", targets, d.warnings, bn.functional)
        late.append(i)
    return late


def plan(view: GraphView, rewrite: bool | None = None) -> Plan:
    """One decision per BatchNorm of ``view``, in its order, then the rep blocks, then the BNs
    after a merged block. A folded BN becomes a pass-through for the BNs after it (conv -> BN -> BN
    folds both into the conv). ``rewrite``: whether merged convs replace their sums in the graph,
    so that the input itself, differences and scales may be branches (default: where the view does
    not keep the user's structure; bnrt.folding.reparam)."""
    sites = view.batchnorms()
    decisions = [decide(view, bn) for bn in sites]
    merges, decisions = plan_merges(view, sites, decisions, not view.keeps_structure if rewrite is None else rewrite)
    late = _late(view, sites, decisions, merges) if merges else []
    return Plan(decisions, merges, sites, late)
