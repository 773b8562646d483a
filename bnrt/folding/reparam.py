"""Structural reparameterization, found from the graph: parallel branches on one input combined
by ``Add`` (k×k conv, 1×1 conv, several k×k convs — each with its BN already folded — an identity BN,
the input itself) become one conv with bias, exactly (float64, rounded once). This is what
RepVGG, MobileOne and their kin do in per-model ``reparameterize()`` code; here it is one rule over
the engine's ``GraphView``, for torch and ONNX graphs alike (see docs/ARCHITECTURE.md).

Conditions: every conv branch reads the same input, is called once with parameters of its own,
has an odd kernel with "same" zero padding (padding = kernel // 2), and all share stride, groups
and dilation 1; its output (through folded BNs and identities) feeds only the combination. An
identity branch (a BN in eval, or the input itself) needs stride 1 and as many output as input
channels.
Where the merged conv replaces the sum in the graph (``rewrite``: the runnable torch graph, ONNX),
the combination may also hold the input itself, differences and per-channel constant scales
(FastViT's RepMixer ``x + γ·(mixer(x) − norm(x))``): each branch then enters with its
coefficient. A model that keeps the user's forward (a folded torch checkpoint) would still compute
those, so it merges plain sums of layers only; torch plans twice (``bnrt.folding.torchgraph.plan``).
A BN that could have merged but does not keeps a ``branch-mismatch`` refusal naming why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import foldmath
from bnrt.folding.decision import Decision, NotFoldable, Target, folded
from bnrt.folding.rules import RULES
from bnrt.folding.view import BnSite, GraphView, Layer


@dataclass
class Merge:
    """Branches merged into ``target`` (the conv with the largest kernel): the other ``convs``, the
    identity ``bns`` (their sites), ``inputs`` copies of the input itself, and the ``root`` Add whose
    output the target now produces (``adds``: every node of the combination). ``coefs``: each
    branch's per-output-channel coefficient (float64; None: exactly 1) by conv name, ``bn_coefs``
    and ``input_coefs`` aligned with ``bns`` and the input copies."""

    target: Layer
    convs: list[Layer]
    bns: list[BnSite]
    inputs: int
    root: Any
    adds: list = field(default_factory=list)
    coefs: dict[str, Any] = field(default_factory=dict)
    bn_coefs: list = field(default_factory=list)
    input_coefs: list = field(default_factory=list)
    constant: Any = None  # per-channel constants added to the combination (float64), or None
    kept: list = field(default_factory=list)  # (conv Layer, why): branches that do not line up, left beside it

    @property
    def scaled(self) -> bool:
        """Whether some branch enters with a coefficient other than 1 (a difference, a scale)."""
        return any(c is not None for c in [*self.coefs.values(), *self.bn_coefs, *self.input_coefs])

    @property
    def rewrites(self) -> bool:
        """Whether only a graph rewrite expresses it (the input itself, a difference, a scale, a
        constant)."""
        return bool(self.inputs) or self.constant is not None or self.scaled

    def to_json(self) -> dict:
        return {"into": self.target.name, "convs": [c.name for c in self.convs], "bns": [b.name for b in self.bns],
                "inputs": self.inputs, "scaled": self.scaled, "constant": self.constant is not None,
                **({"kept": [{"conv": c.name, "reason": why} for c, why in self.kept]} if self.kept else {})}


def _channel_vector(value: Any, shape: tuple[int, ...] | None, constant: bool = False, axis: int = 1) -> Any:
    """A term's coefficient (or, ``constant``, an added constant) as a float64 vector over the
    channels (``axis``; the last one for a Linear on (N, L, C)) of an activation shaped ``shape``;
    None for a coefficient of exactly 1; ``False`` when it is not per-channel (it varies along
    other axes)."""
    c = np.asarray(value, dtype=np.float64)
    if c.size == 1 and float(c.reshape(())) == 1.0 and not constant:
        return None
    if not shape or len(shape) < 2 or c.ndim > len(shape):
        return False
    if c.size == 1:
        return np.full(shape[axis], float(c.reshape(())))
    full = (1,) * (len(shape) - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != axis) or full[axis] != shape[axis]:
        return False
    return c.reshape(-1)


def _times(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else a * b


def _leaves(view: GraphView, node: Any, adds: list, rewrite: bool, coef: Any = None,
            axis: int = 1) -> list[tuple[Any, Any]]:
    """(operand, coefficient) of the combination rooted at ``node``, through inner Adds (and with
    ``rewrite`` Subs, per-channel constant Muls and added constants: operand None, the constant as
    its float64 vector), behind value identities such as an eval DropPath, whose only user is the
    combination."""
    inner = _source(view, node)[0] if adds else node
    terms = view.terms(inner)
    if terms is None or (adds and len(view.users(inner)) != 1):
        return [(node, coef)]
    shape = view.shape(inner)
    vectors = [_channel_vector(c, shape, operand is None, axis) for operand, c in terms]
    if any(v is False for v in vectors) or (not rewrite and any(
            v is not None or operand is None for (operand, _), v in zip(terms, vectors))):
        return [(node, coef)]
    adds.append(inner)
    pairs = []
    for (operand, _), v in zip(terms, vectors):
        if operand is None:  # an added constant: a bias of the merged conv
            pairs.append((None, _times(coef, v)))
        else:
            pairs.extend(_leaves(view, operand, adds, rewrite, _times(coef, v), axis))
    return pairs


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
           rewrite: bool) -> Merge | None:
    """The merge rooted at ``root`` (an Add; with ``rewrite`` also a Sub or a constant Mul); None
    when it is not a rep block; ``NotFoldable`` when it is one whose branches do not line up."""
    adds: list = []
    leaves = _leaves(view, root, adds, rewrite)
    rank, axis = len(view.shape(root) or ()), 1
    if rank > 2 and (not adds or any(_is_linear(view, leaf) for leaf, _ in leaves)):
        adds = []  # per-channel along the last axis: the channels of a Linear on (N, L, C)
        leaves, axis = _leaves(view, root, adds, rewrite, axis=rank - 1), rank - 1
    constants = [c for leaf, c in leaves if leaf is None]
    leaves = [(leaf, c) for leaf, c in leaves if leaf is not None]
    if not leaves or (len(leaves) == 1 and leaves[0][1] is None and not constants):
        return None  # one branch merges only when scaled or shifted: a per-channel Mul or Add after a conv
    convs, bns, others = [], [], []
    coefs, bn_coefs, input_coefs = {}, [], []
    for leaf, coef in leaves:
        source, _ = _source(view, leaf)
        layer = view.layer(source) if not view.is_graph_input(source) else None
        if layer is not None and layer.node is not source:  # the layer ends later (ONNX MatMul + its bias Add)
            layer = None
        site = bn_sites.get(id(source))
        if layer is not None and len(view.users(source)) == 1 and _channel_axis(layer, rank) == axis:
            convs.append(layer)
            coefs[layer.name] = coef
        elif site is not None and not site[2].folded and site[2].refusals and site[2].refusals[0].direction \
                and len(view.users(source)) == 1 and view.bn_stats(site[1]).weight is not None:
            bns.append(site[1])
            bn_coefs.append(coef)
        else:
            others.append(leaf)
            input_coefs.append(coef)
    if not convs or len(coefs) < len(convs) or len({id(b.node) for b in bns}) < len(bns):
        return None  # a branch summed twice (y + y) is not a rep block
    if any(c.kind != "conv" for c in convs) and (len(convs) > 1 or bns or others):
        return None  # a Linear or a ConvTranspose merges alone: a per-channel scale and shift after it
    x = view.input_of(convs[0].node)
    same = _behind(view, x)
    if any(_behind(view, view.input_of(c.node)) is not same for c in convs) \
            or any(_behind(view, view.input_of(b.node)) is not same for b in bns) \
            or any(_behind(view, o) is not same for o in others):
        return None
    if not bns and not others and len(convs) < 2 and coefs[convs[0].name] is None and not constants:
        return None
    if others and not rewrite:  # the user's forward would still add the input: no weight to zero
        return None
    convs, kept = _lined_up(convs, coefs, bool(bns or others), bool(constants))
    for conv in convs:
        view.check_layer(conv)
    first = convs[0]
    if (bns or others) and (any(s != 1 for s in first.stride) or view.shape(x) != view.shape(first.node)):
        raise NotFoldable("branch-mismatch", f"an identity branch beside '{first.name}' needs stride 1 and as many "
                                             "output as input channels", first.name)
    target = max(convs, key=lambda c: int(np.prod(c.kernel)))
    return Merge(target, [c for c in convs if c is not target], bns, len(others), root, adds, coefs, bn_coefs,
                 input_coefs, sum(constants) if constants else None, kept)


def _is_linear(view: GraphView, leaf: Any) -> bool:
    source = _source(view, leaf)[0]
    layer = None if view.is_graph_input(source) else view.layer(source)
    return layer is not None and layer.kind == "linear"


def _channel_axis(layer: Layer, rank: int) -> int | None:
    """The axis of ``layer``'s output channels in its output of rank ``rank`` (None for a kind that
    does not merge)."""
    if layer.kind in ("conv", "conv-transpose"):
        return 1
    return rank - 1 if layer.kind == "linear" else None


def _lined_up(convs: list[Layer], coefs: dict[str, Any], identities: bool, shifted: bool
              ) -> tuple[list[Layer], list[tuple[Layer, str]]]:
    """The conv branches that merge, and those kept beside the merged conv with the reason (a
    dilated branch, one not centred, or with another stride or groups than the first that lines
    up). A kept branch must enter the sum plainly (no scale), and something must still merge (two
    branches, or one scaled or shifted); ``NotFoldable`` otherwise. ``identities``: identity
    branches beside the convs; ``shifted``: a constant is added."""
    if len(convs) == 1 and not identities:  # a scaled or shifted conv: nothing to align
        return convs, []
    reasons = {c.name: _aligned(c) for c in convs}
    first = next((c for c in convs if reasons[c.name] is None), convs[0])
    for conv in convs:
        if reasons[conv.name] is None and (conv.stride, conv.groups) != (first.stride, first.groups):
            reasons[conv.name] = (f"'{conv.name}' has stride {conv.stride} and groups {conv.groups}, '{first.name}' "
                                  f"{first.stride} and {first.groups}")
    kept = [(c, reasons[c.name]) for c in convs if reasons[c.name]]
    merging = [c for c in convs if not reasons[c.name]]
    blocked = next(((c, why) for c, why in kept if coefs[c.name] is not None), None)
    if blocked is None and kept and (not merging or (len(merging) == 1 and not identities and not shifted
                                                      and coefs[merging[0].name] is None)):
        blocked = kept[0]
    if blocked is not None:  # a scaled branch cannot stay outside, or nothing lines up
        raise NotFoldable("branch-mismatch", blocked[1], blocked[0].name)
    return merging, kept


def plan_merges(view: GraphView, sites: list[BnSite], decisions: list[Decision],
                rewrite: bool) -> tuple[list[Merge], list[Decision]]:
    """Rep blocks of the graph, after the BN folds of ``decisions``; identity BNs merged get a
    folded decision (direction ``merge``), those in a block that does not line up a
    ``branch-mismatch`` refusal. ``rewrite``: the merged conv replaces the sum in the graph."""
    bn_sites = {id(s.node): (i, s, d) for i, (s, d) in enumerate(zip(sites, decisions)) if s.node is not None}
    decisions = list(decisions)
    merges: list[Merge] = []
    inner: set[int] = set()
    for node in reversed(view.adds()):  # roots first: a sum's inner Adds are claimed by its root
        if id(node) in inner:
            continue
        try:
            merge = _merge(view, node, bn_sites, rewrite)
        except NotFoldable as exc:
            adds: list = []
            for leaf, _ in _leaves(view, node, adds, rewrite):
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


def _scaled(value: np.ndarray, coef: Any) -> np.ndarray:
    """``value`` (a weight or bias, output channels first) times a branch's coefficient."""
    return value if coef is None else value * coef.reshape((-1,) + (1,) * (value.ndim - 1))


