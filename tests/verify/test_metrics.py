import copy

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

from bnrt.io.data import Dataset
from bnrt.errors import OptionError
from bnrt.verify.report import check_table
from dataclasses import replace

from bnrt.io.data import run_batched
from bnrt.io.export import flatten_outputs
from bnrt.verify.check import CheckOptions, check, side
from bnrt.verify.metrics import accuracy, compare_output, floor_measured, truth_samples
from bnrt.verify.sides import Candidate
from bnrt.verify.torchside import torch_runner

from ..conftest import EXAMPLE, assert_one_line_error, report_schema, run_cli


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
    report = check(ref, [side(ref, label="same"), side(bad, label="bad")], data, output_names=["y"])
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
    noisy = anchor + np.array([[0.0, 0.0], [0.0, 1e-9]])  # a floor of 1e-9
    exact = compare_output("y", anchor, anchor + np.array([[0.0, 0.0], [0.0, 1e-7]]), noise=(anchor, noisy))
    assert exact.criterion == "noise" and exact.passed  # beyond 8 floors, within 4 float32 ULPs of max |anchor| = 3
    assert not compare_output("y", anchor, anchor + 1e-5, noise=(anchor, noisy)).passed
    flipped = np.array([[0.0, 0.0], [3.0, 1.0]])
    m = compare_output("y", anchor, flipped, noise=(anchor, noisy), factor=1e10)  # within the error bound
    assert not m.passed and m.problem.startswith("top-1 differs")
    noisy = np.array([[0.0, 0.0], [3.0, 1.0]])  # float32 noise flips a top-1 itself: flips are noise
    assert compare_output("y", noisy, flipped, noise=(anchor, noisy), factor=1e9).passed


def test_a_floor_of_zero_is_not_a_measurement_fixed_tolerances_judge():
    """A noise run that left an output exactly unchanged measured nothing: the fixed criterion's
    defaults (1e-4, 1e-3) judge it, never "error > 0 = floor: fail"."""
    anchor = np.array([[0.5, 2.0], [1.0, 3.0]])
    m = compare_output("y", anchor, anchor + 7.7e-7, noise=(anchor, anchor.copy()))
    assert (m.criterion, m.passed, m.floor, m.atol, m.rtol) == ("fixed", True, None, 1e-4, 1e-3)
    assert not compare_output("y", anchor, anchor * 1.01, noise=(anchor, anchor.copy())).passed
    assert floor_measured(anchor, anchor + 1e-9) and not floor_measured(anchor, anchor.copy())
    assert not floor_measured(np.array([np.nan, 1.0]), np.array([2.0, 1.0]))  # differs only where not finite


def test_fixed_tolerances_are_used_when_given_or_without_a_noise_reference():
    ref, cand = np.ones(4), np.ones(4) + 5e-4
    assert compare_output("y", ref, cand).criterion == "fixed" and compare_output("y", ref, cand).passed
    m = compare_output("y", ref, cand, atol=1e-4, rtol=0.0, noise=(ref, ref))
    assert (m.criterion, m.passed, m.floor) == ("fixed", False, None)


def test_truth_samples_cover_2048_values_of_the_smallest_output_between_2_and_8():
    assert truth_samples([np.zeros((64, 10))], 64) == 8  # 10 logits: capped at 8
    assert truth_samples([np.zeros((64, 1000))], 64) == 3  # ceil(2048 / 1000)
    assert truth_samples([np.zeros((64, 21, 64, 64)), np.zeros((64, 2048))], 64) == 2  # never below 2
    assert truth_samples([np.zeros((64, 100)), np.zeros((64, 3000))], 64) == 8  # the smallest output decides
    assert truth_samples([np.zeros((5, 10))], 5) == 5  # never more than the data


def _noisy_pair():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 512)).eval()
    bad = copy.deepcopy(ref)
    with torch.no_grad():
        bad[2].weight[0] *= 1.01
    data = Dataset([np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)], None, "r")
    return ref, bad, data


def test_a_head_only_candidate_runs_on_the_noise_floor_samples():
    ref, _, data = _noisy_pair()
    seen = []

    def counting(xs):
        seen.append(len(xs[0]))
        return torch_runner(ref)(xs)

    head = Candidate(replace(side(ref, label="head"), runner=counting), head_only=True)
    report = check(ref, [head, side(ref, label="all")], data, output_names=["y"])
    assert report.noise == "float64"
    assert report.noise_samples == 4 and seen == [4]  # ceil(2048 / 512) = 4 of the 40 samples
    assert [c.samples for c in report.comparisons] == [4, None] and report.passed
    assert report.to_json()["comparisons"][0]["samples"] == 4


