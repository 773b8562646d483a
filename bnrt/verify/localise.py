"""Where two models part ways: the ONNX values that hold torch modules' outputs (from the
exporters' name scopes) and the first module whose output diverges beyond tolerance, given both
models' intermediate outputs ("taps": ``torchside.torch_taps``, ``onnxside.onnx_taps``).

A folded layer and its BatchNorm compute different intermediate values by design (a conv folded
with the BN after it outputs what the BN used to output); the folds recorded by bnrt (folded
checkpoint, ONNX metadata ``bnrt_folds``) name these partners so that they are not compared.
"""

from __future__ import annotations

import ast
from typing import Iterable

import numpy as np
import onnx

from bnrt.verify.metrics import (NOISE_FACTOR, Divergence, finite_part, finite_where_both, nonfinite_problem,
                                 within_noise)


def partners(folds: Iterable[dict]) -> tuple[set[str], dict[str, str]]:
    """Modules whose outputs differ by design after folding, and for each folded BN the layer it
    went into (to name the layer when the divergence shows at the BN)."""
    skip, layer_of = set(), {}
    for f in folds:
        if f["direction"] == "backward":
            skip.update(f["into"])
            layer_of[f["bn"]] = f["into"][0]
        else:
            skip.add(f["bn"])
    return skip, layer_of


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


def first_divergence(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], folds: Iterable[dict],
                     fixed: tuple[float, float] | None, noise: tuple[dict, dict] | None = None,
                     factor: float = NOISE_FACTOR, allow_nonfinite: bool = False) -> Divergence | None:
    """The first module of ``reference`` (execution order) whose output in ``candidate`` differs
    beyond tolerance, skipping fold partners; None when all agree. With ``fixed`` = (atol, rtol):
    ``|c − r| > atol + rtol·|r|``; else with ``noise`` = (anchor taps, noisy taps): the candidate's
    error against the anchor there exceeds ``factor`` times the noise floor there (modules without
    a noise tap are not judged). Non-finite values diverge as in ``verify.nonfinite_problem``: the
    first module whose reference output holds NaN/Inf is where they start."""
    skip, layer_of = partners(folds)
    known = set(reference)
    candidate = {resolve_scope(k, known) or k: v for k, v in candidate.items()}
    anchor, noisy = ({resolve_scope(k, known) or k: v for k, v in taps.items()} for taps in (noise or ({}, {})))
    for name, ref in reference.items():
        # an ONNX graph has no node for a folded BN: its output is the layer's output there
        cand = candidate.get(name, candidate.get(layer_of.get(name, "")))
        if name in skip or cand is None or cand.shape != ref.shape:
            continue
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        if nonfinite_problem(r, c, allow_nonfinite):
            return Divergence(name, float(np.nanmax(np.abs(c - r), initial=0.0)), layer_of.get(name))
        r, c = finite_part(r, c)
        diff = np.abs(c - r)
        if fixed is not None:
            if not np.all(diff <= fixed[0] + fixed[1] * np.abs(r)):
                return Divergence(name, float(np.nanmax(diff)), layer_of.get(name))
            continue
        a, n = anchor.get(name), noisy.get(name)
        if a is None or n is None or a.shape != r.shape or n.shape != r.shape:
            continue
        a, n, c = finite_where_both(a, n, c)
        if not within_noise(float(np.abs(c - a).max()), float(np.abs(n - a).max()), float(np.abs(a).max()), factor):
            return Divergence(name, float(np.nanmax(diff)), layer_of.get(name))
    return None
