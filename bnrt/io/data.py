"""Model inputs for checks (and calibration): seeded random tensors or arrays from .npz/.npy files.

An .npz holds one array per model input, named like the input (``x``), or a single array when the
model has one input; labels, if any, under ``y``/``labels``/``label``/``targets``. Pickled arrays
are never loaded.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bnrt.errors import InputError, OptionError, first_line
from bnrt.io.images import Preprocess, load_images
from bnrt.io.rows import Picked, chunks, stored
from bnrt.io.save import atomic_path

LABEL_KEYS = ("y", "labels", "label", "targets")
DEFAULT_SAMPLES = 8
DEFAULT_BATCH = 256

Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]  # a model run: inputs in, outputs out


@dataclass
class Dataset:
    inputs: list[np.ndarray]
    labels: np.ndarray | None
    source: str
    preprocess: dict | None = None  # how an image folder became inputs (``bnrt.io.images``)
    head: int | None = None  # a part of a larger data set: only its first ``head`` samples are the whole's first

    @property
    def first(self) -> int:
        """How many leading samples are the whole data's leading samples (all, unless a part)."""
        return self.size if self.head is None else self.head

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0])

    def shapes(self) -> list[tuple[int, ...]]:
        return [(1, *x.shape[1:]) for x in self.inputs]


def run_batched(runner: Runner | Sequence[Runner], data: Dataset, batch_size: int = DEFAULT_BATCH,
                progress: Callable[[int, int], None] | None = None) -> list:
    """Outputs of ``runner`` over all of ``data``, in batches, concatenated along axis 0;
    ``progress(done, total)`` hears each batch done. Several runners (a sequence) take each batch
    in turn, read once (an image folder decodes it once for all), and each one's outputs come back."""
    runners = [runner] if callable(runner) else list(runner)
    parts: list[list[list[np.ndarray]]] = [[] for _ in runners]
    for start in range(0, data.size, batch_size):
        batch = [x[start:start + batch_size] for x in data.inputs]
        for run, done in zip(runners, parts):
            done.append(run(batch))
        if progress is not None:
            progress(min(start + batch_size, data.size), data.size)
    outs = [[concatenated([p[i] for p in done]) for i in range(len(done[0]))] for done in parts]
    return outs[0] if callable(runner) else outs


def picked(data: Dataset, rows: Sequence[int], head: int | None = None) -> Dataset:
    """The samples ``rows`` of ``data``, in that order, read when used; ``head``: how many of them
    are ``data``'s first samples (``Dataset.head``)."""
    index = np.asarray(rows, dtype=np.int64)
    return Dataset([Picked(x, index) for x in data.inputs], None if data.labels is None else data.labels[index],
                   data.source, data.preprocess, head)


def concatenated(parts: list[np.ndarray]) -> np.ndarray:
    """Batches joined along axis 0; rows of per-sample records (axis 1: detections per image) padded
    to the longest batch's with NaN (float) or -1 (integers), as ``stacked_records`` pads within one."""
    if len(parts) > 1 and all(p.ndim >= 2 for p in parts) and len({p.shape[1] for p in parts}) > 1:
        rows = max(p.shape[1] for p in parts)
        fill = np.nan if np.issubdtype(parts[0].dtype, np.floating) else -1
        parts = [np.pad(p, [(0, 0), (0, rows - p.shape[1])] + [(0, 0)] * (p.ndim - 2), constant_values=fill)
                 for p in parts]
    return np.concatenate(parts)


DISTRIBUTIONS = ("normal", "uniform")


