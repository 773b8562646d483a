"""Image folders as check data: ``--data DIR`` in the ImageFolder layout (``DIR/<class>/*.png``;
labels are the index of the class folder in sorted order) or flat (``DIR/*.png``, no labels),
decoded with Pillow and preprocessed to the model's input.

Preprocessing (``Preprocess``): convert to the model's colours (1 channel: gray, 3: RGB, or
``color``), resize so that the shorter side is ``resize`` (default: just large enough to cover the
crop), center-crop to ``crop`` (default: the model's H×W), scale pixels to [0, 1], then subtract
``mean`` and divide by ``std`` per channel (default: none). ``PRESETS["imagenet"]`` is the usual
256 → 224 with ImageNet's mean and std.

The images are never decoded all at once: ``Images`` is an array-like (N, C, H, W) float32 whose
slices decode those files only (``workers`` processes decode a slice's files in parallel), so a
check reading the data batch by batch holds one batch of pixels whatever the folder's size.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from bnrt.errors import InputError, OptionError, first_line
from bnrt.io.rows import Rows

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
COLORS = ("rgb", "bgr", "gray")


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs (None: the default that fits the model's input shape)."""

    resize: int | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color: str | None = None
    interpolation: str | None = None  # of the resize: bilinear (default) or bicubic
    from_model: bool = False  # the rest from the model's own data config (timm's pretrained_cfg)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "from_model"}


PRESETS = {"imagenet": Preprocess(resize=256, crop=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  color="rgb"),
           "timm": Preprocess(from_model=True)}
INTERPOLATIONS = ("bilinear", "bicubic")


def from_config(preprocess: Preprocess, config: dict | None, where: str) -> Preprocess:
    """``preprocess`` (``--preprocess timm``) with what it leaves unset taken from a timm model's data
    config (``pretrained_cfg``: input_size, crop_pct, interpolation, mean, std), as timm's own eval
    transform does: resize the shorter side to floor(size / crop_pct), center-crop to size."""
    if not preprocess.from_model:
        return preprocess
    if not config or "input_size" not in config:
        raise OptionError(f"{where}: --preprocess timm needs a timm model (its pretrained_cfg); this model has none")
    _, h, w = config["input_size"]
    if h != w or config.get("crop_mode", "center") != "center":
        raise OptionError(f"{where}: --preprocess timm reads square center crops only (input_size {h}x{w}, crop_mode "
                          f"{config.get('crop_mode', 'center')}); pass --resize/--crop/--mean/--std")
    interpolation = config.get("interpolation", "bilinear")
    made = Preprocess(resize=int(h / config.get("crop_pct", 0.875)), crop=(h, w), mean=tuple(config["mean"]),
                      std=tuple(config["std"]), interpolation=interpolation if interpolation in INTERPOLATIONS
                      else "bilinear")
    given = {k: v for k, v in asdict(preprocess).items() if v is not None and k != "from_model"}
    return replace(made, **given)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def image_files(root: Path) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """The images under ``root``, their labels (None for a flat folder) and the class names."""
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = _images(root)
    if flat and classes:
        raise InputError(f"{root}: holds both images and class folders ({', '.join(classes[:3])}); use one layout")
    if flat:
        return flat, None, []
    files, labels = [], []
    for index, name in enumerate(classes):
        found = _images(root / name)
        files += found
        labels += [index] * len(found)
    if not files:
        raise InputError(f"{root}: no images ({', '.join(SUFFIXES)}) in it or in class folders under it")
    return files, np.asarray(labels, dtype=np.int64), classes


def resolve(preprocess: Preprocess, shape: tuple | None, where: str) -> Preprocess:
    """``preprocess`` with its defaults filled from the model's input ``shape`` (N, C, H, W)."""
    channels = shape[1] if shape is not None and len(shape) == 4 else None
    crop = preprocess.crop
    if crop is None and shape is not None and len(shape) == 4 and shape[2] is not None and shape[3] is not None:
        crop = (int(shape[2]), int(shape[3]))
    if crop is None or channels is None:
        raise OptionError(f"{where}: an image folder needs the model's input as (N, C, H, W) with C, H and W known "
                          f"(got {shape}); pass --input-shape or --crop H,W")
    if shape[2] is not None and shape[3] is not None and crop != (shape[2], shape[3]):
        raise OptionError(f"{where}: images cropped to {crop[0]}x{crop[1]}, but the model takes "
                          f"{shape[2]}x{shape[3]} (--crop, --preprocess)")
    color = preprocess.color or ("gray" if channels == 1 else "rgb" if channels == 3 else None)
    if color is None or (color == "gray") != (channels == 1):
        raise OptionError(f"{where}: the model takes {channels} channels; images are read as "
                          f"{color or 'rgb or gray'} (--color)")
    for key in ("mean", "std"):
        values = getattr(preprocess, key)
        if values is not None and len(values) not in (1, channels):
            raise OptionError(f"{where}: --{key} has {len(values)} values for {channels} channels")
    if preprocess.std is not None and any(v == 0 for v in preprocess.std):
        raise OptionError(f"{where}: --std must not be 0")
    return replace(preprocess, crop=crop, color=color, interpolation=preprocess.interpolation or "bilinear")


