from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import bnrt

from bnrt.folding import foldmath


def test_scale_shift_by_hand():
    s, t = foldmath.bn_scale_shift(mean=[1.0, 2.0], var=[3.0, 0.0], eps=1.0, gamma=[2.0, 1.0], beta=[0.5, -1.0])
    # s = gamma / sqrt(var + eps) = [2/2, 1/1]; t = beta - mean * s
    np.testing.assert_array_equal(s, [1.0, 1.0])
    np.testing.assert_array_equal(t, [-0.5, -3.0])


def test_scale_shift_affine_false_is_gamma_one_beta_zero():
    s, t = foldmath.bn_scale_shift(mean=[4.0], var=[15.0], eps=1.0)
    np.testing.assert_array_equal(s, [0.25])
    np.testing.assert_array_equal(t, [-1.0])


def test_scale_shift_is_float64():
    s, t = foldmath.bn_scale_shift(np.float32([0.1]), np.float32([0.2]), 1e-5, np.float32([0.3]), np.float32([0.4]))
    assert s.dtype == np.float64 and t.dtype == np.float64


def test_fold_backward_by_hand():
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    w2, b2 = foldmath.fold_backward(w, None, s=[2.0, 0.5], t=[1.0, -1.0])
    np.testing.assert_array_equal(w2, [[2.0, 4.0], [1.5, 2.0]])
    np.testing.assert_array_equal(b2, [1.0, -1.0])
    _, b3 = foldmath.fold_backward(w, [1.0, 2.0], s=[2.0, 0.5], t=[1.0, -1.0])
    np.testing.assert_array_equal(b3, [3.0, 0.0])


def test_fold_backward_scales_axis0_of_conv_weight():
    w = np.ones((3, 2, 2, 2))
    w2, _ = foldmath.fold_backward(w, None, s=[1.0, 2.0, 3.0], t=[0.0, 0.0, 0.0])
    assert w2.shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(w2[:, 0, 0, 0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(w2[2], np.full((2, 2, 2), 3.0))


def test_fold_backward_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="3 output channels, BN has 2"):
        foldmath.fold_backward(np.ones((3, 4)), None, [1.0, 1.0], [0.0, 0.0])


def test_branch_kernels_compute_what_the_branches_compute():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 7, 7))
    w3, w1 = rng.standard_normal((6, 3, 3, 3)), rng.standard_normal((6, 3, 1, 1))
    s = rng.standard_normal(6)
    merged = w3 + foldmath.pad_kernel(w1, (3, 3)) + foldmath.identity_kernel(s, 3, (3, 3))
    xt = torch.from_numpy(x)
    want = (F.conv2d(xt, torch.from_numpy(w3), padding=1, groups=2) + F.conv2d(xt, torch.from_numpy(w1), groups=2)
            + xt * torch.from_numpy(s).reshape(1, -1, 1, 1))
    got = F.conv2d(xt, torch.from_numpy(merged), padding=1, groups=2)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)


# --- the folded float32 weights against the exact fold, in rational arithmetic ---------------------

def _sqrt_le(t: Fraction, s: Fraction, c: Fraction) -> bool:
    """t / sqrt(s) <= c, decided exactly (s > 0)."""
    if t <= 0 <= c:
        return True
    if t > 0 >= c:
        return False
    return t * t <= c * c * s if t > 0 else t * t >= c * c * s


def _within_half_ulp(x: float, base: Fraction, t: Fraction, s: Fraction) -> bool:
    """|x − (base + t/sqrt(s))| ≤ half a float32 ULP of x, exactly."""
    half = Fraction(float(np.spacing(np.float32(abs(x))))) / 2
    lo, hi = Fraction(x) - half - base, Fraction(x) + half - base
    return _sqrt_le(t, s, hi) and _sqrt_le(-t, s, -lo)  # lo <= t/sqrt(s) <= hi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folded_float32_weights_are_the_exact_fold_rounded_once(seed):
    """bnrt's float32 conv->bn fold against w·γ/√(v+ε) and (b−μ)·γ/√(v+ε)+β computed exactly from the
    float32 inputs with Python fractions (no floating point): every weight and bias within half a
    float32 ULP, i.e. the exact result correctly rounded."""
    gen = torch.Generator().manual_seed(seed)
    conv, bn = nn.Conv2d(6, 12, 3, bias=True), nn.BatchNorm2d(12, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(12, generator=gen) * 3)
        bn.running_var.copy_(torch.rand(12, generator=gen) * 4 + 1e-3)
        bn.weight.copy_(torch.randn(12, generator=gen))
        bn.bias.copy_(torch.randn(12, generator=gen))
    model = nn.Sequential(conv, bn).eval()
    folded = bnrt.fold(model, (torch.randn(2, 6, 5, 5),)).model[0]
    assert folded.weight.dtype == torch.float32
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    fw, fb = folded.weight.detach().numpy(), folded.bias.detach().numpy()
    for c in range(12):
        s = Fraction(bn.running_var[c].item()) + Fraction(float(bn.eps))
        g, beta, mu = (Fraction(t[c].item()) for t in (bn.weight, bn.bias, bn.running_mean))
        for i, x in np.ndenumerate(fw[c]):
            assert _within_half_ulp(float(x), Fraction(0), Fraction(float(w[c][i])) * g, s), (c, i)
        assert _within_half_ulp(float(fb[c]), beta, (Fraction(float(b[c])) - mu) * g, s), c
    # and the check can fail: one float32 ULP off is outside
    x = float(np.nextafter(fw[0, 0, 0, 0], np.float32(np.inf)))
    s0 = Fraction(bn.running_var[0].item()) + Fraction(float(bn.eps))
    assert not _within_half_ulp(x, Fraction(0), Fraction(float(w[0, 0, 0, 0])) * Fraction(bn.weight[0].item()), s0)
