"""The KServe v2 / Open Inference Protocol on the wire, for ``bnrt serve``: the models of a file or
a model repository, a served model's metadata, request parsing (JSON tensors and Triton's binary
tensor extension) and response building. Pure functions of bytes and arrays; the server
(``bnrt.deploy.serve``) owns sockets, batching and sessions' lifetimes.

Every field of a request is type-checked and every size bounded before anything is allocated for
it: a request the server cannot serve is a ``RequestError`` (4xx), never an exception of numpy or
the JSON decoder (5xx).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnrt.errors import InputError
from bnrt.session import Session

KSERVE_TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
DATATYPE_OF = {np.dtype(v): k for k, v in KSERVE_TYPES.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"
# the protocol's extensions bnrt serve speaks, by Triton's names
EXTENSIONS = ("binary_tensor_data", "model_repository", "model_configuration", "statistics")
MAX_DIM = 2**31 - 1  # larger axes are no request a server can hold; numpy refuses some beyond it
MAX_RANK = 32  # numpy's limit on dimensions (64 in numpy 2, 32 before); models have far fewer
# a request is 3 levels deep (object, inputs, input) plus one level per dimension of nested data;
# the JSON decoder recurses once per level and fails at the interpreter's limit (1,000)
MAX_DEPTH = 3 + MAX_RANK
# "data" arrays of plain numbers at least this long are parsed by numpy from the text: as a Python
# list each value costs 32 bytes (a float object and its pointer) against numpy's 4 or 8
FAST_MIN = 1 << 16

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"?', re.S)  # unterminated: to the end, so the scan stays linear
_BRACKETS = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))  # int8 +1 / -1
_NUMBERS = re.compile(rb'"data"\s*:\s*\[([-+0-9.eE, ]{%d,}+)\]' % FAST_MIN)
_PLACEHOLDER = "bnrt:numbers:%d"


class RequestError(Exception):
    """A request the server refuses: ``status`` and a message for ``{"error": …}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServedModel:
    """A served model version: its ``sessions`` (one per instance, of the same file; the batcher
    runs one batch on each at a time) and whether its batch axis is dynamic."""

    name: str
    version: str
    sessions: tuple[Session, ...]
    batching: bool = field(init=False)

    @property
    def session(self) -> Session:
        return self.sessions[0]

    def __post_init__(self) -> None:
        specs = self.session.inputs + self.session.outputs
        self.batching = all(s.shape and s.shape[0] is None for s in specs)

    def metadata(self) -> dict:
        def tensor(spec):
            return {"name": spec.name, "datatype": DATATYPE_OF.get(spec.dtype, "FP32"),
                    "shape": [-1 if d is None else d for d in spec.shape]}
        return {"name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
                "inputs": [tensor(s) for s in self.session.inputs],
                "outputs": [tensor(s) for s in self.session.outputs]}


def serving_session(provider: str = "cpu", threads: int = 0, tf32: bool | None = None, instances: int = 1):
    """The session factory of served models: a file's ``instances`` sessions, each with ``threads``
    intra-op threads (0: ORT's default, every core); ``tf32`` CUDA only, None keeps ORT's default (on)."""
    def sessions(file: Path) -> tuple[Session, ...]:
        return tuple(Session(file, provider, threads, spinning=False, tf32=tf32) for _ in range(instances))
    return sessions


def discover(path: str | os.PathLike, session=None) -> dict[str, dict[str, ServedModel]]:
    """Models to serve: one ONNX file (named by its stem, version 1) or a Triton-style repository
    ``REPO/NAME/VERSION/model.onnx``. Returns name -> version -> ServedModel; ``session`` makes each
    one's sessions (default ``serving_session()``)."""
    path, session = Path(path), session or serving_session()

    if path.is_file():
        return {path.stem: {"1": ServedModel(path.stem, "1", session(path))}}
    if not path.is_dir():
        raise InputError(f"{path}: no such ONNX file or model repository")
    models: dict[str, dict[str, ServedModel]] = {}
    for onnx_file in sorted(path.glob("*/*/model.onnx")):
        version, name = onnx_file.parent.name, onnx_file.parent.parent.name
        if version.isdigit():
            models.setdefault(name, {})[version] = ServedModel(name, version, session(onnx_file))
    if not models:
        raise InputError(f"{path}: no models found (expected REPO/NAME/VERSION/model.onnx)")
    return models


