"""The accuracy statistics: top-k, discordant counts, the exact McNemar p-value (against scipy's
binomial test) and the paired 95 % interval (against its formula written out)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binomtest

from bnrt.verify.accuracy import describe, mcnemar_p, paired, topk_correct


@given(b=st.integers(0, 400), c=st.integers(0, 400))
def test_mcnemar_p_is_the_exact_two_sided_binomial_test(b, c):
    want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert math.isclose(mcnemar_p(b, c), want, rel_tol=1e-9, abs_tol=1e-300)


def test_known_mcnemar_values():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert math.isclose(mcnemar_p(10, 0), 2 * 0.5 ** 10) and math.isclose(mcnemar_p(3, 7), 0.34375)


def test_paired_statistics_count_each_discordant_sample():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ref = np.eye(3)[[0, 1, 2, 0, 1, 0, 1, 1]]  # right on 0-4 and 7; wrong on 5, 6
    cand = np.eye(3)[[0, 1, 2, 1, 1, 2, 1, 0]]  # right on 0-2, 4, 5; wrong on 3, 6, 7
    stats = paired(ref, cand, labels, top_k=2)
    n, b, c = 8, 2, 1  # only the reference right on 3 and 7, only the candidate on 5
    assert (stats["reference_only"], stats["candidate_only"], stats["samples"]) == (b, c, n)
    assert stats["top1"] == [6 / 8, 5 / 8]
    d = (c - b) / n
    half = 1.959963984540054 * math.sqrt((b + c) - (c - b) ** 2 / n) / n
    assert stats["difference"] == d and np.allclose(stats["difference_ci95"], [d - half, d + half])
    assert stats["mcnemar_p"] == 1.0 and stats["within_chance"]
    line = describe("onnx", "torch", stats)
    assert "torch 75.00% (top-2" in line and "only in onnx 1" in line and "-12.50 pp" in line


def test_topk_breaks_ties_toward_the_earlier_class():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert topk_correct(logits, np.array([1, 1]), 1).tolist() == [False, True]
    assert topk_correct(logits, np.array([1, 2]), 5).tolist() == [True, True]  # k above the classes: all


def test_a_real_difference_is_more_than_chance():
    labels = np.zeros(200, dtype=np.int64)
    ref = np.tile([1.0, 0.0], (200, 1))
    cand = ref.copy()
    cand[:30] = [0.0, 1.0]  # 30 samples only the reference gets right
    stats = paired(ref, cand, labels)
    assert stats["reference_only"] == 30 and stats["mcnemar_p"] < 1e-8 and not stats["within_chance"]
    assert stats["difference_ci95"][1] < 0
    assert describe("c", "r", stats).endswith("more than chance (p < 0.05)")
