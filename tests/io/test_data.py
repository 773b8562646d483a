import numpy as np
import pytest

from bnrt.io.data import load_data, random_inputs
from bnrt.errors import InputError, OptionError


def test_random_inputs_are_seeded():
    a, b = random_inputs([(1, 3, 4)], 5, seed=7), random_inputs([(1, 3, 4)], 5, seed=7)
    assert a.inputs[0].shape == (5, 3, 4) and a.inputs[0].dtype == np.float32
    np.testing.assert_array_equal(a.inputs[0], b.inputs[0])
    assert not np.array_equal(a.inputs[0], random_inputs([(1, 3, 4)], 5, seed=8).inputs[0])


def test_npz_named_inputs_and_labels(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.ones((4, 2)), b=np.zeros((4, 3), np.float32), y=np.arange(4))
    data = load_data(tmp_path / "d.npz", ["a", "b"])
    assert [x.shape for x in data.inputs] == [(4, 2), (4, 3)]
    assert data.inputs[0].dtype == np.float32
    np.testing.assert_array_equal(data.labels, [0, 1, 2, 3])
    assert data.shapes() == [(1, 2), (1, 3)]


def test_single_array_any_name(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.ones((2, 1, 8, 8)))
    np.save(tmp_path / "d.npy", np.ones((3, 5)))
    assert load_data(tmp_path / "d.npz", ["x"]).inputs[0].shape == (2, 1, 8, 8)
    assert load_data(tmp_path / "d.npy", ["x"]).inputs[0].shape == (3, 5)


@pytest.mark.parametrize("arrays,names,message", [
    ({"a": np.ones((2, 2)), "b": np.ones((2, 2))}, ["x"], "holds arrays a, b but the model's inputs are x"),
    ({"x": np.ones((2, 2)), "y": np.ones(2)}, ["x"], "labels must be integers of shape (2,)"),
    ({"x": np.ones((2, 2)), "y": np.arange(3)}, ["x"], "labels must be integers of shape (2,)"),
    ({"a": np.ones((2, 2)), "b": np.ones((3, 2))}, ["a", "b"], "different sample counts [2, 3]"),
    ({"x": np.array(["a", "b"])}, ["x"], "has dtype <U1, expected numbers"),
    ({"x": np.ones((0, 2))}, ["x"], "expected (N, ...) with N > 0"),
])
def test_bad_npz(tmp_path, arrays, names, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError) as err:
        load_data(tmp_path / "d.npz", names)
    assert str(err.value).startswith(str(tmp_path / "d.npz")) and message in str(err.value)


def test_unreadable_and_pickled(tmp_path):
    (tmp_path / "t.npz").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a readable .npz or .npy file"):
        load_data(tmp_path / "t.npz", ["x"])
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="not a readable .npz or .npy file"):
        load_data(tmp_path / "o.npy", ["x"])
    with pytest.raises(InputError, match="no such data file"):
        load_data(tmp_path / "missing.npz", ["x"])


def test_uncompressed_arrays_are_read_by_rows_where_they_lie(tmp_path, monkeypatch):
    import bnrt.io.rows as rows
    from bnrt.io.rows import Stored

    rng = np.random.default_rng(0)
    x, z = rng.standard_normal((9, 2, 3)), rng.integers(0, 5, (9, 4), dtype=np.int16)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "d.npz", x=x, z=z, y=np.arange(9))
    np.savez_compressed(tmp_path / "c.npz", x=x, z=z)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    for path, names in (("x.npy", ["x"]), ("d.npz", ["x", "z"])):
        data = load_data(tmp_path / path, names)
        assert all(isinstance(a, Stored) for a in data.inputs) and data.inputs[0].dtype == np.float32
        got = data.inputs[0]
        want = x.astype(np.float32)
        assert got.shape == (9, 2, 3) and got.ndim == 3 and len(got) == 9
        for key in (4, -1, slice(2, 7), slice(None, None, 3), slice(7, 2), [5, 0, 5], np.arange(3, 6)):
            assert np.array_equal(got[key], want[key]), key
        assert np.array_equal(np.asarray(got), want)
        if path == "d.npz":
            assert np.array_equal(data.inputs[1][1:4], z[1:4]) and data.inputs[1].dtype == np.int16
            assert isinstance(data.labels, np.ndarray) and data.labels.tolist() == list(range(9))
    for path, names in (("c.npz", ["x", "z"]), ("f.npy", ["x"])):  # compressed, Fortran order: read whole
        data = load_data(tmp_path / path, names)
        assert isinstance(data.inputs[0], np.ndarray) and np.array_equal(data.inputs[0], x.astype(np.float32))
    bad = x.copy()
    bad[6, 1, 2], bad[8, 0, 0] = np.nan, np.inf
    np.save(tmp_path / "bad.npy", bad)
    monkeypatch.setattr(rows, "CHUNK_BYTES", 2 * 6 * 8)  # two rows at a time: the scan crosses chunks
    with pytest.raises(OptionError, match=r"holds NaN or Inf \(2 values, first in sample 6\)"):
        load_data(tmp_path / "bad.npy", ["x"])
    (tmp_path / "cut.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-8])
    with pytest.raises(InputError, match="cut.npy: not a readable .npz or .npy file"):  # found before any run
        load_data(tmp_path / "cut.npy", ["x"])


def test_rows_refuse_indexes_out_of_range_and_take_masks(tmp_path):
    from bnrt.io.rows import stored

    x = np.arange(20, dtype=">i8").reshape(10, 2)
    np.save(tmp_path / "x.npy", x)
    rows = stored(tmp_path / "x.npy")
    for key in ([10], [-11], np.array([3, 12])):
        with pytest.raises(IndexError):
            rows[key]
    mask = np.zeros(10, bool)
    mask[[1, 4]] = True
    assert rows[mask].tolist() == [[2, 3], [8, 9]] and rows[[-1, 0]].tolist() == [[18, 19], [0, 1]]
    assert rows.dtype == np.dtype("int64") and rows[2:4].dtype == rows[[3, 1]].dtype == np.dtype("int64")
