import numpy as np
import pytest

from bnrt import foldmath


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
