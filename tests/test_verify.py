import numpy as np
import pytest
import torch
from torch import nn

from bnrt.data import Dataset
from bnrt.verify import accuracy, check, compare_output, flatten_outputs, run_batched, torch_runner


def test_metrics_by_hand():
    ref = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    cand = np.array([[1.1, -2.0], [0.5, 3.0]], np.float32)
    m = compare_output("y", ref, cand, atol=0.0, rtol=0.1)
    # diffs: 0.1, 0, 0, 1.0; rel: 0.1/1, 0, 0, 1/4
    assert m.max_abs == pytest.approx(1.0)
    assert m.max_rel == pytest.approx(0.25)
    assert m.mean_abs == pytest.approx(1.1 / 4, rel=1e-6)
    assert m.top1_agreement == 1.0
    assert not m.passed  # 1.0 > 0.1 * 4
    assert compare_output("y", ref, cand, atol=0.0, rtol=0.26).passed


def test_rel_floor_for_near_zero_reference():
    ref = np.array([1e-12, 10.0])
    cand = np.array([1e-3, 10.0])
    m = compare_output("y", ref, cand, atol=0.0, rtol=0.0)
    # floor = 1e-3 * max|ref| = 1e-2, so rel = 1e-3 / 1e-2
    assert m.max_rel == pytest.approx(0.1)


def test_top1_agreement_counts_argmax_changes():
    ref = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    cand = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert compare_output("y", ref, cand, 1.0, 0.0).top1_agreement == 0.75


def test_nan_in_candidate_and_shape_mismatch_fail():
    m = compare_output("y", np.ones(3), np.array([1.0, np.nan, 1.0]), 1.0, 1.0)
    assert not m.passed and m.max_abs == float("inf")
    assert not compare_output("y", np.ones(3), np.ones(4), 1.0, 1.0).passed


def test_accuracy():
    assert accuracy(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_flatten_outputs():
    a, b, c = torch.ones(1), torch.zeros(1), torch.ones(2)
    assert [t.shape for t in flatten_outputs({"p": a, "q": (b, [c])})] == [(1,), (1,), (2,)]


def test_run_batched_handles_ragged_last_batch():
    data = Dataset([np.arange(10, dtype=np.float32)[:, None]], None, "t")
    seen = []

    def runner(inputs):
        seen.append(len(inputs[0]))
        return [inputs[0] * 2]

    (out,) = run_batched(runner, data, batch_size=4)
    assert seen == [4, 4, 2]
    np.testing.assert_array_equal(out[:, 0], np.arange(10) * 2)


def test_check_catches_a_corrupted_layer():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 3)).eval()
    bad = nn.Sequential(nn.Linear(4, 3)).eval()
    bad.load_state_dict(ref.state_dict())
    with torch.no_grad():
        bad[0].weight[1] *= 1.01
    data = Dataset([np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)], np.zeros(32, np.int64), "r")
    report = check(("torch", torch_runner(ref)), [("same", torch_runner(ref)), ("bad", torch_runner(bad))], data, ["y"])
    assert [c.passed for c in report.comparisons] == [True, False]
    assert report.comparisons[0].outputs[0].max_abs == 0.0
    assert not report.passed
    assert set(report.accuracy) == {"torch", "same", "bad"}
    assert report.to_json()["passed"] is False


def test_noise_criterion_passes_within_the_factor_of_the_floor_and_fails_beyond():
    rng = np.random.default_rng(0)
    anchor = rng.standard_normal((8, 10)) * 100
    noisy = anchor + rng.standard_normal((8, 10)) * 1e-3          # floor ~3e-3
    ok = anchor + rng.standard_normal((8, 10)) * 2e-3
    m = compare_output("y", noisy, ok, noise=(anchor, noisy))
    assert (m.criterion, m.atol, m.rtol, m.passed) == ("noise", None, None, True)
    assert m.floor == float(np.abs(noisy - anchor).max()) and m.ratio == m.error / m.floor
    bad = anchor + rng.standard_normal((8, 10)) * 1e-1
    assert not compare_output("y", noisy, bad, noise=(anchor, noisy)).passed
    assert compare_output("y", noisy, bad, noise=(anchor, noisy), factor=1e3).passed


def test_noise_criterion_tiny_term_and_top1_rule():
    anchor = np.array([[0.0, 0.0], [1.0, 3.0]])
    exact = compare_output("y", anchor, anchor + np.array([[0.0, 0.0], [0.0, 1e-7]]), noise=(anchor, anchor.copy()))
    assert exact.floor == 0.0 and exact.passed  # within 4 float32 ULPs of max |anchor| = 3
    assert not compare_output("y", anchor, anchor + 1e-5, noise=(anchor, anchor.copy())).passed
    flipped = np.array([[0.0, 0.0], [3.0, 1.0]])
    m = compare_output("y", anchor, flipped, noise=(anchor, anchor.copy()), factor=1e9)
    assert not m.passed and m.problem.startswith("top-1 differs")
    noisy = np.array([[0.0, 0.0], [3.0, 1.0]])  # float32 noise flips a top-1 itself: flips are noise
    assert compare_output("y", noisy, flipped, noise=(anchor, noisy), factor=1e9).passed


def test_fixed_tolerances_are_used_when_given_or_without_a_noise_reference():
    ref, cand = np.ones(4), np.ones(4) + 5e-4
    assert compare_output("y", ref, cand).criterion == "fixed" and compare_output("y", ref, cand).passed
    m = compare_output("y", ref, cand, atol=1e-4, rtol=0.0, noise=(ref, ref))
    assert (m.criterion, m.passed, m.floor) == ("fixed", False, None)