def _check_nesting(text: bytes) -> None:
    """``RequestError`` when arrays and objects in ``text`` nest deeper than ``MAX_DEPTH`` (brackets
    inside strings do not count): checked before the decoder recurses into them."""
    if text.count(b"[") + text.count(b"{") <= MAX_DEPTH:  # the usual request: no scan needed
        return
    deltas = np.frombuffer(_STRING.sub(b"", text).translate(_BRACKETS), np.int8)
    depth = 0
    for start in range(0, len(deltas), 1 << 20):  # in slices: a running sum of it all would take 4 bytes a byte
        running = np.cumsum(deltas[start:start + (1 << 20)], dtype=np.int32) + depth
        if running.max() > MAX_DEPTH:
            raise RequestError(400, f"JSON nested more than {MAX_DEPTH} levels deep")
        depth = int(running[-1])


def _load_json(head: bytes) -> tuple[object, dict[str, bytes]]:
    """The decoded header, its long "data" arrays of plain numbers replaced by placeholder strings,
    and the arrays' text by placeholder (see ``FAST_MIN``)."""
    pieces, spans, end = [], {}, 0
    for m in _NUMBERS.finditer(head):
        # a key only after "{" or ",": a match starting inside a string starts after its backslash
        before = head[max(0, m.start() - 64):m.start()].rstrip()
        if not before.endswith((b"{", b",")):
            continue
        key = _PLACEHOLDER % len(spans)
        spans[key] = m.group(1)
        pieces += [head[end:m.start(1) - 1], json.dumps(key).encode()]
        end = m.end()
    text = b"".join(pieces) + head[end:] if spans else head
    _check_nesting(text)
    try:
        return json.loads(text), spans
    except ValueError as exc:  # also an integer of more digits than Python converts (4,300), not only syntax
        raise RequestError(400, f"malformed JSON: {exc}") from None


def _numbers(text: bytes, dtype: np.dtype) -> np.ndarray | None:
    """The values of a "data" array's text parsed by numpy; None where only the JSON decoder can
    tell (integers, whose range numpy would not check, and spacing other than ", ")."""
    compact = text.replace(b", ", b",")
    if dtype.kind != "f" or any(c in compact for c in (b" ", b"\t", b"\n", b"\r")):
        return None
    if compact.startswith(b",") or compact.endswith(b","):  # numpy would skip a trailing one
        raise ValueError("empty value")
    return np.fromstring(compact, dtype=dtype, sep=",")  # text mode, exact: not deprecated


def _json_array(data, dtype: np.dtype) -> np.ndarray:
    """``data`` (nested lists of JSON numbers, or booleans for BOOL) as an array of ``dtype``;
    ``ValueError`` for any other element type, or integers beyond the datatype's range."""
    array = np.asarray(data)  # numpy's own type: strings, objects and ragged lists show there
    allowed = "b" if dtype.kind == "b" else "iu" if dtype.kind in "iu" else "iuf"
    if array.size == 0:
        return array.astype(dtype)
    if array.dtype.kind not in allowed:
        raise ValueError(array.dtype)
    if dtype.kind in "iu" and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise ValueError("out of range")
    return array.astype(dtype)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(request, model: ServedModel) -> None:
    """``RequestError`` for a request whose fields have the wrong JSON types (id, parameters,
    inputs, outputs) or that asks for an output the model does not have."""
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise RequestError(400, "the request must be a JSON object with an 'inputs' list")
    if not isinstance(request.get("id", ""), str):
        raise RequestError(400, "'id' must be a string")
    for where, params in [("the request's", request.get("parameters"))] + [
            (f"input {i.get('name')!r}:", i.get("parameters")) for i in request["inputs"] if isinstance(i, dict)]:
        if params is not None and not isinstance(params, dict):
            raise RequestError(400, f"{where} 'parameters' must be a JSON object")
    if not isinstance((request.get("parameters") or {}).get("binary_data_output", False), bool):
        raise RequestError(400, "'binary_data_output' must be true or false")
    wanted = request.get("outputs")
    if wanted is None:
        return
    if not isinstance(wanted, list):
        raise RequestError(400, "'outputs' must be a list")
    for item in wanted:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in model.session.output_names:
            raise RequestError(400, f"unknown output {name!r}; the model's outputs are "
                                    f"{', '.join(model.session.output_names)}")
        params = {} if item.get("parameters") is None else item["parameters"]
        if not isinstance(params, dict) or not isinstance(params.get("binary_data", False), bool):
            raise RequestError(400, f"output {name!r}: 'parameters' must be a JSON object, its 'binary_data' "
                                    "true or false")


