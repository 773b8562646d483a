"""The check's look inside the models: the per-layer comparison (every fold point's output judged
against its own noise floor, ``per_layer``; the module outputs it reads caught on the way by runs
the check makes anyway, ``recorders``) and the first divergent module of a failed comparison
(``localise``). Called by ``bnrt.verify.check.model_checks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bnrt.io.data import Dataset
from bnrt.verify.localise import Point, compare_points, divergence_at, first_divergence, fold_points
from bnrt.verify.metrics import DEFAULT_ATOL, DEFAULT_RTOL, Comparison, LayerCheck, Tolerances
from bnrt.verify.sides import Candidate, Side
from bnrt.verify.torchside import TapRecorder

LOCALISE_SAMPLES = 8
LAYER_VALUES = 1 << 23  # values per run the per-layer comparison taps (its float64 copy: 64 MB)
POINT_VALUES = 1 << 16  # values per sample kept of each module output there (every channel, strided positions)


def localise(reference: Side, candidate: Side, data: Dataset, folds: list[dict], tolerances: Tolerances,
             noisy: bool):
    """First divergent module between two sides, on the first few samples, each module output
    thinned to about ``POINT_VALUES`` values per sample (every channel kept); judged against the
    reference's noise floor per module when ``noisy`` (the check used it), else by tolerances."""
    if reference.taps is None or candidate.taps is None:
        return None
    head = [x[:min(LOCALISE_SAMPLES, data.first)] for x in data.inputs]
    # thinned: every module's whole output, three runs of a detector at 800x800, would not fit in memory
    ref_taps, cand_taps = reference.taps(head, None, POINT_VALUES), candidate.taps(head, None, POINT_VALUES)
    if noisy and reference.noise is not None and reference.noise.taps is not None:
        noise = reference.noise.anchor_and_noisy(ref_taps, reference.noise.taps(head, None, POINT_VALUES))
        return first_divergence(ref_taps, cand_taps, folds, None, noise, tolerances.factor, tolerances.allow_nonfinite)
    return first_divergence(ref_taps, cand_taps, folds, tolerances.fixed("") or (DEFAULT_ATOL, DEFAULT_RTOL),
                            allow_nonfinite=tolerances.allow_nonfinite)


def layer_check(points: list[Point], samples: int) -> LayerCheck:
    """The per-layer summary of judged points: how many, how many failed, the worst one."""
    worst = max(points, key=lambda p: p.margin, default=None)
    if worst is None:
        return LayerCheck(0, 0, samples=samples)
    return LayerCheck(len(points), sum(not p.passed for p in points), worst.module, worst.margin, worst.error,
                      worst.floor, samples)


def per_layer(reference: Side, candidates: list[Candidate], comparisons: list[Comparison], data: Dataset,
              folds: list[dict], tolerances: Tolerances, truth: int, note: Callable[[str], None],
              recorded: "Recorded | None" = None) -> None:
    """Every deciding candidate's intermediate outputs against the reference's, each judged against
    its own noise floor: a torch reference's modules (floor: its float64 truth), an ONNX
    reference's values by name against the ONNX files bnrt folded from it (their metadata's
    ``source_sha256`` is its digest; floor: its re-rounded weights). At the fold points of bnrt's
    fold records (``localise.fold_points``); without them nothing is compared layer by layer (an
    ONNX export that fused a BN itself differs from its checkpoint by design there). Each output thinned to about ``POINT_VALUES`` values per sample (every channel, strided
    positions); on the noise-floor samples, as many as keep the first run's values under
    ``LAYER_VALUES`` (at least one); for the candidates ``Candidate.layer_checked`` says. A point
    past its floor fails the comparison and becomes its divergence, the first one in execution
    order. ``recorded``: what the noise run and the head-only candidates caught of the module
    outputs on the way (``recorders``), used where it holds the same values as a run of its own
    (the float64 truth on any batch: to its own rounding; a float32 candidate's only for the very
    rows of its first batch)."""
    noise = reference.noise
    if not folds or noise is None or noise.taps is None or reference.taps is None:
        return  # without bnrt's fold records a layer that another tool folded would differ by design
    by_value = noise.kind == "rounding"  # two graphs, compared value by value: only a fold of this very graph
    if by_value and (reference.value_folds is None or reference.digest is None):
        return
    judged = [(c, comp) for c, comp in zip(candidates, comparisons) if c.layer_checked and c.side.taps
              and (not by_value or (c.side.origin is not None and c.side.origin == reference.digest()))]
    if not judged:
        return
    folds = reference.value_folds(folds) if by_value else folds
    points, kind = fold_points(folds), {"by": "value"} if by_value else {}
    fixed = next((s.fixed_batch for s in [reference, *(c.side for c, _ in judged)] if s.fixed_batch), None)
    if fixed is not None and fixed > min(truth, data.size):
        return  # a graph that takes more samples at once than the noise floor was measured on
    caught = recorded.noise if recorded is not None else None
    first = (caught and caught.taps(1)) or noise.taps([x[:fixed or 1] for x in data.inputs], points, POINT_VALUES,
                                                      **kind)
    samples = fixed or max(1, min(truth, LAYER_VALUES // max(1, sum(v.size for v in first.values()))))
    note(f"per-layer comparison on {samples} sample(s)")
    head = [x[:samples] for x in data.inputs]
    noisy = first if samples == (fixed or 1) else (caught and caught.taps(samples)) or noise.taps(
        head, points, POINT_VALUES, **kind)
    ref_taps = reference.taps(head, points, POINT_VALUES, **kind)
    pair = noise.anchor_and_noisy(ref_taps, noisy)
    del first, noisy
    known = set(reference.module_names) | set(ref_taps)
    for candidate, comparison in judged:
        same = recorded.candidates.get(id(candidate)) if recorded is not None else None  # its first batch only
        taps = (same and same.taps(samples)) or candidate.side.taps(head, points, POINT_VALUES, **kind)
        found = list(compare_points(ref_taps, taps, folds, None,
                                    pair, tolerances.factor, tolerances.allow_nonfinite, known))
        comparison.layers = layer_check(found, samples)
        failed = next((p for p in found if not p.passed), None)
        if failed is not None:
            comparison.divergence = divergence_at(failed)


@dataclass
class Recorded:
    """Module outputs caught on the way for the per-layer comparison: by the noise run (``noise``)
    and by each head-only candidate compared layer by layer (by the ``id`` of its ``Candidate``;
    ``TapRecorder(whole=True)``: the rows of its first batch, all of them, or none)."""

    noise: TapRecorder | None
    candidates: dict[int, TapRecorder]


def recorders(reference: Side, candidates: list[Candidate], folds: list[dict]) -> Recorded | None:
    """What the runs on the first samples catch for ``per_layer`` (a torch reference's float64
    truth and torch candidates' module outputs at the fold points), or None where it compares nothing
    or another way (no folds, an ONNX reference, a fixed batch)."""
    noise = reference.noise
    if not folds or noise is None or noise.kind != "float64" or reference.taps is None \
            or any(s.fixed_batch for s in [reference, *(c.side for c in candidates)]):
        return None
    points = fold_points(folds)
    return Recorded(TapRecorder(points, POINT_VALUES, LAYER_VALUES) if noise.tapping else None,
                    {id(c): TapRecorder(points, POINT_VALUES, LAYER_VALUES, whole=True) for c in candidates
                     if c.head_only and c.layer_checked and c.side.tapping is not None})
