"""What a model file is, decided once when it is opened, by its content: ``ModelSource`` (the path
and what bnrt may run to read it) and its ``kind``; ``Loaded`` (a torch model read from a source,
``bnrt.io.load``); the files reading a model opens (ONNX external data included) and its sha256.

Kinds (``KINDS``): ``torch`` (``torch.save``'s zip archive or legacy pickle), ``safetensors`` (weights
only: the architecture comes from ``arch``), ``torchscript`` (a ``torch.jit`` archive),
``exported`` (a ``torch.export`` ExportedProgram, ``.pt2``) and ``onnx`` (a ``ModelProto``).
TorchScript archives and ExportedPrograms are ``PROGRAMS``: a graph to run, no modules to fold in.
Every stage asks ``source.kind``; nothing tests a suffix. Files that are models of another
framework (a TensorFlow SavedModel, a Keras or HDF5 file, a Hugging Face folder) are refused here,
each with what to pass instead.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from bnrt.errors import InputError
from bnrt.folding.onnxscope import subgraphs

Shape = tuple[int, ...]
_ZIP, _PICKLE, _HDF5 = b"PK\x03\x04", b"\x80", b"\x89HDF\r\n\x1a\n"
KINDS = ("torch", "safetensors", "torchscript", "exported", "onnx")
PROGRAMS = ("torchscript", "exported")
KIND_NAMES = {"torch": "a torch checkpoint", "safetensors": "a safetensors weights file",
              "torchscript": "a TorchScript archive", "exported": "an ExportedProgram (torch.export)",
              "onnx": "an ONNX model"}
_TO_ONNX = "convert it to ONNX first (tf2onnx) and fold the .onnx file"
# ModelProto's fields by tag byte: producer_name, producer_version, domain, model_version,
# doc_string, graph, opset_import, metadata_props, training_info, functions
_ONNX_SECOND_FIELDS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA}


def looks_like_onnx(head: bytes) -> bool:
    """A serialized ``ModelProto``: ir_version first (field 1, a small varint), then another of
    its fields. (Written by onnx and by every exporter in field order.)"""
    return len(head) >= 3 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in _ONNX_SECOND_FIELDS


def _folder(path: Path) -> InputError:
    """What a folder given as the model is, and what to pass instead."""
    names = {p.name for p in path.iterdir()} if os.access(path, os.R_OK | os.X_OK) else set()
    if names & {"saved_model.pb", "saved_model.pbtxt"}:
        return InputError(f"{path}: a TensorFlow SavedModel folder, not a PyTorch or ONNX model; {_TO_ONNX}")
    weights = sorted(n for n in names if n.endswith((".safetensors", ".bin")) or n == "model.pt")
    if "config.json" in names and weights:
        what = (f"its weights file ({path / weights[0]})" if len(weights) == 1 else
                f"its weights, sharded over {len(weights)} files, merged into one safetensors file")
        return InputError(f"{path}: a Hugging Face model folder; pass {what} with --arch MODULE:NAME (the class that "
                          "builds the model), or export it to ONNX (optimum-cli export onnx) and fold the .onnx file")
    return InputError(f"{path}: is a directory, expected a model file")


def _head(path: Path, size: int = 16) -> bytes:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise _folder(path)
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc


def _zip_kind(path: Path) -> str:
    """A zip archive's kind by its entries: TorchScript has ``code/``, an ExportedProgram an
    ``archive_format`` entry, a Keras model ``config.json`` and ``model.weights.h5``; else a torch
    checkpoint (whose reader names a corrupt one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "torch"
    inner = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if any(n.startswith("code/__torch__/") or n == "constants.pkl" for n in inner):
        return "torchscript"
    if "archive_format" in inner or any(n.startswith("models/") and n.endswith(".json") for n in inner):
        return "exported"
    if {"config.json", "model.weights.h5"} <= set(names):
        raise InputError(f"{path}: a Keras model, not a PyTorch or ONNX model; {_TO_ONNX}")
    return "torch"


def _safetensors(head: bytes, path: Path) -> bool:
    """safetensors: a little-endian u64 header length, then the JSON header."""
    size = int.from_bytes(head[:8], "little")
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= size <= path.stat().st_size - 8


def file_kind(path: Path) -> str:
    """One of ``KINDS``, by content: a zip archive is a torch checkpoint, a TorchScript archive or
    an ExportedProgram by its entries; a pickle is a torch checkpoint; a safetensors header a
    weights file; a ``ModelProto`` an ONNX model. A file that is none of these is read as its suffix
    says (``.onnx``, else torch), whose reader then names what is wrong with it. ``InputError`` when
    the file is missing, unreadable, a folder or another framework's model (saying what to pass
    instead)."""
    head = _head(path)
    if head.startswith(_ZIP):
        return _zip_kind(path)
    if _safetensors(head, path):  # before the pickle test: a header length's first byte may be 0x80
        return "safetensors"
    if head.startswith(_PICKLE):
        return "torch"
    if head.startswith(_HDF5):
        raise InputError(f"{path}: an HDF5 file (Keras or TensorFlow weights), not a PyTorch or ONNX model; {_TO_ONNX}")
    if path.name in ("saved_model.pb", "saved_model.pbtxt"):
        raise InputError(f"{path}: a TensorFlow SavedModel, not a PyTorch or ONNX model; {_TO_ONNX}")
    if looks_like_onnx(head):
        return "onnx"
    return "onnx" if path.suffix.lower() == ".onnx" else "torch"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and what bnrt may run to read it: ``arch`` overrides the
    checkpoint's architecture ("module:Name", or a class or factory), ``trust_pickle`` allows
    unpickling a full ``nn.Module`` (runs code from the file), ``trust_code`` allows importing the
    checkpoint's ``arch`` from a file in the current directory or the checkpoint's folder,
    ``input_shapes`` (with batch) override the checkpoint's ``input_shape``; ``state_dict_key``
    names the checkpoint entry holding the state_dict, ``strip_prefix`` the key prefix to remove
    (``bnrt.io.statedict``; guessed when not given). ``kind`` is read from the file on first use
    (``file_kind``)."""

    path: Path
    arch: str | Callable[..., nn.Module] | None = None
    trust_pickle: bool = False
    input_shapes: list[Shape] | None = None
    trust_code: bool = False
    state_dict_key: str | None = None
    strip_prefix: str | None = None

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
    """A torch model read from ``path`` with what the file said about it: ``precision``, the
    floating dtype its weights were stored in (the model is float32 whatever it was: fold arithmetic
    is float64), ``notes`` (one line each: a stripped key prefix, a precision changed), ``program``
    (a TorchScript archive's module or an ExportedProgram, for ``PROGRAMS``; ``model`` runs it) and
    ``dynamic`` (per input, the axes a program declares dynamic)."""

    model: nn.Module
    path: Path
    sha256: str
    input_shapes: list[Shape] | None
    arch: str | None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    source_format: str = "state_dict"
    structure: dict[str, Any] | None = None
    precision: str = "float32"
    notes: list[str] = field(default_factory=list)
    program: Any = None


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
