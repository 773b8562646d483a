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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TritonOptions:
    """What ``bnrt triton`` writes into the config beyond the model's tensors: ``max_batch`` (used
    only when every tensor's first axis is dynamic), ``instances`` of ``gpu`` or CPU kind, ORT's
    intra/inter-op ``threads`` (0: ORT's default), the dynamic batcher's ``preferred_batch_sizes``
    and ``max_queue_delay_us``, and on GPU the CUDA provider's ``tf32`` (None: ORT's default, on)
    and the ``tensorrt`` accelerator (``fp16``: its precision_mode FP16)."""

    max_batch: int = 8
    gpu: bool = False
    instances: int = 1
    threads: int = 0
    inter_threads: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    tf32: bool | None = None
    tensorrt: bool = False
    fp16: bool = False

    def check(self) -> None:
        if self.instances <= 0 or self.max_batch < 0 or self.threads < 0 or self.inter_threads < 0 \
                or self.max_queue_delay_us < 0:
            raise OptionError("`instances` must be positive; `max_batch`, `threads`, `inter_threads` and "
                              "`max_queue_delay_us` not negative")
        if not self.gpu and (self.tf32 is not None or self.tensorrt or self.fp16):
            raise OptionError("`tf32`, `tensorrt` and `fp16` set GPU execution: give `gpu` too")
        if self.fp16 and not self.tensorrt:
            raise OptionError("`fp16` is TensorRT's precision mode: give `tensorrt` too")
        bad = [b for b in self.preferred_batch_sizes if not 0 < b <= self.max_batch]
        if bad:
            raise OptionError(f"`preferred_batch_sizes` {bad[0]}: must be in [1, max_batch {self.max_batch}]")


def _accelerators(config, options: TritonOptions) -> None:
    """The CUDA provider's TF32 and the TensorRT accelerator, as Triton's ONNX Runtime backend reads them."""
    if options.tensorrt:
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16" if options.fp16 else "FP32"
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
    if options.tf32 is not None:
        cuda = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="cuda")
        cuda.parameters["use_tf32"] = "1" if options.tf32 else "0"


def build_config(session: Session, name: str, options: TritonOptions = TritonOptions()):
    """The ``ModelConfig`` message for ``session``'s model (see ``TritonOptions``); a model whose
    tensors do not all have a dynamic first axis is not batched (``max_batch_size`` 0)."""
    schema = model_config_pb2()
    max_batch, gpu, instances = options.max_batch, options.gpu, options.instances
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
        config.dynamic_batching.preferred_batch_size.extend(options.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    for key, value in (("intra_op_thread_count", options.threads), ("inter_op_thread_count", options.inter_threads)):
        if value:
            config.parameters[key].string_value = str(value)
    _accelerators(config, options)
    return config


def config_json(config) -> dict:
    """A ``ModelConfig`` as Triton answers ``GET …/config``: field names as in the schema, 64-bit
    integers as JSON numbers (protobuf's JSON mapping writes them as strings: dims, delays)."""
    from google.protobuf.json_format import MessageToDict

    return _json_numbers(config, MessageToDict(config, preserving_proto_field_name=True))


def _json_numbers(message, data: dict) -> dict:
    """``data`` (``MessageToDict`` of ``message``) with its 64-bit integers as numbers."""
    from google.protobuf.descriptor import FieldDescriptor as F

    wide = (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64)
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value, repeated = getattr(message, field.name), field.label == F.LABEL_REPEATED
        if field.type in wide:
            data[field.name] = [int(v) for v in data[field.name]] if repeated else int(data[field.name])
        elif field.type == F.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            items = zip(value, data[field.name]) if repeated else [(value, data[field.name])]
            for sub, sub_data in items:
                _json_numbers(sub, sub_data)
    return data


def _warmup(config, session: Session, data: str | os.PathLike, folder: Path) -> None:
    """A ``model_warmup`` entry running the first sample of ``data`` (an .npz/.npy named like the
    inputs), each input's bytes in ``folder/warmup/<input>`` as Triton reads them."""
    from bnrt.io.data import load_data

    dataset = load_data(data, session.input_names)
    warmup = config.model_warmup.add(name=f"first sample of {Path(data).name}", batch_size=1)
    (folder / "warmup").mkdir()
    for spec, array, entry in zip(session.inputs, dataset.inputs, config.input):
        sample = np.ascontiguousarray(np.asarray(array[:1]), dtype=spec.dtype)
        (folder / "warmup" / spec.name).write_bytes(sample.tobytes())
        given = warmup.inputs[spec.name]
        given.data_type = entry.data_type
        given.dims.extend(sample.shape[1:] if config.max_batch_size else sample.shape)
        given.input_data_file = spec.name


def write_repository(onnx_path: str | os.PathLike, repo: str | os.PathLike, *, name: str | None = None,
                     options: TritonOptions = TritonOptions(), warmup: str | os.PathLike | None = None) -> Path:
    """Write ``repo/NAME`` (config.pbtxt, 1/model.onnx and the external data files the model's
    tensors name, at the same relative paths; with ``warmup`` data, a warm-up request of its first
    sample) for the ONNX file; returns the model folder. The folder is built beside its final place
    and renamed in, so it is never partial; an existing ``repo/NAME`` is an error, and a ``repo``
    this call created goes again when it fails."""
    from google.protobuf import text_format

    src = Path(onnx_path)
    options.check()
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
            config = build_config(session, name, options)
            if warmup is not None:
                _warmup(config, session, warmup, stage)
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
