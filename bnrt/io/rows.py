"""Arrays read a few rows at a time: what the check needs of a data set that does not fit in memory.

``Rows`` is the array-like a ``Dataset`` input may be instead of an ``np.ndarray``: a ``shape``, a
``dtype``, ``len``, and indexing along the first axis (an index, a slice, a list of indexes) that
reads those rows only; ``np.asarray`` reads them all. Two kinds: ``bnrt.io.images.Images`` (an
image folder, decoded when read) and ``Stored`` (an uncompressed array in a file: a ``.npy`` or a
member of an ``.npz`` written by ``np.savez``, read at its byte offset; compressed members and
Fortran-ordered arrays are read whole, as ``stored`` says).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

CHUNK_BYTES = 64 << 20  # what a scan over every row (``chunks``) holds at once


class Rows:
    """An (N, ...) array whose rows are read when indexed; subclasses give ``shape``, ``dtype`` and
    ``_take`` of a run of consecutive rows (a slice with step 1): any other selection is read run by run."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"row {key} of {len(self)}")
            return self._take(slice(index, index + 1))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._take(slice(start, max(start, stop)))
            key = range(start, stop, step)
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (len(self),):
                raise IndexError(f"a mask of shape {key.shape} for {len(self)} rows")
            key = np.flatnonzero(key)
        indices = [int(i) + (len(self) if i < 0 else 0) for i in key.reshape(-1)]
        bad = next((i for i in indices if not 0 <= i < len(self)), None)
        if bad is not None:
            raise IndexError(f"row {bad} of {len(self)}")
        runs = []  # [start, stop) of each run of consecutive rows, in the order asked for
        for i in indices:
            if runs and runs[-1][1] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, i + 1])
        if not runs:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        parts = [self._take(slice(start, stop)) for start, stop in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _take(self, key: slice) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)


class Stored(Rows):
    """Rows of a C-ordered array stored uncompressed at byte ``offset`` of ``path``; float rows are
    read as float32 (the check's type)."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], stored: np.dtype):
        self.path, self.offset, self.shape, self.stored = path, offset, tuple(shape), np.dtype(stored)
        self.dtype = np.dtype(np.float32) if self.stored.kind == "f" else self.stored.newbyteorder("=")
        self.row = int(np.prod(self.shape[1:], dtype=np.int64))

    def _read(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.row
        rows = np.fromfile(self.path, self.stored, count, offset=self.offset + start * self.row * self.stored.itemsize)
        if rows.size != count:
            raise OSError(f"{self.path}: ends inside the array (rows {start}-{stop} of {len(self)})")
        return rows.reshape(stop - start, *self.shape[1:]).astype(self.dtype, copy=False)

    def _take(self, key: slice) -> np.ndarray:
        return self._read(key.start, key.stop)


def chunks(array, row_bytes: int):
    """(start, rows) over ``array`` (an ndarray or ``Rows``) in runs of about ``CHUNK_BYTES``."""
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for start in range(0, len(array), step):
        yield start, array[start:start + step]


def _header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """An .npy header read from ``f`` (shape, Fortran order, dtype), or None for a version numpy
    has no public reader of."""
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        return None
    return readers[version](f)


def stored(path: Path, member: str | None = None) -> Stored | None:
    """``path`` (a .npy) or its ``member`` (an .npz entry, ``name.npy``) as ``Stored`` rows, or None
    where it cannot be read in place (compressed, Fortran order, object dtype, 0-d): read it whole."""
    with open(path, "rb") as f:
        if member is not None:
            with zipfile.ZipFile(f) as archive:
                info = archive.getinfo(member)
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                   + int.from_bytes(local[28:30], "little"))
        header = _header(f)
        if header is None:
            return None
        shape, fortran, dtype = header
        if fortran or dtype.hasobject or not shape:
            return None
        return Stored(Path(path), f.tell(), shape, dtype)


class Picked(Rows):
    """Rows ``index`` of ``base`` (an ndarray or ``Rows``), in that order."""

    def __init__(self, base, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)
        self.shape, self.dtype = (len(self.index), *base.shape[1:]), base.dtype

    def _take(self, key: slice) -> np.ndarray:
        rows = self.index[key]
        if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            return np.asarray(self.base[int(rows[0]):int(rows[0]) + len(rows)])  # an ndarray's view, a Rows' run
        return np.asarray(self.base[rows])
