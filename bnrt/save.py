"""Writing outputs atomically: a temp file in the destination folder, then ``os.replace``.

A failed or interrupted write leaves no partial file behind and never touches an existing one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, else removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"{path.parent}: cannot write here ({exc.strerror})") from exc
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(data: Any) -> Any:
    """``data`` with NaN and ±Inf floats replaced by None: strict JSON has no such numbers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def refuse_overwrite(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike]) -> None:
    """The one overwrite policy of every command: ``InputError`` when an output path is one of the
    files being read. bnrt never writes over its input."""
    sources = [Path(p) for p in inputs]
    for out in outputs:
        if out is None:
            continue
        hit = next((src for src in sources if Path(out).resolve() == src.resolve()), None)
        if hit is not None:
            raise InputError(f"{out}: would overwrite the input {hit}; write the output elsewhere")


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (non-finite numbers become null), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` (its folder created if needed), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def write_torch(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create output folder ({exc.strerror})") from exc
    if not os.access(path, os.W_OK):
        raise InputError(f"{path}: output folder is not writable")
    return path


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden temp folder inside ``out_dir``: outputs are written there, then ``publish``ed."""
    try:
        stage = Path(tempfile.mkdtemp(prefix=".bnrt-", dir=out_dir))
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot write here ({exc.strerror})") from exc
    try:
        yield stage
    finally:
        for leftover in stage.iterdir():
            leftover.unlink()
        stage.rmdir()


def publish(stage: Path, names: list[str], out_dir: Path) -> list[Path]:
    """Move ``names`` from ``stage`` into ``out_dir`` (each move atomic on the same filesystem)."""
    moved = []
    for name in names:
        os.replace(stage / name, out_dir / name)
        moved.append(out_dir / name)
    return moved