def _input(item, spans: dict[str, bytes], binary: memoryview, offset: int, limit: int) -> tuple[str, np.ndarray, int]:
    """One input's name, array and the offset of the next binary tensor; ``limit``: the request's
    size in bytes, which bounds the values it can hold."""
    if not isinstance(item, dict):
        raise RequestError(400, "each input must be a JSON object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) \
            or len(shape) > MAX_RANK or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise RequestError(400, f"input {name!r} needs a name, a datatype and a shape of at most {MAX_RANK} "
                                f"integers in [0, {MAX_DIM}]")
    if datatype not in KSERVE_TYPES:
        raise RequestError(400, f"input {name!r}: datatype {datatype!r} is not supported")
    dtype = np.dtype(KSERVE_TYPES[datatype])
    count = math.prod(shape)  # Python integers: numpy's int64 product wraps around silently
    if count > limit:  # every value takes at least one byte of the request
        raise RequestError(400, f"input {name!r}: shape {shape} holds {count} values, more than the "
                                f"{limit}-byte request carries")
    size = (item.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not _is_int(size) or size != count * dtype.itemsize or offset + size > len(binary):
            raise RequestError(400, f"input {name!r}: binary_data_size {size} does not fit shape {shape} "
                                    f"of {datatype} or the body")
        return name, np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape), offset + size
    data = item.get("data")
    if data is None:
        raise RequestError(400, f"input {name!r} has no data")
    try:
        if isinstance(data, str) and data in spans:
            array = _numbers(spans[data], dtype)
            if array is None:
                array = _json_array(json.loads(b"[" + spans[data] + b"]"), dtype)
        elif isinstance(data, list):
            array = _json_array(data, dtype)
        else:
            raise ValueError(type(data))
    except (TypeError, ValueError, OverflowError):
        raise RequestError(400, f"input {name!r}: data is not a JSON array of {datatype} values") from None
    if array.size != count:
        raise RequestError(400, f"input {name!r}: {array.size} values for shape {shape}")
    return name, array.reshape(shape), offset


def parse_request(body: bytes, header_length: str | None, model: ServedModel) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and the input arrays of an infer request (JSON data or binary tensors)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(400, f"{HEADER_LENGTH} is not an integer") from None
        if not 0 <= n <= len(body):
            raise RequestError(400, f"{HEADER_LENGTH} {n} is outside the body ({len(body)} bytes)")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    request, spans = _load_json(head)
    _check_fields(request, model)
    parsed, offset = [], 0
    for item in request["inputs"]:
        name, array, offset = _input(item, spans, binary, offset, len(body))
        parsed.append((name, array))
    return request, validated(parsed, model)


def validated(inputs: list[tuple[str, np.ndarray]], model: ServedModel) -> dict[str, np.ndarray]:
    """A request's (name, array) inputs as the model's feeds: each name once, names, dtypes and
    shapes as the model takes them (``RequestError(400)`` saying what differs)."""
    feeds = {}
    for name, array in inputs:
        if name in feeds:
            raise RequestError(400, f"input {name!r} given twice")
        feeds[name] = array
    try:
        model.session.validate(feeds)
    except InputError as exc:
        raise RequestError(400, str(exc)) from None
    return feeds


def build_response(request: dict, model: ServedModel, outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """Response body and, when any output goes as binary data, the JSON header's length. ``request``
    passed ``parse_request``: its fields have their types."""
    default_binary = (request.get("parameters") or {}).get("binary_data_output", False)
    wanted = request.get("outputs")
    if wanted is None:
        selection = [(name, default_binary) for name in outputs]
    else:
        selection = [(item["name"], (item.get("parameters") or {}).get("binary_data", default_binary))
                     for item in wanted]
    entries, blobs = [], []
    for name, binary in selection:
        array = np.ascontiguousarray(outputs[name])
        entry = {"name": name, "datatype": DATATYPE_OF[array.dtype], "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response = {"model_name": model.name, "model_version": model.version, "outputs": entries}
    if "id" in request:
        response["id"] = request["id"]
    head = json.dumps(response).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