def test_an_informational_candidate_is_reported_and_never_fails_the_check():
    ref, bad, data = _noisy_pair()
    report = check(ref, [side(ref, label="same"), Candidate(side(bad, label="tf32-like"), head_only=True, informational=True)],
                   data, output_names=["y"])
    same, info = report.comparisons
    assert same.passed and not info.passed and info.informational and info.outputs[0].ratio > 100
    assert report.passed and report.to_json()["passed"] is True
    table = check_table(report).splitlines()
    assert "info: beyond" in table[2 + 1]
    assert table[4:] == ["check passed"]  # an informational row is not localised, nor said to be
    assert same.layers is None and info.layers is None  # no fold records: outputs only
    jsonschema.validate(report.to_json(), report_schema("check-3"))


def test_torch_on_cuda_is_refused_where_torch_has_none():
    if torch.cuda.is_available():
        pytest.skip("torch has CUDA here; the refusal needs a machine without it")
    with pytest.raises(OptionError, match=r"^device cuda: torch .* has no CUDA device here"):
        CheckOptions(device="cuda")
    with pytest.raises(OptionError, match="tf32"):
        CheckOptions(tf32=True)
    proc = run_cli("check", str(EXAMPLE), str(EXAMPLE), "--device", "cuda")
    assert_one_line_error(proc, "--device cuda: torch", "has no CUDA device here")


def test_top1_flips_count_only_where_float32_noise_cannot_flip():
    anchor = np.array([[0.0, 0.6], [0.0, 10.0]])
    noisy = anchor + np.array([[0.5, 0.0], [0.0, 0.0]])  # floor 0.5: margins <= 1.0 are noise's to flip
    small = np.array([[1.0, 0.6], [0.0, 10.0]])  # flips sample 0, margin 0.6
    m = compare_output("y", noisy, small, noise=(anchor, noisy), factor=1e9)
    assert m.passed and m.floor == 0.5
    large = np.array([[0.0, 0.6], [10.5, 10.0]])  # flips sample 1, margin 10 > 2 x floor
    m = compare_output("y", noisy, large, noise=(anchor, noisy), factor=1e9)
    assert not m.passed and m.problem.startswith("top-1 differs from the noise anchor on 1 sample(s)")


def test_a_reference_with_nan_or_inf_fails_unless_allowed_then_positions_must_match():
    ref = np.array([[1.0, np.nan], [np.inf, 2.0]])
    for kwargs in ({"atol": 1.0, "rtol": 1.0}, {"noise": (ref, ref)}):
        m = compare_output("y", ref, ref.copy(), **kwargs)
        assert not m.passed and m.problem.startswith("the reference itself outputs NaN or Inf (2 of 4 values)")
    same = compare_output("y", ref, ref.copy(), 1e-6, 0.0, allow_nonfinite=True)
    assert same.passed and same.max_abs == 0.0
    assert compare_output("y", ref, ref.copy(), noise=(ref, ref), allow_nonfinite=True).passed
    moved = compare_output("y", ref, np.array([[np.nan, np.nan], [np.inf, 2.0]]), 1.0, 1.0, allow_nonfinite=True)
    assert moved.problem == "NaN or Inf where the reference is finite (1 of 4 values)"
    flipped = compare_output("y", ref, np.array([[1.0, np.nan], [-np.inf, 2.0]]), 1.0, 1.0, allow_nonfinite=True)
    assert flipped.problem == "1 non-finite value(s) of the reference differ in the candidate"
    elsewhere = compare_output("y", ref, np.array([[1.5, np.nan], [np.inf, 2.0]]), 1e-6, 0.0, allow_nonfinite=True)
    assert not elsewhere.passed and elsewhere.max_abs == pytest.approx(0.5)


def test_a_noise_floor_over_only_non_finite_values_falls_back_to_fixed_tolerances():
    # every noise-floor sample is NaN: no floor can be measured, so 0 error over 0 floor may not pass
    ref = np.array([[np.nan, np.nan], [1.0, 2.0]])
    cand = np.array([[np.nan, np.nan], [1.0, 3.0]])
    m = compare_output("y", ref, cand, noise=(ref[:1], ref[:1]), allow_nonfinite=True)
    assert m.criterion == "fixed" and not m.passed and m.max_abs == pytest.approx(1.0)


def test_a_candidate_with_a_deployed_twin_is_followed_by_it_informational():
    """An ONNX side on CUDA carries its TF32 twin (``Side.deployed``); the check reports the twin
    right after it, on the noise-floor samples, deciding nothing (here a torch stand-in that differs)."""
    ref, bad, data = _noisy_pair()
    made = []
    candidate = replace(side(ref, label="onnx cuda"), deployed=lambda: made.append(1) or side(bad, label="twin"))
    report = check(ref, [candidate], data, output_names=["y"])
    assert [(c.candidate, c.informational, c.samples) for c in report.comparisons] == [
        ("onnx cuda", False, None), ("twin", True, report.noise_samples)]
    assert made == [1] and report.passed and not report.comparisons[1].passed
