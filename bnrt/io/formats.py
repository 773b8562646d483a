"""Readers of the model files that are not ``torch.save`` checkpoints, each with one-line errors
naming the file:

- safetensors weights (``read_safetensors``): parsed here, header and raw tensors, so no package
  is needed and nothing runs;
- TorchScript archives (``read_torchscript``): ``torch.jit.load``, which runs TorchScript, never
  pickled Python;
- ExportedPrograms, ``.pt2`` (``read_exported``): ``torch.export.load``. An archive can store
  weights and constants as pickles, which ``torch.export.load`` unpickles with code: such an
  archive is read only with ``trust_pickle`` (checked from its configs before loading).

An ExportedProgram's example input shapes (``program_shapes``), what the check and the ONNX export
need (the program's dynamic dims travel with it into the export).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnrt.errors import InputError, first_line

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _safetensors_entry(name: str, entry: Any, size: int) -> tuple[Any, list[int], int, int]:
    """(numpy dtype, shape, start, end) of one header entry, validated against the data's size."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {name!r}: its header entry is not an object")
    dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ValueError(f"tensor {name!r} has dtype {entry.get('dtype')!r}, which bnrt does not read")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {name!r}: shape and data_offsets must be non-negative integers")
    start, end = offsets
    if not 0 <= start <= end <= size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise ValueError(f"tensor {name!r}: data_offsets {offsets} do not hold shape {shape} in {size} data bytes")
    return dtype, shape, start, end


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (copied out of a read-only memory map), every header
    entry checked against the data it claims."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data_size = path.stat().st_size - 8 - size
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size) if data_size > 0 else np.zeros(0, np.uint8)
        state = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, start, end = _safetensors_entry(name, entry, data_size)
            tensor = torch.from_numpy(np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy())
            state[name] = tensor.view(torch.bfloat16) if entry["dtype"] == "BF16" else tensor
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({first_line(exc)})") from exc
    if not state:
        raise InputError(f"{path}: a safetensors file that holds no tensors")
    return state


def read_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # torch.jit surfaces C++ errors of many kinds
        raise InputError(f"{path}: a TorchScript archive torch.jit.load cannot read "
                         f"({type(exc).__name__}: {first_line(exc)})") from exc


_PT2_BOOKKEEPING = {"archive_format", "archive_version", "byteorder", "version", ".data/version",
                    ".data/serialization_id"}


def _pt2_entry_is_data(inner: str, raw: set[str]) -> bool:
    """An ExportedProgram entry torch.export.load reads without running code: bookkeeping, the
    JSON graph and payload configs, and raw weights and tensor constants (``raw``: the payload
    file names the configs list as not pickled)."""
    from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHT_FILENAME_PREFIX

    folder, _, name = inner.rpartition("/")
    if inner in _PT2_BOOKKEEPING or (folder == "models" and name.endswith(".json")):
        return True
    if folder in ("data/weights", "data/constants"):
        if name.endswith("_config.json"):
            return True
        return name.startswith((WEIGHT_FILENAME_PREFIX, TENSOR_CONSTANT_FILENAME_PREFIX)) and name in raw
    return False


def _safe_sample_inputs(archive: zipfile.ZipFile, name: str) -> bool:
    """torch.export.load retries a sample-inputs file that ``weights_only`` refuses with a full
    unpickling: such a file counts as pickled."""
    try:
        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
        return True
    except Exception:
        return False


def pickled_entries(path: Path) -> list[str]:
    """The entries of an ExportedProgram archive that loading it would run code for: pickled
    weights and constants (per its payload configs), custom objects, sample inputs that only a
    full unpickling reads, compiled libraries, legacy-format files — anything but the archive's
    graph, configs and raw tensors (an allow-list: an entry bnrt does not know counts)."""
    found = []
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            return [n for n in names if "/" not in n] or names[:1]  # torch falls back to its legacy reader
        configs = {n: json.loads(archive.read(n)).get("config", {}) for n in names
                   if n.split("/", 1)[1].startswith(("data/weights/", "data/constants/")) and n.endswith("_config.json")}
        raw = {meta.get("path_name") for config in configs.values() for meta in config.values()
               if not meta.get("use_pickle")}
        for name in names:
            inner = name.split("/", 1)[1]
            if inner.startswith("data/sample_inputs/") and inner.endswith(".pt"):
                if not _safe_sample_inputs(archive, name):
                    found.append(inner)
            elif not _pt2_entry_is_data(inner, raw):
                found.append(inner)
        found += [fqn for config in configs.values() for fqn, meta in config.items() if meta.get("use_pickle")]
    return found


def read_exported(path: Path, trust_pickle: bool) -> Any:
    """The ``ExportedProgram`` in ``path``; its pickled entries only with ``trust_pickle``."""
    try:
        pickled = pickled_entries(path)
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError, TypeError, NotImplementedError,
            zlib.error) as exc:
        raise InputError(f"{path}: a corrupt ExportedProgram archive ({first_line(exc)})") from exc
    if pickled and not trust_pickle:
        raise InputError(f"{path}: an ExportedProgram holding pickled objects or code ({', '.join(pickled[:3])}); loading "
                         "them runs code from the file, so bnrt reads it only with --trust-pickle (use it only for "
                         "files you trust)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # torch logs a traceback before trying its legacy reader
            return torch.export.load(str(path))
    except Exception as exc:  # the deserializer raises many kinds
        raise InputError(f"{path}: an ExportedProgram torch.export.load cannot read "
                         f"({type(exc).__name__}: {first_line(exc)})") from exc
    finally:
        logging.disable(logging.NOTSET)


def program_shapes(program: Any, where: str) -> list[tuple[int | None, ...]]:
    """An ExportedProgram's user inputs' example shapes: its saved example inputs' where it has them,
    else the static dims (None for a dynamic one). Non-tensor inputs are refused."""
    from torch.export.graph_signature import InputKind, TensorArgument

    specs = [s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if not all(isinstance(s.arg, TensorArgument) for s in specs):
        raise InputError(f"{where}: the program takes non-tensor inputs; bnrt folds programs that take tensors")
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = [tuple(nodes[s.arg.name].meta["val"].shape) for s in specs]
    examples = list(program.example_inputs[0]) if program.example_inputs else []
    if len(examples) != len(shapes) or not all(isinstance(e, torch.Tensor) for e in examples):
        examples = [None] * len(shapes)
    return [tuple(int(e.shape[i]) if e is not None else int(d) if isinstance(d, int) else None
                  for i, d in enumerate(shape)) for shape, e in zip(shapes, examples)]
