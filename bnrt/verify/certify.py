"""The weight certificate: every layer a plan folded, its stored weights and bias checked element
by element against the exact fold, recomputed here in float64 from the original parameters and
BN statistics. The recomputation is written independently of the code that folded
(``bnrt.folding.foldmath``, ``bnrt.folding.weights.fold_weights``, ``bnrt.folding.reparam``): a
weight element is scaled by the BN scale of the channel it produces (backward) or reads
(forward), found from the element's position (its output channel, its absolute input channel given
the layer's groups; ``ChannelMap`` reads it through broadcast views of the weight),
and a forward fold's bias is a sum over the elements of each output channel. A merged rep block is the sum of its branches embedded in the
target's kernel, identity branches as their centre taps.

A stored element passes when it is within half a unit in the last place (ULP) of the exact value
in its own dtype, the best a single rounding can do, plus the bound on float64's own rounding in
the two recomputations (``n · 2⁻⁵² · Σ|terms|``, far below a float32 ULP except where a sum
cancels). Any other element is a fold that is not exact: a wrong ``eps``, a channel map off by
one, a group mixed up, a second rounding, a weight changed after folding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from bnrt.folding.decision import Decision
from bnrt.folding.engine import Plan
from bnrt.folding.view import BnStats, Layer

Weights = tuple[np.ndarray, "np.ndarray | None"]
EPS64 = float(np.finfo(np.float64).eps)
HALF_ULP = 0.5


@dataclass
class LayerCertificate:
    """One stored layer: the worst element's distance from the exact fold in ULPs of the stored
    dtype (``where``: e.g. ``weight[3, 0, 1, 1]``), and whether every element is within half an
    ULP (plus float64's own bound)."""

    layer: str
    dtype: str
    elements: int
    worst_ulp: float
    where: str
    passed: bool


@dataclass
class Certificate:
    """The certificate of one folded model: one entry per stored folded layer."""

    layers: list[LayerCertificate]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.layers)

    @property
    def failed(self) -> list[LayerCertificate]:
        return [c for c in self.layers if not c.passed]

    @property
    def worst(self) -> LayerCertificate | None:
        return max(self.layers, key=lambda c: c.worst_ulp, default=None)

    def to_json(self) -> dict[str, Any]:
        worst = self.worst
        return {"passed": self.passed, "layers": len(self.layers),
                "worst_ulp": worst.worst_ulp if worst else None, "worst_layer": worst.layer if worst else None,
                "failed": [vars(c) for c in self.failed]}

    def summary(self) -> str:
        """One line for people."""
        if not self.layers:
            return "weights: no folded layer to certify"
        if self.passed:
            worst = self.worst
            bound = ", within float64's own error bound" if worst.worst_ulp > HALF_ULP else ""
            return (f"weights: {len(self.layers)} folded layer(s) within {HALF_ULP} ULP of the exact fold "
                    f"(worst {worst.worst_ulp:.2f} ULP, '{worst.layer}'{bound})")
        bad = self.failed
        first = max(bad, key=lambda c: c.worst_ulp)
        return (f"weights: {len(bad)} of {len(self.layers)} folded layer(s) are not the exact fold: '{first.layer}' "
                f"{first.where} is {first.worst_ulp:.3g} ULP ({first.dtype}) from it")


@dataclass
class _Exact:
    """A layer's exact weight and bias (float64) and the magnitudes of the terms summed into each
    element (for float64's own error bound); ``terms``: the most terms any element sums."""

    weight: np.ndarray
    bias: np.ndarray
    weight_mag: np.ndarray
    bias_mag: np.ndarray
    terms: int = 1


