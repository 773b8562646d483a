"""What a model file is, decided once when it is opened, by its content: ``ModelSource`` (the path
and what bnrt may run to read it) and its ``kind``; ``Loaded`` (a torch model read from a source,
``bnrt.io.load``); the files reading a model opens (ONNX external data included) and its sha256.

Kinds: ``torch`` (``torch.save``'s zip archive or legacy pickle) and ``onnx`` (a ``ModelProto``).
Every stage asks ``source.kind``; nothing tests a suffix.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from bnrt.errors import InputError
from bnrt.folding.onnxscope import subgraphs

Shape = tuple[int, ...]
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"
# ModelProto's fields by tag byte: producer_name, producer_version, domain, model_version,
# doc_string, graph, opset_import, metadata_props, training_info, functions
_ONNX_SECOND_FIELDS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA}


def looks_like_onnx(head: bytes) -> bool:
    """A serialized ``ModelProto``: ir_version first (field 1, a small varint), then another of
    its fields. (Written by onnx and by every exporter in field order.)"""
    return len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in _ONNX_SECOND_FIELDS


def _head(path: Path, size: int = 16) -> bytes:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a model file")
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc


def file_kind(path: Path) -> str:
    """``"torch"`` or ``"onnx"``, by content: a zip archive or a pickle is a torch file, a
    ``ModelProto`` an ONNX model. A file that is neither is read as its suffix says (``.onnx``,
    else torch), whose reader then names what is wrong with it. ``InputError`` when the file is
    missing, a directory or unreadable."""
    head = _head(path)
    if head.startswith(_ZIP) or head.startswith(_PICKLE):
        return "torch"
    if looks_like_onnx(head):
        return "onnx"
    return "onnx" if path.suffix.lower() == ".onnx" else "torch"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and what bnrt may run to read it: ``arch`` overrides the
    checkpoint's architecture ("module:Name", or a class or factory), ``trust_pickle`` allows
    unpickling a full ``nn.Module`` (runs code from the file), ``trust_code`` allows importing the
    checkpoint's ``arch`` from a file in the current directory or the checkpoint's folder,
    ``input_shapes`` (with batch) override the checkpoint's ``input_shape``. ``kind`` is read from
    the file on first use (``file_kind``)."""

    path: Path
    arch: str | Callable[..., nn.Module] | None = None
    trust_pickle: bool = False
    input_shapes: list[Shape] | None = None
    trust_code: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, source: "ModelSource | str | os.PathLike") -> "ModelSource":
        """``source`` itself, or a source for the path with the defaults."""
        return source if isinstance(source, ModelSource) else cls(Path(source))

    @cached_property
    def kind(self) -> str:
        return file_kind(self.path)


@dataclass
class Loaded:
    """A torch model read from ``path`` with what the file said about it."""

    model: nn.Module
    path: Path
    sha256: str
    input_shapes: list[Shape] | None
    arch: str | None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    source_format: str = "state_dict"
    structure: dict[str, Any] | None = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_read(path: str | os.PathLike) -> list[Path]:
    """Every file reading ``path`` opens: the file, and for an ONNX model each external data file
    its tensors name (resolved against the model's folder)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            onnx_like = looks_like_onnx(f.read(16))
    except OSError:
        return [path]
    if not onnx_like:
        return [path]
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # not ONNX after all: the reader reports it
        return [path]
    locations = {entry.value for tensor in _tensors(model.graph) if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return [path, *(path.parent / loc for loc in sorted(locations))]


def _tensors(graph) -> Iterator:
    """Initializers and constant tensors of ``graph`` and of its subgraphs."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
        for _, body in subgraphs(node):
            yield from _tensors(body)
