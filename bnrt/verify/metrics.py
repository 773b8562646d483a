"""The check's metrics and pass criterion, numpy only (the runs that produce the arrays are
``bnrt.verify.check``'s).

Metrics per output (all computed in float64):
- ``max_abs``: max |c − r|; ``mean_abs``: mean |c − r|;
- ``max_rel``: max |c − r| / max(|r|, 1e-3·max|r|) (the floor keeps near-zero references from
  dominating);
- ``cosine``: cosine similarity of the flattened outputs (1 when both are all zero);
- ``sqnr_db``: 10·log10(Σ r² / Σ (c − r)²), signal-to-quantisation-noise ratio (None: identical);
- ``top1_agreement`` / ``topk_agreement`` for 2-D logits (N, classes > 1): the fraction of samples
  whose argmax agrees, and the mean overlap |topk(r) ∩ topk(c)| / k.
Pass criterion, by default noise-aware: float32 runs differ from each other by rounding noise that
grows with depth and activation size, and a fold may add no more than that. A ``NoiseReference``
gives, on the first few samples (``truth_samples``: enough for 2,048 values of the smallest output,
2 to 8 samples), an *anchor* and a *noisy* run whose difference is
pure float32 noise: for torch references the anchor is the unfolded model in float64 and the noisy
run the unfolded float32 model; for ONNX references (no float64 model) the anchor is the original
graph and the noisy run the same graph with every float weight re-rounded by a random half ULP
(what any fold's single rounding may change; initializers and Constant nodes alike). A floor that
cannot be measured (no weight to re-round, a noise run that fails) or that is exactly 0 (the
noise run left an output unchanged) is not taken as one: fixed tolerances judge those outputs and
the report says why (``CheckReport.noise_fallback``). Per output, ``floor`` = max |noisy − anchor|,
``error`` = max |candidate − anchor|, ``ratio`` = error / floor; the output passes when
``error <= factor·floor + tiny`` (``tiny``: 4 float32 ULPs of the anchor's largest value, for exact
zeros) and the candidate keeps every top-1 of the anchor whose margin (top-1 minus top-2) is more
than twice the floor, which float32 noise cannot flip. Explicit
``atol``/``rtol`` replace this with ``|c − r| <= atol + rtol·|r|`` (numpy's allclose) against the
reference. In both, NaN/Inf in the candidate where the reference is finite fails, and NaN/Inf
in the reference fails too unless allowed (then compared position by position). With labels,
accuracy (argmax of the first output) is reported per runner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np


SCHEMA = "bnrt.check/3"
DEFAULT_ATOL = 1e-4  # the fixed criterion's defaults, when only one of atol/rtol is given
DEFAULT_RTOL = 1e-3
DEFAULT_TOP_K = 5
REL_FLOOR = 1e-3
NOISE_FACTOR = 8.0
TRUTH_SAMPLES = 8  # at most this many samples for the noise floor (the float64 truth is costly)
TRUTH_VALUES = 2048  # ... and enough of them for this many values of every output
_TINY_ULPS = 4


@dataclass(frozen=True)
class Tolerances:
    """The pass criterion: noise-aware (``factor`` times the measured float32 noise floor) unless
    ``atol``/``rtol`` are given, globally or per output (``{name: (atol or None, rtol or None)}``);
    then ``|c − r| <= atol + rtol·|r|``, a missing one taking its default (1e-4, 1e-3).
    ``allow_nonfinite``: a reference output with NaN/Inf is compared position by position (the
    candidate must have the same non-finite values there) instead of failing the check."""

    atol: float | None = None
    rtol: float | None = None
    per_output: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    factor: float = NOISE_FACTOR
    allow_nonfinite: bool = False

    def fixed(self, name: str) -> tuple[float, float] | None:
        """``(atol, rtol)`` when output ``name`` is checked with fixed tolerances, else None."""
        atol, rtol = self.per_output.get(name, (None, None))
        atol = self.atol if atol is None else atol
        rtol = self.rtol if rtol is None else rtol
        if atol is None and rtol is None:
            return None
        return (DEFAULT_ATOL if atol is None else atol, DEFAULT_RTOL if rtol is None else rtol)


@dataclass(frozen=True)
class NoiseReference:
    """Where the noise floor comes from: ``kind`` ``"float64"`` (``runner`` is the float64 truth:
    the anchor; the reference is the noisy run) or ``"rounding"`` (``runner`` is the reference
    with its weights re-rounded: the noisy run; the reference is the anchor). ``taps``: the same
    run's intermediate outputs, for localisation; ``tapping``: given a ``TapRecorder``, a runner
    that catches them while it runs (``bnrt.verify.torchside``)."""

    kind: str
    runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]]
    taps: Callable[..., dict[str, np.ndarray]] | None = None  # (inputs, names=None)
    tapping: Callable[[Any], Callable[[Sequence[np.ndarray]], list[np.ndarray]]] | None = None

    def anchor_and_noisy(self, reference, noise):
        """(anchor, noisy) from the reference's and this run's outputs (or taps)."""
        return (noise, reference) if self.kind == "float64" else (reference, noise)


MIN_POSITIONS = 64  # positions per channel thinning keeps (where the activation has that many)


def thinned(shape: Sequence[int], limit: int | None) -> tuple[slice, ...]:
    """The slices that keep about ``limit`` values per sample of an activation shaped ``shape``
    (N, C, spatial...): every sample and channel, the spatial axes strided evenly (at least
    ``MIN_POSITIONS`` positions per channel where there are that many), so that an error in one
    channel shows at every position kept. Empty (keep all) below the limit and for fewer than two
    spatial axes (where axis 1 may not be the channels)."""
    if limit is None or len(shape) < 4:
        return ()
    spatial = [int(d) for d in shape[2:]]
    per_sample = int(np.prod(shape[1:]))
    stride = int(np.ceil((per_sample / limit) ** (1 / len(spatial)))) if per_sample > limit else 1
    while stride > 1 and np.prod([-(-d // stride) for d in spatial]) < min(MIN_POSITIONS, np.prod(spatial)):
        stride -= 1
    return () if stride == 1 else (slice(None), slice(None)) + (slice(None, None, stride),) * len(spatial)


def finite_part(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both with zero where the reference is not finite: once ``nonfinite_problem`` passed them,
    the candidate holds the same non-finite values there, and the rest is what is compared."""
    finite = np.isfinite(ref)
    return np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)