def _scale_shift(stats: BnStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel: the BN's scale γ/√(var+ε), its shift β − mean·scale, and the shift's magnitude."""
    gamma = np.ones_like(stats.mean) if stats.weight is None else np.asarray(stats.weight, np.float64)
    beta = np.zeros_like(stats.mean) if stats.bias is None else np.asarray(stats.bias, np.float64)
    scale = gamma / np.sqrt(np.asarray(stats.var, np.float64) + stats.eps)
    product = np.asarray(stats.mean, np.float64) * scale
    return scale, beta - product, np.abs(beta) + np.abs(product)


class ChannelMap:
    """The channels of a weight's elements, without index arrays: a weight viewed as
    ``[groups, A, B, k...]`` (``A`` the first axis within a group, ``B`` the second), where a
    per-channel vector broadcasts as ``[g, A, 1, 1...]`` (the first axis's channels) or
    ``[g, 1, B, 1...]`` (the second's). Conv ``[Cout, Cin/g, k...]``: output ``o`` of group
    ``o // (Cout/g)`` reads input ``group · Cin/g + i``; ConvTranspose ``[Cin, Cout/g, k...]``:
    input ``i`` of group ``i // (Cin/g)`` writes output ``group · Cout/g + j``; linear ``[out, in]``."""

    def __init__(self, kind: str, shape: tuple[int, ...], groups: int):
        if kind not in ("conv", "conv-transpose", "linear"):
            raise ValueError(f"no channel layout for a {kind!r} layer")
        g = 1 if kind == "linear" else groups
        self.shape, ones = shape, (1,) * (len(shape) - 2)
        self.view = (g, shape[0] // g, shape[1], *shape[2:])
        self.first, self.second = (g, shape[0] // g, 1, *ones), (g, 1, shape[1], *ones)
        self.out_first = kind != "conv-transpose"

    def times(self, weight: np.ndarray, vector: np.ndarray, by: str) -> np.ndarray:
        """``weight · vector[channel]`` elementwise, ``by`` the ``"out"`` or ``"in"`` channel."""
        first = (by == "out") == self.out_first
        return (weight.reshape(self.view) * vector.reshape(self.first if first else self.second)).reshape(self.shape)

    def out_sums(self, weight: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """Per output channel: the sum of ``weight · vector[input channel]`` over its elements."""
        product = weight.reshape(self.view) * vector.reshape(self.second if self.out_first else self.first)
        axes = (2, *range(3, len(self.view))) if self.out_first else (1, *range(3, len(self.view)))
        return product.sum(axis=axes).reshape(-1)


def _channels_of(target_channels, vectors):
    index = slice(None) if target_channels is None else np.asarray(target_channels)
    return [v[index] for v in vectors]


def _apply(exact: _Exact, decision: Decision, target, stats: BnStats) -> None:
    s, t, t_mag = _channels_of(target.channels, _scale_shift(stats))
    channels = ChannelMap(target.kind, exact.weight.shape, target.groups)
    if decision.direction == "backward":
        exact.weight, exact.weight_mag = channels.times(exact.weight, s, "out"), channels.times(
            exact.weight_mag, np.abs(s), "out")
        exact.bias, exact.bias_mag = s * exact.bias + t, np.abs(s) * exact.bias_mag + t_mag
        exact.terms += 2
        return
    n = exact.bias.shape[0]
    exact.bias = exact.bias + channels.out_sums(exact.weight, t)
    exact.bias_mag = exact.bias_mag + channels.out_sums(exact.weight_mag, t_mag)
    exact.weight, exact.weight_mag = channels.times(exact.weight, s, "in"), channels.times(
        exact.weight_mag, np.abs(s), "in")
    exact.terms += exact.weight.size // n + 2


def _embedded(weight: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """A smaller odd kernel at the centre of a zero kernel of size ``kernel``."""
    full = np.zeros(weight.shape[:2] + tuple(kernel))
    offsets = [(big - small) // 2 for small, big in zip(weight.shape[2:], kernel)]
    full[(slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offsets, weight.shape[2:])))] = weight
    return full


def _times(coef, value: np.ndarray) -> np.ndarray:
    return value if coef is None else value * np.asarray(coef, np.float64).reshape((-1,) + (1,) * (value.ndim - 1))


def _merged(merge, exact: dict[str, _Exact], identities: list) -> _Exact:
    """The rep block's conv: each conv branch embedded in the target's kernel, each identity branch
    (scale, shift, shift magnitude) as the centre tap of its own channel, times its coefficient."""
    shape = exact[merge.target.name].weight.shape
    kernel, groups = shape[2:], merge.target.groups
    total = _Exact(np.zeros(shape), np.zeros(shape[0]), np.zeros(shape), np.zeros(shape[0]), 1)

    def add(coef, weight, weight_mag, bias, bias_mag) -> None:
        total.weight += _times(coef, weight)
        total.weight_mag += np.abs(_times(coef, weight_mag))
        total.bias += _times(coef, bias)
        total.bias_mag += np.abs(_times(coef, bias_mag))

    for conv in [merge.target, *merge.convs]:
        part = exact[conv.name]
        add(merge.coefs.get(conv.name), _embedded(part.weight, kernel), _embedded(part.weight_mag, kernel),
            part.bias, part.bias_mag)
        total.terms = max(total.terms, part.terms)
    channel = np.arange(shape[0])
    local = channel - (channel // (shape[0] // groups)) * shape[1]
    centre = tuple(k // 2 for k in kernel)
    for (s, t, t_mag), coef in identities:
        tap = np.zeros(shape)
        tap[(channel, local, *centre)] = s
        add(coef, tap, tap, t, t_mag)
    if merge.constant is not None:
        total.bias += merge.constant
        total.bias_mag += np.abs(merge.constant)
    total.terms += len(merge.convs) + len(identities) + 2
    return total


def _start(layer: Layer, original: Callable[[Layer], Weights]) -> _Exact:
    w, b = original(layer)
    w = np.asarray(w, np.float64)
    outputs = w.shape[1] * layer.groups if layer.kind == "conv-transpose" else w.shape[0]
    b = np.zeros(outputs) if b is None else np.asarray(b, np.float64)
    return _Exact(w, b, np.abs(w), np.abs(b))


def exact_folds(plan: Plan, original: Callable[[Layer], Weights],
                stats: Callable[[Decision], BnStats]) -> Iterator[tuple[str, Layer, _Exact]]:
    """Every layer ``plan`` changes, with its exact weights, one layer at a time (only one layer's
    float64 copies are alive at once): the BN folds in decision order, then the merges, then the
    BN folds into merged convs (``plan.late``). Each layer's steps are listed first: ``fold``
    (decision, target), ``merge`` (a rep block into its target) or ``zero`` (a branch merged away)."""
    steps: dict[str, list[tuple]] = {}
    layers: dict[str, Layer] = {}

    def add(layer: Layer, step: tuple) -> None:
        layers.setdefault(layer.name, layer)
        steps.setdefault(layer.name, []).append(step)

    late = set(plan.late)
    for i, decision in enumerate(plan.decisions):
        if decision.folded and decision.direction != "merge" and i not in late:
            for target in decision.targets:
                add(target.handle, ("fold", decision, target))
    for merge in plan.merges:
        add(merge.target, ("merge", merge))
        for conv in merge.convs:
            add(conv, ("zero",))
    for i in plan.late:
        for target in plan.decisions[i].targets:
            add(target.handle, ("fold", plan.decisions[i], target))
    decision_of = {id(s.node): d for s, d in zip(plan.sites, plan.decisions)}

    def exact_of(name: str, before_merge: bool = False) -> _Exact:
        exact = _start(layers[name], original)
        for step in steps[name]:
            if step[0] != "fold" and before_merge:
                break
            if step[0] == "fold":
                _apply(exact, step[1], step[2], stats(step[1]))
            elif step[0] == "zero":
                exact = _Exact(*(np.zeros_like(a) for a in (exact.weight, exact.bias, exact.weight, exact.bias)))
            else:
                merge = step[1]
                branches = {merge.target.name: exact, **{c.name: exact_of(c.name, True) for c in merge.convs}}
                channels = exact.bias.shape[0]
                itself = (np.ones(channels), np.zeros(channels), np.zeros(channels))  # the input: scale 1, shift 0
                identities = [(_scale_shift(stats(decision_of[id(site.node)])), coef)
                              for site, coef in zip(merge.bns, merge.bn_coefs)]
                identities += [(itself, coef) for coef in merge.input_coefs]
                exact = _merged(merge, branches, identities)
        return exact

    for name in steps:
        yield name, layers[name], exact_of(name)


def ulp_distance(stored: np.ndarray, exact: np.ndarray, magnitude: np.ndarray,
                 terms: int) -> tuple[np.ndarray, np.ndarray]:
    """Per element: |stored − exact| in ULPs of ``stored``'s dtype at ``exact`` (the gap between the
    two representable values around it: ``2^(e − 1 − mantissa bits)`` for ``|exact|`` in
    ``[2^(e−1), 2^e)``, the subnormals' spacing below the normal range, the largest finite value's
    beyond it), and whether it is within half an ULP plus float64's own error bound (both
    recomputations: ``2 · (terms + 4) · 2⁻⁵² · magnitude``)."""
    info = np.finfo(stored.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        _, e = np.frexp(np.maximum(np.abs(exact), float(info.smallest_subnormal)))
        np.clip(e, info.minexp + 1, info.maxexp, out=e)
        e -= info.nmant + 1  # the gap is 2^e
        distance = np.abs(stored.astype(np.float64) - exact)
        ulps = np.ldexp(distance, -e)
        ok = distance <= np.ldexp(HALF_ULP, e) + 2 * (terms + 4) * EPS64 * magnitude
    return np.where(np.isfinite(ulps), ulps, np.inf), ok & np.isfinite(distance)


CHUNK = 1 << 18  # elements measured at once: the temporaries of ``ulp_distance`` stay in the CPU's cache


def _worst(name: str, stored: np.ndarray, exact: np.ndarray, magnitude: np.ndarray, terms: int):
    """The worst element (the worst failing one, if any): its ULPs, where it is, whether all pass."""
    if stored.size == 0:
        return 0.0, "", True
    flat = [np.ravel(a) for a in (stored, exact, magnitude)]
    best = (False, -1.0, 0)  # (fails, ulps, -index): the largest is the answer, the first of equals
    for start in range(0, flat[0].size, CHUNK):
        ulps, ok = ulp_distance(*(a[start:start + CHUNK] for a in flat), terms)
        failing = not ok.all()
        at = int(np.argmax(np.where(ok, -np.inf, ulps) if failing else ulps))
        best = max(best, (failing, float(ulps[at]), -(start + at)))
    failing, worst, at = best[0], best[1], -best[2]
    where = f"{name}[{', '.join(str(int(i)) for i in np.unravel_index(at, stored.shape))}]"
    return worst, where, not failing


def certify(plan: Plan, original: Callable[[Layer], Weights], stats: Callable[[Decision], BnStats],
            stored: Callable[[Layer], Weights | None]) -> Certificate:
    """The certificate of ``plan``'s folds: ``original`` reads a layer's weights before folding,
    ``stats`` a decision's BN statistics (both from the unfolded model), ``stored`` the weights and
    bias the folded model holds, in their stored dtype (None: the layer is not in it, as a merged
    branch the graph dropped)."""
    certificates = []
    for name, layer, exact in exact_folds(plan, original, stats):
        got = stored(layer)
        if got is None:
            continue
        weight, bias = (np.asarray(a) for a in got)
        if weight.shape != exact.weight.shape or bias.shape != exact.bias.shape:
            certificates.append(LayerCertificate(name, str(weight.dtype), int(weight.size + bias.size), float("inf"),
                                                 f"shape {list(weight.shape)}, exact fold {list(exact.weight.shape)}",
                                                 False))
            continue
        w_ulp, w_at, w_ok = _worst("weight", weight, exact.weight, exact.weight_mag, exact.terms)
        b_ulp, b_at, b_ok = _worst("bias", bias, exact.bias, exact.bias_mag, exact.terms)
        # the part that fails (both or neither: the larger distance)
        worst, where = (w_ulp, w_at) if (not w_ok, w_ulp) >= (not b_ok, b_ulp) else (b_ulp, b_at)
        certificates.append(LayerCertificate(name, str(weight.dtype), int(weight.size + bias.size), worst, where,
                                             w_ok and b_ok))
    return Certificate(certificates)
