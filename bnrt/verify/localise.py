"""Where two models part ways: the ONNX values that hold torch modules' outputs (from the
exporters' name scopes) and the first module whose output diverges beyond tolerance, given both
models' intermediate outputs ("taps": ``torchside.torch_taps``, ``onnxside.onnx_taps``).

A folded layer and its BatchNorm compute different intermediate values by design (a conv folded
with the BN after it outputs what the BN used to output); the folds recorded by bnrt (folded
checkpoint, ONNX metadata ``bnrt_folds``) name these partners so that they are not compared.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import onnx

from bnrt.verify.metrics import (DEFAULT_ATOL, DEFAULT_RTOL, NOISE_FACTOR, Divergence, finite_part, finite_where_both,
                                 floor_measured, noise_allowance, nonfinite_problem, within_noise)


def partners(folds: Iterable[dict]) -> tuple[set[str], dict[str, str], dict[str, str]]:
    """Modules whose outputs differ by design after folding; for each folded BN the layer it went
    into (to name the layer when the divergence shows at the BN); and the layer whose output
    stands in for a BN module the folded model no longer has (a BN module, not a call inside a
    module that does more). Backward, a layer outputs what its BN output: compared at the BN;
    forward, the BN is gone: compared at the layer; the view ops between a BN and its layers, and
    every conv of a merged rep block (and the BNs folded into them), are not compared."""
    skip, layer_of, stand_in = set(), {}, {}
    merged = {name for f in folds if f["direction"] == "rep-block" for name in f["into"]}
    for f in folds:
        skip.update(f.get("through", ()))
        into = set(f["into"])
        if f["direction"] == "rep-block" or into & merged:
            skip.update(into)
            if f["bn"] is not None:
                skip.add(f["bn"])
        elif f["direction"] == "backward":
            skip.update(into)
            layer_of[f["bn"]] = f["into"][0]
            if not f.get("functional"):
                stand_in[f["bn"]] = f["into"][0]
        else:
            skip.add(f["bn"])
    return skip, layer_of, stand_in


def fold_points(folds: Iterable[dict]) -> set[str] | None:
    """The modules where folded layers are compared (with the layers standing in for BN modules
    the folded model no longer has); None when there are no folds (every module is a point)."""
    folds = list(folds)
    if not folds:
        return None
    skip, _, stand_in = partners(folds)
    points = {f["bn"] if f["direction"] == "backward" else name for f in folds if f["direction"] != "rep-block"
              for name in f["into"]}
    return (points - skip) | {stand_in[p] for p in points if p in stand_in}


def _scopes(node: onnx.NodeProto) -> list[str]:
    """Module scopes of a node, outermost first: the dynamo exporter's ``name_scopes`` metadata
    (full paths), else the TorchScript exporter's node name ``/stem/stem.0/Conv`` (segments that
    ``resolve_scope`` turns into paths; marked with a leading "/")."""
    meta = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            return list(ast.literal_eval(meta["pkg.torch.onnx.name_scopes"]))[1:-1]
        except (ValueError, SyntaxError):
            return []
    parts = node.name.split("/")
    if len(parts) < 3 or parts[0]:
        return []
    return ["/" + "/".join(parts[1:i + 1]) for i in range(1, len(parts) - 1)]


def resolve_scope(key: str, known: set[str]) -> str | None:
    """A module path for a TorchScript-exporter scope key ``/block/body/body.0`` (its segments
    are named relative to varying ancestors), checked against the module names ``known``."""
    if not key.startswith("/"):
        return key
    path = ""
    segments = key[1:].split("/")
    for seg in segments:
        options = [f"{path}.{seg}" if path else seg, f"{segments[0]}.{seg}", seg]
        path = next((o for o in options if o in known), None)
        if path is None:
            return None
    return path


def onnx_module_values(model: onnx.ModelProto) -> dict[str, str]:
    """Module scope -> ONNX value holding that module's output (the last node inside a module's
    scope produces its output)."""
    last: dict[str, str] = {}
    for node in model.graph.node:
        for scope in _scopes(node):
            last[scope] = node.output[0]
    return last


@dataclass
class Point:
    """One module output compared: ``max_abs`` against the reference, ``error`` and ``floor``
    against the noise anchor (None under fixed tolerances), ``allowance`` the most ``error`` (or
    ``max_abs``) may be, ``layer`` the layer a folded BN went into when compared at the BN."""

    module: str
    max_abs: float
    allowance: float
    passed: bool
    error: float | None = None
    floor: float | None = None
    layer: str | None = None

    @property
    def margin(self) -> float:
        """How far into the allowance the point is: above 1 fails."""
        measured = self.max_abs if self.error is None else self.error
        return measured / self.allowance if self.allowance else (0.0 if measured == 0 else float("inf"))


def compare_points(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], folds: Iterable[dict],
                   fixed: tuple[float, float] | None, noise: tuple[dict, dict] | None = None,
                   factor: float = NOISE_FACTOR, allow_nonfinite: bool = False,
                   known: set[str] | None = None) -> Iterator[Point]:
    """Every module of ``reference`` (execution order) whose output ``candidate`` also has, judged,
    fold partners skipped. With ``fixed`` = (atol, rtol): ``|c − r| <= atol + rtol·|r|``; else with
    ``noise`` = (anchor taps, noisy taps): the candidate's error against the anchor within
    ``factor`` times the noise floor there (a module without a noise tap is not judged).
    Non-finite values fail as in ``verify.nonfinite_problem``. ``known``: the module names that
    TorchScript-exporter scopes resolve against (default: the reference's taps)."""
    skip, layer_of, stand_in = partners(folds)
    known = set(reference) if known is None else known
    candidate = {resolve_scope(k, known) or k: v for k, v in candidate.items()}
    anchor, noisy = ({resolve_scope(k, known) or k: v for k, v in taps.items()} for taps in (noise or ({}, {})))
    # a module whose value is a skipped one's (an ONNX scope ending in a merged conv) is skipped too
    skipped_values = {id(candidate[n]) for n in skip if n in candidate}
    for name, ref in reference.items():
        # an ONNX graph has no node for a folded BN: its output is the layer's output there
        cand = candidate.get(name, candidate.get(stand_in.get(name, "")))
        if name in skip or cand is None or cand.shape != ref.shape \
                or (name not in stand_in and id(cand) in skipped_values):
            continue
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        layer = layer_of.get(name)
        if nonfinite_problem(r, c, allow_nonfinite):
            yield Point(name, float(np.nanmax(np.abs(c - r), initial=0.0)), 0.0, False, layer=layer)
            continue
        r, c = finite_part(r, c)
        diff = float(np.abs(c - r).max(initial=0.0))
        if fixed is not None:
            bound = fixed[0] + fixed[1] * np.abs(r)
            yield Point(name, diff, float(bound.max(initial=0.0)), bool(np.all(np.abs(c - r) <= bound)), layer=layer)
            continue
        a, n = anchor.get(name), noisy.get(name)
        if a is None or n is None or a.shape != r.shape or n.shape != r.shape:
            continue
        if not floor_measured(a, n):  # the noise run left this value unchanged: fixed tolerances judge it
            bound = DEFAULT_ATOL + DEFAULT_RTOL * np.abs(r)
            yield Point(name, diff, float(bound.max(initial=0.0)), bool(np.all(np.abs(c - r) <= bound)), layer=layer)
            continue
        a, n, c = finite_where_both(a, n, c)
        # the whole output's floor: per channel, float32 noise in ill-conditioned models varies
        # between realizations far beyond the factor (EfficientNetV2 with random weights: 17x)
        error, floor = float(np.abs(c - a).max(initial=0.0)), float(np.abs(n - a).max(initial=0.0))
        scale = float(np.abs(a).max(initial=0.0))
        yield Point(name, diff, noise_allowance(floor, scale, factor), within_noise(error, floor, scale, factor),
                    error, floor, layer)


def first_divergence(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], folds: Iterable[dict],
                     fixed: tuple[float, float] | None, noise: tuple[dict, dict] | None = None,
                     factor: float = NOISE_FACTOR, allow_nonfinite: bool = False) -> Divergence | None:
    """The first module of ``reference`` (execution order) whose output in ``candidate`` differs
    beyond tolerance (``compare_points``), skipping fold partners; None when all agree. Non-finite
    values: the first module whose reference output holds NaN/Inf is where they start."""
    for point in compare_points(reference, candidate, folds, fixed, noise, factor, allow_nonfinite):
        if not point.passed:
            return divergence_at(point)
    return None


def divergence_at(point: Point) -> Divergence:
    return Divergence(point.module, point.max_abs, point.layer)