def finite_where_both(anchor: np.ndarray, noisy: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, ...]:
    """The three in float64, zero wherever the anchor or the noisy run is not finite: the noise runs
    may meet a reference's allowed non-finite positions (or overflow in float64 where float32 did
    not). The candidate's own non-finite values are judged before (``nonfinite_problem``)."""
    a, n, c = (np.asarray(x, np.float64) for x in (anchor, noisy, candidate))
    usable = np.isfinite(a) & np.isfinite(n)
    return tuple(np.where(usable, x, 0.0) for x in (a, n, c))


def noise_allowance(floor: float, scale: float, factor: float) -> float:
    """The most error the noise-aware test allows: ``factor·floor + tiny`` (tiny: a few float32
    ULPs of ``scale``, the largest reference value, for exact zeros)."""
    return factor * floor + _TINY_ULPS * float(np.spacing(np.float32(scale)))


def within_noise(error: float, floor: float, scale: float, factor: float) -> bool:
    """The noise-aware test: ``error <= noise_allowance(floor, scale, factor)``."""
    return error <= noise_allowance(floor, scale, factor)


@dataclass
class OutputMetrics:
    """Metrics of one output against the reference; ``floor``/``error``/``ratio`` against the
    noise anchor (None under fixed tolerances)."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    sqnr_db: float | None
    top1_agreement: float | None
    topk_agreement: float | None
    atol: float | None
    rtol: float | None
    passed: bool
    problem: str | None = None
    criterion: str = "fixed"
    floor: float | None = None
    error: float | None = None
    ratio: float | None = None


@dataclass
class Divergence:
    """The first module, in execution order, whose output differs beyond tolerance."""

    module: str
    max_abs: float
    layer: str | None = None


@dataclass
class LayerCheck:
    """The per-layer comparison of one candidate: every module output both sides have (fold
    partners aside: a folded layer is compared where its BN's output was) judged against that
    point's own float32 noise floor, on the first ``samples``. ``worst``: the point nearest to or
    furthest past its allowance (``margin``: error over allowance, above 1 fails), with its
    ``error`` and ``floor``."""

    points: int
    failed: int
    worst: str | None = None
    margin: float | None = None
    error: float | None = None
    floor: float | None = None
    samples: int = 0

    @property
    def passed(self) -> bool:
        return self.failed == 0


@dataclass
class Comparison:
    """One candidate against the reference; ``samples``: how many of the check's samples it ran on
    (the first ones; None: all); an ``informational`` comparison is reported but decides nothing
    (the TF32 deployment beside an exact float32 check)."""

    reference: str
    candidate: str
    outputs: list[OutputMetrics]
    divergence: Divergence | None = None
    samples: int | None = None
    informational: bool = False
    layers: LayerCheck | None = None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and (self.layers is None or self.layers.passed)


@dataclass
class CheckReport:
    """Comparisons of each candidate against the reference, and accuracy per runner when the data
    has labels; ``noise``: where the noise floor came from (``float64``, ``rounding``, or None when
fixed tolerances decided) and ``noise_samples`` the samples it was measured on. ``to_json`` gives the documented, versioned schema (``bnrt.check/3``)."""

    samples: int
    source: str
    top_k: int
    comparisons: list[Comparison]
    accuracy: dict[str, float] = field(default_factory=dict)
    errors: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)
    noise: str | None = None
    noise_samples: int | None = None
    certificate: Any = None  # bnrt.verify.certify.Certificate, for folds bnrt made
    noise_fallback: str | None = None  # why fixed tolerances judged what the noise floor would have
    accuracy_stats: dict[str, dict] = field(default_factory=dict)  # candidate -> bnrt.verify.accuracy.paired
    preprocess: dict | None = None  # how an image folder became the inputs (bnrt.io.images)

    @property
    def passed(self) -> bool:
        return (all(c.passed for c in self.comparisons if not c.informational)
                and (self.certificate is None or self.certificate.passed))

    def to_json(self) -> dict:
        # errors (arrays) and the certificate (per layer) are not copied just to be dropped or summarised
        out = {"schema": SCHEMA, **asdict(replace(self, errors={}, certificate=None)), "passed": self.passed}
        del out["errors"]
        out["certificate"] = None if self.certificate is None else self.certificate.to_json()
        for comp, data in zip(self.comparisons, out["comparisons"]):
            data["passed"] = comp.passed
        return out


def truth_samples(outputs: Sequence[np.ndarray], size: int) -> int:
    """Samples the noise floor is measured on: enough for ``TRUTH_VALUES`` values of the smallest
    output, at least 2, at most ``TRUTH_SAMPLES`` (and the data's size)."""
    per_sample = min((max(1, o[0].size) for o in outputs if o.ndim and len(o)), default=1)
    return min(size, TRUTH_SAMPLES, max(2, -(-TRUTH_VALUES // per_sample)))


def _topk_overlap(r: np.ndarray, c: np.ndarray, k: int) -> float:
    k = min(k, r.shape[1])
    top_r = np.argsort(-r, axis=1, kind="stable")[:, :k]
    top_c = np.argsort(-c, axis=1, kind="stable")[:, :k]
    hits = (top_r[:, :, None] == top_c[:, None, :]).any(axis=2).sum(axis=1)
    return float(np.mean(hits / k))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float | None:
    """10·log10(Σ r² / Σ (c − r)²) in float64; None when identical, -inf for an all-zero reference."""
    r, c = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    energy = float(np.sum((c - r) ** 2))
    if energy == 0.0:
        return None
    signal = float(np.sum(r ** 2))
    return 10.0 * np.log10(signal / energy) if signal else float("-inf")


def _cosine(r: np.ndarray, c: np.ndarray) -> float:
    norm_r, norm_c = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if norm_r == 0.0 and norm_c == 0.0:
        return 1.0
    if norm_r == 0.0 or norm_c == 0.0:
        return 0.0
    return float(np.dot(r.ravel(), c.ravel()) / (norm_r * norm_c))


def _judge_by_noise(metrics: OutputMetrics, head: np.ndarray, noise: tuple[np.ndarray, np.ndarray],
                    factor: float, classifier: bool) -> OutputMetrics:
    """The noise-aware verdict on the first samples (``head``: the candidate's, in float64)."""
    anchor, noisy, head = finite_where_both(noise[0], noise[1], head)
    metrics.floor = float(np.abs(noisy - anchor).max())
    metrics.error = float(np.abs(head - anchor).max())
    metrics.ratio = metrics.error / metrics.floor if metrics.floor else (0.0 if metrics.error == 0 else float("inf"))
    metrics.passed = within_noise(metrics.error, metrics.floor, float(np.abs(anchor).max()), factor)
    # no top-1 may flip where float32 noise cannot flip it: a sample whose margin (top-1 minus top-2
    # of the anchor) exceeds twice the floor (noise moves every logit by at most the floor); below
    # that (an ill-conditioned model, random weights), flips are noise and the error bound decides
    if classifier:
        top2 = np.sort(anchor.reshape(len(anchor), -1), axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * metrics.floor
        flips = int(np.sum(decisive & (np.argmax(head.reshape(len(anchor), -1), 1) != np.argmax(anchor, 1))))
        if flips:
            metrics.passed = False
            metrics.problem = (f"top-1 differs from the noise anchor on {flips} sample(s) whose margin float32 "
                               "noise cannot flip (more than twice the floor)")
    return metrics


def _fixed_or_none(atol: float | None, rtol: float | None,
                   noise: tuple[np.ndarray, np.ndarray] | None) -> tuple[float, float] | None:
    """The fixed criterion's (atol, rtol), or None where the noise floor decides: no tolerance
    given and a floor measurable (finite values in both noise runs, which allowed non-finite
    outputs may leave none; and not exactly 0: a noise run that changed nothing here measured
    nothing, ``floor_measured``)."""
    measurable = noise is not None and (np.size(noise[0]) == 0 or floor_measured(*noise))
    if atol is None and rtol is None and measurable:
        return None
    return DEFAULT_ATOL if atol is None else atol, DEFAULT_RTOL if rtol is None else rtol


def floor_measured(anchor: np.ndarray, noisy: np.ndarray) -> bool:
    """Whether the noise runs measured a floor: finite values in both, and somewhere different."""
    usable = np.isfinite(anchor) & np.isfinite(noisy)
    return bool(usable.any()) and bool((np.asarray(anchor)[usable] != np.asarray(noisy)[usable]).any())


def compare_output(name: str, ref: np.ndarray, cand: np.ndarray, atol: float | None = None,
                   rtol: float | None = None, top_k: int = DEFAULT_TOP_K, *,
                   noise: tuple[np.ndarray, np.ndarray] | None = None, factor: float = NOISE_FACTOR,
                   allow_nonfinite: bool = False) -> OutputMetrics:
    """Metrics of ``cand`` against ``ref``. With ``atol``/``rtol`` (either), the fixed criterion;
    else with ``noise`` = (anchor, noisy) on the first samples, the noise-aware one; else the fixed
    criterion with its defaults. Non-finite values are findings: NaN/Inf in the candidate where
    the reference is finite fails, and so does NaN/Inf in the reference unless ``allow_nonfinite``,
    which requires the candidate to hold the same non-finite values at the same positions and
    compares the rest."""
    fixed = _fixed_or_none(atol, rtol, noise)
    tolerance, criterion = fixed or (None, None), "fixed" if fixed else "noise"
    if ref.shape != cand.shape:
        problem = f"shape {list(cand.shape)} differs from the reference's {list(ref.shape)}"
    else:
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        problem = nonfinite_problem(r, c, allow_nonfinite)
    if problem:
        inf = float("inf")
        return OutputMetrics(name, list(ref.shape), inf, inf, inf, 0.0, None, None, None, *tolerance, False, problem,
                             criterion)
    if r.size == 0:
        return OutputMetrics(name, list(ref.shape), 0.0, 0.0, 0.0, 1.0, None, None, None, *tolerance, True, None,
                             criterion)
    r, c = finite_part(r, c)
    diff, scale = np.abs(c - r), np.abs(r)
    rel_floor = max(REL_FLOOR * float(scale.max()), np.finfo(np.float64).tiny)
    classifier = r.ndim == 2 and r.shape[1] > 1
    metrics = OutputMetrics(name, list(ref.shape), float(diff.max()), float((diff / np.maximum(scale, rel_floor)).max()),
                            float(diff.mean()), _cosine(r, c), sqnr_db(r, c), _agreement(r, c) if classifier else None,
                            _topk_overlap(r, c, top_k) if classifier else None, *tolerance, True, None, criterion)
    if fixed:
        metrics.passed = bool(np.all(diff <= fixed[0] + fixed[1] * scale))
        return metrics
    return _judge_by_noise(metrics, c[: len(noise[0])], noise, factor, classifier)


def nonfinite_problem(ref: np.ndarray, cand: np.ndarray, allow_nonfinite: bool = False) -> str | None:
    """Why non-finite values fail a comparison of ``cand`` with ``ref`` (same shapes), or None."""
    ref_bad, cand_bad = ~np.isfinite(ref), ~np.isfinite(cand)
    if (cand_bad & ~ref_bad).any():
        return f"NaN or Inf where the reference is finite ({int(np.sum(cand_bad & ~ref_bad))} of {ref.size} values)"
    if not ref_bad.any():
        return None
    if not allow_nonfinite:
        return (f"the reference itself outputs NaN or Inf ({int(ref_bad.sum())} of {ref.size} values): "
                "a finding, never a pass (allow non-finite outputs to compare them position by position)")
    same = (np.isnan(ref) & np.isnan(cand)) | (ref == cand)
    differ = int(np.sum(ref_bad & ~same))
    return f"{differ} non-finite value(s) of the reference differ in the candidate" if differ else None


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))
