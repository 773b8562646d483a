"""Post-processed detections compared by matching, numpy only.

A detector's per-image ``boxes`` (x1, y1, x2, y2), ``scores`` and ``labels`` (stacked per image,
rows padded with NaN / -1: ``bnrt.io.export.stacked_records``) are not compared position by
position: detections whose scores tie or nearly tie may come out in another order, and the one at
the cut (the score threshold, or the per-image cap) may be another one. Each reference detection,
by descending score, is matched to an unmatched candidate detection of the same label whose box
overlaps it by IoU >= ``IOU``. Detections left unmatched whose score the reference holds more than
once (within the tolerance) are then paired across the sides by that score (ties: equal scores
ranked in another order, so that a top-k cut or NMS inside the model kept another of them). One
still unmatched fails the check unless its score is within the tolerance of the image's cut (the
lower of the two sides' lowest scores): rounding noise may drop it below the threshold or the cap.
A row holding NaN or Inf that is not padding fails the check. Matched boxes and scores are then held to
the check's criterion: the noise floor (the float64 anchor against the float32 reference, both
matched the same way) or fixed tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bnrt.verify.metrics import OutputMetrics, compare_output, noise_allowance

IOU = 0.99
KEYS = ("boxes", "scores", "labels")


def detection_groups(names: Sequence[str], outputs: Sequence[np.ndarray]) -> dict[str, dict[str, int]]:
    """Output indices of each detection group: outputs named ``[prefix.]boxes`` (samples, rows, 4)
    and ``[prefix.]scores`` (samples, rows), ``labels`` (samples, rows) optional, and the prefix's
    other outputs with a value per detection (samples, rows, ...: ``keypoints``, ``masks``), keyed
    by the prefix. Raw head outputs under those names (YOLO's ``boxes``: (samples, 64, anchors)) are not."""
    groups: dict[str, dict[str, int]] = {}
    for i, name in enumerate(names):
        prefix, _, key = name.rpartition(".")
        if key in KEYS:
            groups.setdefault(prefix, {})[key] = i
    found = {}
    for prefix, group in groups.items():
        if "boxes" not in group or "scores" not in group:
            continue
        boxes = outputs[group["boxes"]].shape
        rows = [outputs[i].shape for key, i in group.items() if key != "boxes"]
        if len(boxes) == 3 and boxes[2] == 4 and all(r == boxes[:2] for r in rows):
            # every other per-detection output of the prefix (keypoints, masks): compared on the matches
            found[prefix] = {**group, **{name.rpartition(".")[2]: i for i, name in enumerate(names)
                                         if name.rpartition(".")[0] == prefix and name.rpartition(".")[2] not in group
                                         and outputs[i].shape[:2] == boxes[:2] and outputs[i].ndim > 2}}
    return found


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), (a[:, None] == b[None, :]).all(axis=2))


def _image(group: dict[str, np.ndarray], n: int) -> tuple:
    """One image's boxes, scores, labels without the padding rows (score and box NaN, label -1),
    how many other rows hold a NaN or Inf (a broken detection, never padding), and the rows kept."""
    scores = group["scores"][n].astype(np.float64).reshape(-1)
    boxes = group["boxes"][n].astype(np.float64).reshape(-1, 4)
    labels = group.get("labels")
    labels = None if labels is None else labels[n].reshape(-1)
    padding = np.isnan(scores) & np.isnan(boxes).all(axis=1) & (True if labels is None else labels == -1)
    finite = np.isfinite(scores) & np.isfinite(boxes).all(axis=1)
    return (boxes[finite], scores[finite], None if labels is None else labels[finite], int(np.sum(~finite & ~padding)),
            finite)


def match(ref: tuple, cand: tuple) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """One image's matched (reference, candidate) pairs and the unmatched rows of each side."""
    (rb, rs, rl, *_), (cb, _, cl, *_) = ref, cand
    iou = _iou(rb, cb) if len(rb) and len(cb) else np.zeros((len(rb), len(cb)))
    allowed = iou >= IOU
    if rl is not None and cl is not None:
        allowed &= rl[:, None] == cl[None, :]
    taken = np.zeros(len(cb), bool)
    pairs = []
    for i in np.argsort(-rs, kind="stable"):
        options = np.flatnonzero(allowed[i] & ~taken)
        if len(options):
            j = options[np.argmax(iou[i, options])]
            taken[j] = True
            pairs.append((int(i), int(j)))
    matched = np.zeros(len(rb), bool)
    matched[[i for i, _ in pairs]] = True
    return pairs, np.flatnonzero(~matched), np.flatnonzero(~taken)


def _tie_swaps(lost: np.ndarray, extra: np.ndarray, r: tuple, c: tuple, tolerance) -> tuple[list, list]:
    """Unmatched detections left after pairing each reference one whose score another reference
    detection shares (within the tolerance) with an unmatched candidate one of that score: equal
    scores ranked in another order, so that a cut inside the model (a per-class top-k, NMS's
    order) kept another of them, of any label."""
    extra = list(extra)
    left = []
    for i in sorted(lost, key=lambda i: -r[1][i]):
        tied = np.sum(np.abs(r[1] - r[1][i]) <= tolerance(r[1][i])) > 1  # a score the reference has twice
        twin = next((j for j in extra if abs(c[1][j] - r[1][i]) <= tolerance(r[1][i])), None) if tied else None
        if twin is None:
            left.append(i)
        else:
            extra.remove(twin)
    return left, extra


