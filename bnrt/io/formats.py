"""Readers of the model files that are not ``torch.save`` checkpoints, each with one-line errors
naming the file:

- safetensors weights (``read_safetensors``): parsed here, header and raw tensors, so no package
  is needed and nothing runs;
- TorchScript archives (``read_torchscript``): ``torch.jit.load``, which runs TorchScript, never
  pickled Python;
- ExportedPrograms, ``.pt2`` (``read_exported``): ``torch.export.load``. An archive can store
  weights and constants as pickles, which ``torch.export.load`` unpickles with code: such an
  archive is read only with ``trust_pickle`` (checked from its configs before loading).

A program's inputs: their names (``program_inputs``), example shapes and the axes it declares
dynamic, what the check and the ONNX export need.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnrt.errors import InputError, first_line

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (copied out of a read-only memory map)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size) if path.stat().st_size > 8 + size else b""
        state = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {entry.get('dtype')!r}, which bnrt does not read")
            start, end = entry["data_offsets"]
            array = np.frombuffer(data[start:end], dtype=dtype).reshape(entry["shape"]).copy()
            tensor = torch.from_numpy(array)
            state[name] = tensor.view(torch.bfloat16) if entry["dtype"] == "BF16" else tensor
        return state
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({first_line(exc)})") from exc


def read_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # torch.jit surfaces C++ errors of many kinds
        raise InputError(f"{path}: a TorchScript archive torch.jit.load cannot read "
                         f"({type(exc).__name__}: {first_line(exc)})") from exc


def pickled_entries(path: Path) -> list[str]:
    """The weights and constants an ExportedProgram archive stores as pickles (loading them runs
    code), from its payload configs; a legacy archive's weights file counts as one."""
    from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHT_FILENAME_PREFIX

    found = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            inner = name.split("/", 1)[-1]
            if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt"):
                found.append(inner)
            elif inner.startswith(("data/weights/", "data/constants/")) and inner.endswith("_config.json"):
                config = json.loads(archive.read(name)).get("config", {})
                found += [fqn for fqn, meta in config.items()
                          if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                              (TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHT_FILENAME_PREFIX))]
    return found


def read_exported(path: Path, trust_pickle: bool) -> Any:
    """The ``ExportedProgram`` in ``path``; its pickled entries only with ``trust_pickle``."""
    try:
        pickled = pickled_entries(path)
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{path}: a corrupt ExportedProgram archive ({first_line(exc)})") from exc
    if pickled and not trust_pickle:
        raise InputError(f"{path}: an ExportedProgram holding pickled objects ({', '.join(pickled[:3])}); loading "
                         "them runs code from the file, so bnrt reads it only with --trust-pickle (use it only for "
                         "files you trust)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as exc:  # the deserializer raises many kinds
        raise InputError(f"{path}: an ExportedProgram torch.export.load cannot read "
                         f"({type(exc).__name__}: {first_line(exc)})") from exc


def _dim(d: Any) -> int | None:
    return int(d) if isinstance(d, int) else None


def program_inputs(program: Any, where: str) -> tuple[list[str], list[tuple[int | None, ...]], list[tuple[int, ...]]]:
    """An ExportedProgram's user inputs: names, example shapes (dynamic dims from its saved example
    inputs, else None) and per input the axes it declares dynamic. Non-tensor inputs are refused."""
    from torch.export.graph_signature import InputKind, TensorArgument

    specs = [s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if not all(isinstance(s.arg, TensorArgument) for s in specs):
        raise InputError(f"{where}: the program takes non-tensor inputs; bnrt folds programs that take tensors")
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = [tuple(nodes[s.arg.name].meta["val"].shape) for s in specs]
    examples = list(program.example_inputs[0]) if program.example_inputs else []
    if len(examples) != len(shapes) or not all(isinstance(e, torch.Tensor) for e in examples):
        examples = [None] * len(shapes)
    known = [tuple(int(e.shape[i]) if e is not None else _dim(d) for i, d in enumerate(shape))
             for shape, e in zip(shapes, examples)]
    dynamic = [tuple(i for i, d in enumerate(shape) if not isinstance(d, int)) for shape in shapes]
    return [s.arg.name for s in specs], known, dynamic