def pixels(path: Path, p: Preprocess) -> np.ndarray:
    """One image as uint8 (C, H, W): converted, resized and cropped by ``p`` (resolved)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if p.color == "gray" else "RGB")
            h, w = p.crop
            scale = p.resize / min(image.size) if p.resize else max(h / image.size[1], w / image.size[0])
            size = (max(w, round(image.size[0] * scale)), max(h, round(image.size[1] * scale)))
            if size != image.size:
                image = image.resize(size, Image.Resampling[p.interpolation.upper()])
            left, top = (size[0] - w) // 2, (size[1] - h) // 2
            array = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({first_line(exc)})") from exc
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return array[::-1] if p.color == "bgr" else array


def normalised(batch: np.ndarray, p: Preprocess) -> np.ndarray:
    """uint8 pixels (..., C, H, W) as float32 in [0, 1], minus ``mean``, over ``std``."""
    out = batch.astype(np.float32) / np.float32(255.0)
    if p.mean is not None:
        out -= np.asarray(p.mean, dtype=np.float32).reshape(-1, 1, 1)
    if p.std is not None:
        out /= np.asarray(p.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray(out)


def decode(path: Path, p: Preprocess) -> np.ndarray:
    """One image as a float32 (C, H, W) array, preprocessed by ``p`` (resolved)."""
    return normalised(pixels(path, p), p)


def _plain_signals() -> None:
    """A decoding worker dies on SIGTERM and leaves Ctrl-C to the main process (it would inherit the
    command line's handlers, which unwind instead: a pool terminated at exit then waited forever)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Images(Rows):
    """The images ``files`` as a read-only (N, C, H, W) float32 array decoded on access: an index, a
    slice or a list of indexes decodes those files (``workers`` > 0: in that many processes)."""

    def __init__(self, files: list[Path], preprocess: Preprocess, workers: int = 0):
        self.files, self.preprocess, self.workers = files, preprocess, workers
        channels = 1 if preprocess.color == "gray" else 3
        self.shape, self.dtype = (len(files), channels, *preprocess.crop), np.dtype(np.float32)
        self._work = partial(pixels, p=preprocess)
        self._pool, self._ahead = None, None

    def _take(self, key: slice) -> np.ndarray:
        chosen = self.files[key]
        if not chosen:
            return np.zeros((0, *self.shape[1:]), np.float32)
        decoded = self._decoded(key, chosen) if self.workers > 0 else [pixels(f, self.preprocess) for f in chosen]
        return normalised(np.stack(decoded), self.preprocess)

    def _decoded(self, key: slice, chosen: list[Path]) -> list[np.ndarray]:
        """``chosen`` decoded by the workers; a run of slices (``[a:b]``, then ``[b:c]``) has the next
        one of the same length decoded while the caller works on this one."""
        if self._pool is None:
            self._pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=_plain_signals)
        span = (key.start, key.stop)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == span:
            decoded = ahead[1].get()
        else:
            decoded = self._pool.map(self._work, chosen, chunksize=self._chunk(len(chosen)))
        if span[1] < len(self.files):
            following = (span[1], min(len(self.files), 2 * span[1] - span[0]))
            files = self.files[following[0]:following[1]]  # uint8 back: a quarter of float32's bytes
            self._ahead = following, self._pool.map_async(self._work, files, chunksize=self._chunk(len(files)))
        return decoded

    def _chunk(self, count: int) -> int:
        return max(1, count // (4 * self.workers))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool, self._ahead = None, None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:  # a pool does not travel to another process
        return {**self.__dict__, "_pool": None, "_ahead": None}


def listing_sha256(root: Path) -> str:
    """A digest of the images under ``root``: each one's path (relative) and size, in order."""
    files, _, _ = image_files(root)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(root).as_posix()}\t{f.stat().st_size}\n".encode())
    return digest.hexdigest()


def load_images(root: Path, shape: tuple | None, preprocess: Preprocess, workers: int = 0,
                config: dict | None = None) -> tuple[Images, np.ndarray | None, Preprocess]:
    """The images under ``root`` as an ``Images`` array (decoded when read), the labels (None for a
    flat folder) and the preprocessing used (its defaults filled). The first image is decoded now:
    a file Pillow cannot read stops the run before any model does."""
    resolved = resolve(from_config(preprocess, config, str(root)), shape, str(root))
    files, labels, _ = image_files(root)
    images = Images(files, resolved, workers)
    images[0]
    return images, labels, resolved