def _output_channels(merge: Merge, weight: np.ndarray) -> range:
    """The output channels of the merge's target, from its weight (a ConvTranspose's are axis 1 per
    group)."""
    if merge.target.kind == "conv-transpose":
        return range(weight.shape[1] * merge.target.groups)
    return range(weight.shape[0])


def merged_weights(merge: Merge, weights: dict[str, tuple[np.ndarray, np.ndarray | None]],
                   identity_scales: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The target's float64 weight and bias: every conv branch padded to its kernel, plus a
    centred identity kernel per identity branch (scale ``s``, shift ``t`` of a BN; ones and zeros
    for the input itself), each times its coefficient, summed."""
    w, b = weights[merge.target.name]
    if merge.target.kind != "conv":  # a Linear or a ConvTranspose alone: its scale and shift fold backward
        coef, channels = merge.coefs.get(merge.target.name), len(_output_channels(merge, w))
        s = np.ones(channels) if coef is None else coef
        t = np.zeros(channels) if merge.constant is None else merge.constant
        return RULES[("backward", merge.target.kind)].fold(w, b, s, t, merge.target.groups)
    kernel = w.shape[2:]
    total_w, total_b = np.zeros(w.shape), np.zeros(w.shape[0])
    for conv in [merge.target, *merge.convs]:
        cw, cb = weights[conv.name]
        coef = merge.coefs.get(conv.name)
        total_w += _scaled(foldmath.pad_kernel(cw, kernel), coef)
        total_b += _scaled(np.zeros(w.shape[0]) if cb is None else np.asarray(cb, dtype=np.float64), coef)
    ones = [(np.ones(w.shape[0]), np.zeros(w.shape[0]))] * merge.inputs
    for (s, t), coef in zip(list(identity_scales) + ones, [*merge.bn_coefs, *merge.input_coefs]):
        total_w += _scaled(foldmath.identity_kernel(s, w.shape[1], kernel), coef)
        total_b += _scaled(np.asarray(t, dtype=np.float64), coef)
    if merge.constant is not None:
        total_b += merge.constant
    return total_w, total_b
