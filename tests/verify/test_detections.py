"""Detections compared by matching: order, ties and the cut are not differences; a moved box, a
changed label or a lost confident detection is."""

from __future__ import annotations

import numpy as np
import pytest

from bnrt.verify.detections import compare_detections, detection_groups, match

NAMES = {"boxes": "boxes", "scores": "scores", "labels": "labels"}


def _image(boxes, scores, labels, rows=None):
    """One image's detections as the check holds them: (1, rows, ...) padded with NaN / -1."""
    n = len(scores)
    rows = rows or n
    b = np.full((1, rows, 4), np.nan, np.float32)
    s = np.full((1, rows), np.nan, np.float32)
    lab = np.full((1, rows), -1, np.int64)
    b[0, :n], s[0, :n], lab[0, :n] = boxes, scores, labels
    return {"boxes": b, "scores": s, "labels": lab}


BOXES = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 30, 30], [50, 50, 60, 70]], np.float32)
SCORES = np.array([0.9, 0.8, 0.5, 0.2], np.float32)
LABELS = np.array([1, 2, 1, 3])


def _judge(ref, cand, **kw):
    metrics = compare_detections(NAMES, ref, cand, fixed=kw.get("fixed", (1e-4, 1e-3)), noise=kw.get("noise"),
                                 factor=8.0)
    return {m.name: m for m in metrics}


def test_groups_are_found_by_name_and_shape():
    det = _image(BOXES, SCORES, LABELS)
    arrays = [det["boxes"], det["scores"], det["labels"]]
    assert detection_groups(["boxes", "scores", "labels"], arrays) == {"": {"boxes": 0, "scores": 1, "labels": 2}}
    logits = np.zeros((1, 10))
    assert detection_groups(["logits", "out.boxes", "out.scores"], [logits, *arrays[:2]]) == {
        "out": {"boxes": 1, "scores": 2}}
    assert detection_groups(["boxes", "logits"], [arrays[0], logits]) == {}
    # a detection head's raw outputs under those names (YOLO: boxes (N, 64, anchors), scores (N, 80, anchors))
    assert detection_groups(["output_1.boxes", "output_1.scores"], [np.zeros((2, 64, 8400)), np.zeros((2, 80, 8400))]) == {}


def test_the_same_detections_in_another_order_pass():
    order = [2, 0, 3, 1]
    ref = _image(BOXES, SCORES, LABELS)
    cand = _image(BOXES[order] + 5e-5, SCORES[order], LABELS[order], rows=6)  # padded further
    metrics = _judge(ref, cand)
    assert all(m.passed for m in metrics.values())
    assert metrics["boxes"].max_abs == pytest.approx(5e-5, rel=0.1)
    pairs, lost, extra = match((BOXES.astype(float), SCORES.astype(float), LABELS),
                               (BOXES[order].astype(float), SCORES[order].astype(float), LABELS[order]))
    assert sorted(pairs) == [(0, 1), (1, 3), (2, 0), (3, 2)] and not len(lost) and not len(extra)


def test_a_moved_box_a_changed_label_or_a_lost_detection_fails():
    ref = _image(BOXES, SCORES, LABELS)
    moved = BOXES.copy()
    moved[1] += [0, 0, 3, 0]  # IoU 20*20 / 23*20 = 0.87
    relabelled = LABELS.copy()
    relabelled[0] = 7
    for cand in (_image(moved, SCORES, LABELS), _image(BOXES, SCORES, relabelled), _image(BOXES[1:], SCORES[1:], LABELS[1:])):
        metrics = _judge(ref, cand)
        assert not metrics["boxes"].passed and not metrics["labels"].passed
        assert "unmatched" in metrics["boxes"].problem and "image 0" in metrics["boxes"].problem


def test_a_detection_at_the_cut_may_be_another_one():
    # the lowest detection (0.2) is replaced by another of the same score: a tie at the cap
    ref = _image(BOXES, SCORES, LABELS)
    other = BOXES.copy()
    other[3] = [70, 70, 80, 80]
    assert all(m.passed for m in _judge(ref, _image(other, SCORES, LABELS)).values())
    # ... or missing: near the cut, rounding can drop it below the threshold
    assert all(m.passed for m in _judge(ref, _image(BOXES[:3], SCORES[:3], LABELS[:3])).values())
    # a confident detection replaced is not at the cut
    first = BOXES.copy()
    first[0] = [70, 70, 80, 80]
    assert not _judge(ref, _image(first, SCORES, LABELS))["scores"].passed


