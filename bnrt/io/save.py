"""Writing outputs atomically: a temp file in the destination folder, then ``os.replace``.

A failed or interrupted write leaves no partial file behind and never touches an existing one;
outputs never replace a file the input reads (external data included) or an existing file that is
not a regular one (a device, a FIFO, a socket, a folder); folders a failed run created are removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from bnrt.errors import InputError, raise_if_stopped
from bnrt.io.source import files_read


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, else removed.
    ``InputError`` when ``path`` exists and is not a regular file (renaming would replace a device,
    a FIFO or a socket with a file)."""
    path = Path(path)
    refuse_special(path)
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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def refuse_special(path: Path) -> None:
    """``InputError`` when ``path`` exists (links followed) and is not a regular file: outputs are
    written by renaming a temp file over them, which would replace ``/dev/null`` or a FIFO."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror})") from exc
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise InputError(f"{path}: is {kind}; bnrt writes its outputs as regular files only")


def json_safe(data: Any) -> Any:
    """``data`` with NaN and ±Inf floats replaced by None: strict JSON has no such numbers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def refuse_overwrite(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike]) -> None:
    """The one overwrite policy of every command: ``InputError`` when an output path is a file
    being read (an input, or an ONNX input's external data; links resolved) or an existing file
    that is not a regular one (``refuse_special``). bnrt never writes over its input."""
    sources = [f for p in inputs if p is not None for f in files_read(p)]
    for out in outputs:
        if out is None:
            continue
        hit = next((src for src in sources if _same_file(Path(out), src)), None)
        if hit is not None:
            raise InputError(f"{out}: would overwrite the input {hit}; write the output elsewhere")
        refuse_special(Path(out))


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (non-finite numbers become null), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` (its folder created if needed), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


# an ONNX file larger than this keeps its tensors in ``NAME.data`` beside it: protobuf cannot
# serialize a message of 2 GiB or more (about 500M float32 parameters)
EXTERNAL_DATA_BYTES = 1 << 30


def data_file(name: str) -> str:
    """The name of the external data file ``save_onnx`` writes beside the ONNX file ``name``."""
    return f"{name}.data"


def tensor_bytes(proto) -> int:
    """The bytes of the main graph's tensors (initializers, sparse ones' values, Constant nodes'
    tensors) by their dims and element types, no tensor read or encoded: about the size of the
    model's data (strings and unknown types count 0)."""
    import onnx

    def size(tensor) -> int:
        if tensor.data_type == onnx.TensorProto.STRING:
            return 0
        try:
            return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):  # UNDEFINED and unknown types
            return 0

    graph = proto.graph
    tensors = [*graph.initializer, *(s.values for s in graph.sparse_initializer),
               *(a.t for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)]
    return sum(size(t) for t in tensors)


def save_onnx(proto, tmp: Path, name: str) -> Path | None:
    """Write ``proto`` to ``tmp`` (a temp file that becomes ``name`` in the same folder), after onnx's
    full check; returns the external data file when the model is over ``EXTERNAL_DATA_BYTES``:
    then its tensors go to ``data_file(name)`` beside it and are read back into ``proto`` (writing
    them out empties them), and the file is checked from disk. A smaller one is serialized once,
    for the checker and for the file."""
    import onnx

    # the tensors' own bytes decide most models without encoding them (ByteSize encodes the message)
    try:
        data = proto.SerializeToString() if tensor_bytes(proto) <= EXTERNAL_DATA_BYTES else None
    except ValueError:  # over protobuf's 2 GiB (tensors tensor_bytes does not count: subgraphs, functions)
        data = None
    if data is not None and len(data) <= EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(data, full_check=True)
        tmp.write_bytes(data)
        return None
    del data
    target = tmp.parent / data_file(name)
    refuse_special(target)
    target.unlink(missing_ok=True)  # onnx appends to an existing data file
    try:
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=target.name, size_threshold=1024)
        onnx.load_external_data_for_model(proto, str(tmp.parent))
        onnx.checker.check_model(str(tmp), full_check=True)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def write_torch(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def ensure_dir(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the folders it created, outermost first."""
    path = Path(path)
    created = [p for p in [path, *path.parents] if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create output folder ({exc.strerror})") from exc
    if not path.is_dir():
        raise InputError(f"{path}: is not a folder")
    if not os.access(path, os.W_OK):
        raise InputError(f"{path}: output folder is not writable")
    return created


@contextmanager
def output_folder(path: Path) -> Iterator[Path]:
    """``path`` created if needed; when the block fails (or is interrupted), the folders this made
    are removed again if still empty: a failed run leaves no trace."""
    created = ensure_dir(path)
    try:
        yield Path(path)
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden temp folder inside ``out_dir`` (created if needed, ``output_folder``): outputs are
    written there, then ``publish``ed. The temp folder goes in every case, interruptions included."""
    with output_folder(out_dir):
        try:
            stage = Path(tempfile.mkdtemp(prefix=".bnrt-", dir=out_dir))
        except OSError as exc:
            raise InputError(f"{out_dir}: cannot write here ({exc.strerror})") from exc
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, names: list[str], out_dir: Path) -> list[Path]:
    """Move ``names`` from ``stage`` into ``out_dir`` (each move atomic on the same filesystem);
    never after an interrupt, even one a library swallowed (``errors.raise_if_stopped``)."""
    raise_if_stopped()
    for name in names:
        refuse_special(out_dir / name)
    moved = []
    for name in names:
        os.replace(stage / name, out_dir / name)
        moved.append(out_dir / name)
    return moved
