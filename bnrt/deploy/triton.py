"""Deploy stage, for Triton: a model repository ``REPO/NAME/config.pbtxt`` + ``REPO/NAME/1/model.onnx``.

The config is a ``ModelConfig`` message of Triton's own schema (``model_config_pb2``, shipped by
``tritonclient[grpc]``) written with protobuf's text format, derived from the ONNX inputs and
outputs: names, ``TYPE_*`` data types, dims with -1 for dynamic axes; with ``max_batch_size`` > 0
the batch axis is left out of dims (Triton adds it) and dynamic batching is on.

A model whose weights live in external data files keeps them there: each file its tensors name
(``external_data`` ``location``, relative to the model's folder) is copied beside ``model.onnx`` at
the same relative path, byte for byte. Copying, not inlining the weights, is the one way that also
holds models over protobuf's 2 GB limit, and leaves ``model.onnx`` as it was. A location outside the
model's folder, or a file that is missing, is refused (one ``InputError`` naming it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bnrt.errors import InputError, OptionError
from bnrt.session import Session
from bnrt.io.save import output_folder
from bnrt.io.source import files_read

TRITON_TYPES = {
    np.dtype(np.float32): "TYPE_FP32", np.dtype(np.float64): "TYPE_FP64", np.dtype(np.float16): "TYPE_FP16",
    np.dtype(np.int64): "TYPE_INT64", np.dtype(np.int32): "TYPE_INT32", np.dtype(np.int16): "TYPE_INT16",
    np.dtype(np.int8): "TYPE_INT8", np.dtype(np.uint8): "TYPE_UINT8", np.dtype(np.uint16): "TYPE_UINT16",
    np.dtype(np.uint32): "TYPE_UINT32", np.dtype(np.uint64): "TYPE_UINT64", np.dtype(np.bool_): "TYPE_BOOL",
}


def model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2 as schema
    except ImportError as exc:
        raise InputError("bnrt triton needs Triton's model-config schema: pip install 'bnrt[triton]'") from exc
    return schema


def build_config(session: Session, name: str, max_batch: int = 8, gpu: bool = False, instances: int = 1):
    """The ``ModelConfig`` message for ``session``'s model. ``max_batch`` is used only when every
    input and output has a dynamic first axis; otherwise the model is not batched (0)."""
    schema = model_config_pb2()
    specs = session.inputs + session.outputs
    batched = max_batch > 0 and all(s.shape and s.shape[0] is None for s in specs)
    config = schema.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime",
                                max_batch_size=max_batch if batched else 0)

    def dims(spec):
        shape = spec.shape[1:] if batched else spec.shape
        return [-1 if d is None else d for d in shape]

    for spec, field in [(s, config.input) for s in session.inputs] + [(s, config.output) for s in session.outputs]:
        if spec.dtype not in TRITON_TYPES:
            raise InputError(f"{session.path}: tensor {spec.name!r} has dtype {spec.dtype}, which Triton's "
                             "ONNX backend does not take")
        entry = field.add()
        entry.name = spec.name
        entry.data_type = schema.DataType.Value(TRITON_TYPES[spec.dtype])
        entry.dims.extend(dims(spec))
    group = config.instance_group.add()
    group.count = instances
    group.kind = schema.ModelInstanceGroup.KIND_GPU if gpu else schema.ModelInstanceGroup.KIND_CPU
    if batched:
        config.dynamic_batching.SetInParent()
    return config


def write_repository(onnx_path: str | os.PathLike, repo: str | os.PathLike, *, name: str | None = None,
                     max_batch: int = 8, gpu: bool = False, instances: int = 1) -> Path:
    """Write ``repo/NAME`` (config.pbtxt, 1/model.onnx and the external data files the model's
    tensors name, at the same relative paths) for the ONNX file; returns the model folder. The
    folder is built beside its final place and renamed in, so it is never partial; an existing
    ``repo/NAME`` is an error, and a ``repo`` this call created goes again when it fails."""
    from google.protobuf import text_format

    src = Path(onnx_path)
    if instances <= 0 or max_batch < 0:
        raise OptionError("`instances` must be positive and `max_batch` not negative")
    data_files = _external_data(src)
    session = Session(src, "cpu")
    name = name or src.name.split(".")[0]
    if not name or "/" in name or name in (".", ".."):
        raise OptionError(f"`name` {name!r} is not a model name")
    repo = Path(repo)
    target = repo / name
    if target.exists():
        raise InputError(f"{target}: already exists; remove it or choose another --name")
    with output_folder(repo):
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
        except OSError as exc:
            raise InputError(f"{repo}: cannot write the repository ({exc.strerror})") from exc
        try:
            (stage / "1").mkdir()
            shutil.copyfile(src, stage / "1" / "model.onnx")
            for relative in data_files:  # beside model.onnx, where its tensors say they are
                (stage / "1" / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.parent / relative, stage / "1" / relative)
            config = build_config(session, name, max_batch, gpu, instances)
            (stage / "config.pbtxt").write_text(text_format.MessageToString(config))
            stage.chmod(0o755)
            os.replace(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return target


def _external_data(src: Path) -> list[Path]:
    """The external data files of the ONNX file ``src``, relative to its folder; ``InputError`` for
    one outside that folder (a repository holds the model's folder only) or missing."""
    found = []
    for path in files_read(src)[1:]:
        relative = path.relative_to(src.parent) if path.is_relative_to(src.parent) else path
        # kept as the model names it (``sub/../w.bin`` too), so that model.onnx finds it in the copy
        if relative.is_absolute() or os.path.normpath(relative).startswith(".."):
            raise InputError(f"{src}: external data {relative} lies outside the model's folder; a Triton "
                             "repository can hold only files beside the model")
        if not path.is_file():
            raise InputError(f"{src}: external data file {path} is missing")
        found.append(relative)
    return found