def test_tied_scores_may_keep_other_detections():
    tied = np.array([0.9, 0.5, 0.5, 0.2], np.float32)  # two detections share 0.5
    ref = _image(BOXES, tied, LABELS)
    other = BOXES.copy()
    other[2] = [70, 70, 80, 80]
    assert all(m.passed for m in _judge(ref, _image(other, tied, [1, 2, 3, 3])).values())
    # a confident detection unmatched is not excused by the tie below it
    other[0] = [90, 90, 99, 99]
    assert "1 detection(s)" not in _judge(ref, _image(other, tied, LABELS))["boxes"].problem


def test_matched_boxes_are_held_to_the_tolerance():
    ref = _image(BOXES, SCORES, LABELS)
    metrics = _judge(ref, _image(BOXES + 0.01, SCORES, LABELS))  # IoU still > 0.99
    assert not metrics["boxes"].passed and metrics["boxes"].problem is None
    assert metrics["scores"].passed and metrics["boxes"].max_abs == pytest.approx(0.01, rel=1e-3)


def test_noise_that_already_reorders_detections_sets_the_allowance():
    ref = _image(BOXES, SCORES, LABELS)
    lost_one = _image(BOXES[[0, 1, 3]], SCORES[[0, 1, 3]], LABELS[[0, 1, 3]])  # the 0.5 detection, not at the cut
    # float32 noise keeps every detection: losing one fails
    quiet = (ref, _image(BOXES + 1e-5, SCORES + 1e-7, LABELS))
    assert not _judge(ref, lost_one, fixed=None, noise=quiet)["boxes"].passed
    # float32 noise itself loses it on this input: the candidate may too
    noisy = (ref, lost_one)
    metrics = _judge(ref, lost_one, fixed=None, noise=noisy)
    assert metrics["boxes"].passed and metrics["boxes"].criterion == "noise"


def test_a_candidate_with_fewer_or_broken_detections_is_not_excused_by_its_own_cut():
    ref = _image(BOXES[:3], SCORES[:3], LABELS[:3])
    elsewhere = _image(np.array([[70, 70, 80, 80]], np.float32), np.array([0.95], np.float32), [7], rows=3)
    empty = _image(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], rows=3)
    for cand in (elsewhere, empty):
        metrics = _judge(ref, cand)
        assert not any(m.passed for m in metrics.values())
        assert "unmatched" in metrics["scores"].problem
    broken = _image(BOXES[:3], SCORES[:3], LABELS[:3])
    broken["scores"][0, 1] = np.nan  # not padding: its box and label are there
    assert _judge(ref, broken)["boxes"].problem == "1 detection(s) hold NaN or Inf"


def test_other_per_detection_outputs_are_compared_on_the_matches():
    ref = _image(BOXES, SCORES, LABELS, rows=5)  # one padding row
    points = np.full((1, 5, 17, 3), np.nan, np.float32)  # keypoints, padded like the boxes
    points[0, :4] = np.random.default_rng(0).uniform(0, 50, (4, 17, 3))
    ref["keypoints"] = points
    names = {**NAMES, "keypoints": "keypoints"}
    arrays = [ref[k] for k in names]
    assert detection_groups(list(names), arrays) == {"": {"boxes": 0, "scores": 1, "labels": 2, "keypoints": 3}}
    order = [3, 1, 0, 2]
    cand = _image(BOXES[order], SCORES[order], LABELS[order], rows=4)
    cand["keypoints"] = points[:, order].copy()
    metrics = {m.name: m for m in compare_detections(names, ref, cand, fixed=(1e-4, 1e-3), noise=None, factor=8.0)}
    assert all(m.passed for m in metrics.values()) and metrics["keypoints"].max_abs == 0
    cand["keypoints"][0, 0, 5, 1] += 1.0  # one keypoint of one matched detection moved
    metrics = {m.name: m for m in compare_detections(names, ref, cand, fixed=(1e-4, 1e-3), noise=None, factor=8.0)}
    assert not metrics["keypoints"].passed and metrics["keypoints"].max_abs == pytest.approx(1.0, rel=1e-5)
    assert metrics["boxes"].passed
