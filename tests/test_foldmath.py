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