@dataclass
class Matching:
    """Detections of two runs matched over some images: matched values per key (first run's,
    second's), how many were left unmatched above the cut, and the worst (image, score, cut)."""

    values: dict[str, tuple[np.ndarray, np.ndarray]]
    unmatched: int
    worst: tuple[int, float, float] | None
    broken: int = 0  # rows with NaN or Inf that are not padding, either side

    def problem(self, what: str) -> str:
        if self.broken:
            return f"{self.broken} detection(s) hold NaN or Inf"
        n, score, cut = self.worst
        return (f"{self.unmatched} detection(s) unmatched (same label, IoU >= {IOU}, no tie) above the cut {what}, "
                f"the highest in image {n}: score {score:.4g}, cut {cut:.4g}")


def matching(ref: dict, cand: dict, images: int, tolerance) -> Matching:
    """``ref``'s and ``cand``'s detections matched on the first ``images`` (``tolerance(score)``: how
    far noise may move a score)."""
    values: dict[str, tuple[list, list]] = {k: ([], []) for k in ref if k != "labels"}
    count, worst, broken = 0, None, 0
    for n in range(images):
        r, c = _image(ref, n), _image(cand, n)
        broken += r[3] + c[3]
        pairs, lost, extra = match(r, c)
        for key, (mine, theirs) in values.items():  # matched rows of every per-detection output
            mine.append(ref[key][n][r[4]][[i for i, _ in pairs]].astype(np.float64).reshape(-1))
            theirs.append(cand[key][n][c[4]][[j for _, j in pairs]].astype(np.float64).reshape(-1))
        lost, extra = _tie_swaps(lost, extra, r, c, tolerance)
        cut = min((float(s.min()) for s in (r[1], c[1]) if len(s)), default=-np.inf)
        above = [float(scores[i]) for rows, scores in ((lost, r[1]), (extra, c[1]))
                 for i in rows if scores[i] > cut + tolerance(scores[i])]
        count += len(above)
        if above and (worst is None or max(above) > worst[1]):
            worst = (n, max(above), cut)
    return Matching({k: (np.concatenate(r), np.concatenate(c)) for k, (r, c) in values.items()}, count, worst, broken)


def compare_detections(names: dict[str, str], ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], *,
                       fixed: tuple[float, float] | None, noise: tuple[dict, dict] | None,
                       factor: float) -> list[OutputMetrics]:
    """Metrics of one detection group (``names``: key -> output name; arrays by key), one per output.
    ``fixed``: (atol, rtol), else ``noise`` = (anchor, noisy) arrays by key on the first images."""
    images = min(len(ref["scores"]), len(cand["scores"]))
    if noise is not None and fixed is None:
        anchor, noisy = noise
        head = min(len(anchor["scores"]), images)
        floor = matching(anchor, noisy, head, lambda s: 0.0)
        tol = noise_allowance(float(np.abs(floor.values["scores"][0] - floor.values["scores"][1]).max(initial=0.0)),
                              float(np.abs(floor.values["scores"][0]).max(initial=0.0)), factor)
        floor = matching(anchor, noisy, head, lambda s: tol)
        error = matching(anchor, cand, head, lambda s: tol)
        floors = {k: float(np.abs(a - b).max(initial=0.0)) for k, (a, b) in floor.values.items()}
        scales = {k: float(np.abs(a).max(initial=0.0)) for k, (a, _) in floor.values.items()}
        errors = {k: float(np.abs(a - b).max(initial=0.0)) for k, (a, b) in error.values.items()}
        found = matching(ref, cand, images, lambda s: tol)
        # where float32 noise already changes which detections this input gives (ties, NMS), the
        # candidate may lose as many as the noise factor allows, at that rate over every image
        allowed = factor * floor.unmatched
        problem = None if not found.unmatched or (error.unmatched <= allowed and found.unmatched <= allowed * images
                                                  / max(head, 1)) \
            else found.problem(f"(float32 noise leaves {floor.unmatched} on the first {head} images)")
    else:
        atol, rtol = fixed or (1e-4, 1e-3)
        found = matching(ref, cand, images, lambda s: atol + rtol * abs(s))
        problem = found.problem("") if found.unmatched else None
    if found.broken:
        problem = found.problem("")  # (the broken rows first: they explain the unmatched ones)
    pairs = found.values
    metrics = []
    for key in names:
        if key == "labels":  # equal on every matched pair by construction: the matching is its test
            out = compare_output(names[key], np.zeros(1), np.zeros(1), 0.0, 0.0)
        else:
            out = compare_output(names[key], *pairs[key], *(fixed or (np.inf, 0.0)))
        out.shape = list(ref[key].shape)
        if noise is not None and fixed is None and key != "labels":
            out.criterion, out.floor, out.error = "noise", floors[key], errors[key]
            out.ratio = errors[key] / floors[key] if floors[key] else (0.0 if errors[key] == 0 else float("inf"))
            out.atol = out.rtol = None
            out.passed = errors[key] <= noise_allowance(floors[key], scales[key], factor)
        if problem:
            out.passed, out.problem = False, problem
        metrics.append(out)
    return metrics