def random_inputs(shapes: list[tuple[int, ...]], count: int, seed: int = 0, distribution: str = "normal",
                  val_range: tuple[float, float] | None = None, dtypes: list[np.dtype] | None = None) -> Dataset:
    """``count`` reproducible samples per input (``seed``), float32 unless ``dtypes`` says otherwise.

    ``normal``: N(0, 1), or with ``val_range`` (lo, hi) N((lo + hi)/2, (hi − lo)/6) clipped to it.
    ``uniform``: U(lo, hi), default U(0, 1). Integer inputs take uniform integers in [lo, hi)
    (default [0, 10)).
    """
    if distribution not in DISTRIBUTIONS:
        raise OptionError(f"`dist` {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
    if val_range is not None and not val_range[0] < val_range[1]:
        raise OptionError(f"`val_range` {val_range[0]:g},{val_range[1]:g}: the low end must be below the high end")
    rng = np.random.default_rng(seed)
    inputs = []
    for i, shape in enumerate(shapes):
        size = (count, *shape[1:])
        dtype = np.dtype(dtypes[i] if dtypes and dtypes[i] is not None else np.float32)
        if dtype.kind in "iub":
            lo, hi = val_range or (0, 10)
            inputs.append(rng.integers(int(lo), int(hi), size=size).astype(dtype))
        elif distribution == "uniform":
            lo, hi = val_range or (0.0, 1.0)
            inputs.append(rng.uniform(lo, hi, size=size).astype(dtype))
        elif val_range is None:
            inputs.append(rng.standard_normal(size).astype(dtype))
        else:
            lo, hi = val_range
            inputs.append(np.clip(rng.normal((lo + hi) / 2, (hi - lo) / 6, size=size), lo, hi).astype(dtype))
    where = f"{distribution}{'' if val_range is None else f' in [{val_range[0]:g}, {val_range[1]:g}]'}"
    return Dataset(inputs, None, f"random {where}, seed {seed}")


def load_data(path: str | Path, input_names: list[str], allow_nonfinite: bool = False) -> Dataset:
    """Read ``path`` (.npz or .npy) as inputs for a model whose inputs are ``input_names``. NaN or
    Inf in a float input is refused (``OptionError``) unless ``allow_nonfinite``: NaN flowing
    through two models makes different models look alike."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r")  # a header read, no data
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz or .npy file ({first_line(exc)})") from exc
    if isinstance(loaded, np.ndarray):
        arrays, labels = {input_names[0]: stored(path) or np.array(loaded)}, None
        if len(input_names) != 1:
            raise InputError(f"{path}: one array, but the model has {len(input_names)} inputs ({', '.join(input_names)}); use an .npz")
    else:
        try:
            with loaded:
                content = {k: (stored(path, f"{k}.npy") if f"{k}.npy" in loaded.zip.namelist() else None)
                           or loaded[k] for k in loaded.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path}: unreadable array in archive ({exc})") from exc
        label_key = next((k for k in LABEL_KEYS if k in content), None)
        labels = np.asarray(content.pop(label_key)) if label_key else None
        if all(n in content for n in input_names):
            arrays = {n: content[n] for n in input_names}
        elif len(input_names) == 1 and len(content) == 1:
            arrays = {input_names[0]: next(iter(content.values()))}
        else:
            raise InputError(
                f"{path}: holds arrays {', '.join(sorted(content)) or '(none)'} but the model's inputs are "
                f"{', '.join(input_names)}"
            )
    inputs = []
    for name, array in arrays.items():
        if array.ndim < 1 or array.shape[0] == 0:
            raise InputError(f"{path}: array {name!r} has shape {array.shape}, expected (N, ...) with N > 0")
        if array.dtype.kind not in "iubf":
            raise InputError(f"{path}: array {name!r} has dtype {array.dtype}, expected numbers")
        if isinstance(array, np.ndarray):
            array = np.ascontiguousarray(array, dtype=np.float32 if array.dtype.kind == "f" else array.dtype)
        if array.dtype.kind == "f":
            _refuse_nonfinite(path, name, array, allow_nonfinite)
        inputs.append(array)
    sizes = {x.shape[0] for x in inputs}
    if len(sizes) != 1:
        raise InputError(f"{path}: inputs have different sample counts {sorted(sizes)}")
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != inputs[0].shape[0] or labels.dtype.kind not in "iu":
            raise InputError(
                f"{path}: labels must be integers of shape ({inputs[0].shape[0]},), got {labels.dtype} {labels.shape}"
            )
    return Dataset(inputs, labels, str(path))


def _refuse_nonfinite(path: Path, name: str, array: np.ndarray, allowed: bool) -> None:
    if allowed:
        return
    count, first = 0, None
    for start, rows in chunks(array, array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))):
        bad = ~np.isfinite(rows.reshape(len(rows), -1))
        count += int(bad.sum())
        if first is None and count:
            first = start + int(np.flatnonzero(bad.any(axis=1))[0])
    if count:
        raise OptionError(f"{path}: input {name!r} holds NaN or Inf ({count} values, first in sample {first}); "
                          "non-finite inputs are refused (a check compares them position by position with "
                          "`allow_nonfinite`)")


def fmt_shape(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


@dataclass(frozen=True)
class InputSpec:
    """How to make check inputs: a data file (NaN/Inf in it refused unless ``allow_nonfinite``), or
    seeded random samples of a distribution."""

    data: str | os.PathLike | None = None
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    distribution: str = "normal"
    val_range: tuple[float, float] | None = None
    allow_nonfinite: bool = False  # NaN/Inf in ``data`` (refused by default)
    preprocess: Preprocess = Preprocess()  # for an image folder
    workers: int = 0  # processes decoding an image folder's batches (0: this one)


def make_inputs(spec: InputSpec, names: list[str], shapes: list[tuple | None], dtypes: list[np.dtype] | None = None,
                where: str = "model", config: dict | None = None) -> Dataset:
    """The check data: ``spec.data`` (validated against ``shapes`` and the ``dtypes`` that are known,
    None: any; a folder of images is preprocessed to the one input's shape, ``config`` the model's
    own data config for ``--preprocess timm``) or random samples."""
    if spec.data is not None and Path(spec.data).is_dir():
        if len(names) != 1:
            raise OptionError(f"{spec.data}: an image folder feeds one input; the model has {len(names)}")
        images, labels, used = load_images(Path(spec.data), shapes[0], spec.preprocess, spec.workers, config)
        return Dataset([images], labels, str(spec.data), used.to_json())
    if spec.data is not None:
        data = load_data(spec.data, names, spec.allow_nonfinite)
        for name, given, got in zip(names, shapes, data.shapes()):
            if given is not None and (len(given) != len(got) or any(
                    d is not None and d != g for d, g in zip(given[1:], got[1:]))):
                raise InputError(f"{spec.data}: input {name!r} has per-sample shape {tuple(got[1:])}, "
                                 f"but the input shape is {fmt_shape(given)}")
        for name, wanted, array in zip(names, dtypes or [], data.inputs):
            if wanted is not None and array.dtype != wanted:
                raise InputError(f"{spec.data}: input {name!r} holds {array.dtype.name} values, the model expects "
                                 f"{np.dtype(wanted).name}")
        return data
    missing = [n for n, s in zip(names, shapes) if s is None or any(d is None for d in s[1:])]
    if missing:
        raise OptionError(f"{where}: no input shape for {', '.join(missing)}; pass `input_shape` (e.g. 1,3,224,224) "
                          "or `data`, or store 'input_shape' in the checkpoint")
    return random_inputs([tuple(s) for s in shapes], spec.samples, spec.seed, spec.distribution, spec.val_range,
                         dtypes)


def save_dataset(data: Dataset, names: list[str], path: Path) -> None:
    """The inputs (and labels under ``y``) as an .npz that ``load_data`` reads back."""
    arrays = dict(zip(names, data.inputs))
    if data.labels is not None:
        arrays["y"] = data.labels
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
