"""The KServe v2 / Open Inference Protocol on the wire, for ``bnrt serve``: a served model's
metadata, request parsing (JSON tensors and Triton's binary tensor extension) and response
building. Pure functions of bytes and arrays; the server (``bnrt.serve``) owns sockets, batching
and sessions' lifetimes.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .run import Session

KSERVE_TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
DATATYPE_OF = {np.dtype(v): k for k, v in KSERVE_TYPES.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIM = 2**31 - 1  # larger axes are no request a server can hold; numpy refuses some beyond it


class RequestError(Exception):
    """A request the server refuses: ``status`` and a message for ``{"error": …}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServedModel:
    name: str
    version: str
    session: Session
    batching: bool = field(init=False)

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
    try:
        request = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    except RecursionError:  # the nesting limit: the decoder's recursion stops at the interpreter's limit
        raise RequestError(400, f"JSON nested more than {sys.getrecursionlimit()} levels deep") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise RequestError(400, "the request must be a JSON object with an 'inputs' list")
    feeds, offset = {}, 0
    for item in request["inputs"]:
        if not isinstance(item, dict):
            raise RequestError(400, "each input must be a JSON object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape):
            raise RequestError(400, f"input {name!r} needs a name, a datatype and a shape of integers in "
                                    f"[0, {MAX_DIM}]")
        if datatype not in KSERVE_TYPES:
            raise RequestError(400, f"input {name!r}: datatype {datatype!r} is not supported")
        dtype = np.dtype(KSERVE_TYPES[datatype])
        count = math.prod(shape)  # Python integers: numpy's int64 product wraps around silently
        if count > len(body):  # every value takes at least one byte of the request
            raise RequestError(400, f"input {name!r}: shape {shape} holds {count} values, more than the "
                                    f"{len(body)}-byte request carries")
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
                raise RequestError(400, f"input {name!r}: binary_data_size {size} does not fit shape {shape} "
                                        f"of {datatype} or the body")
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            data = item.get("data")
            if data is None:
                raise RequestError(400, f"input {name!r} has no data")
            try:
                array = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError, OverflowError, RecursionError):
                raise RequestError(400, f"input {name!r}: data is not {datatype}") from None
            if array.size != count:
                raise RequestError(400, f"input {name!r}: {array.size} values for shape {shape}")
            array = array.reshape(shape)
        if name in feeds:
            raise RequestError(400, f"input {name!r} given twice")
        feeds[name] = array
    try:
        model.session.validate(feeds)
    except InputError as exc:
        raise RequestError(400, str(exc)) from None
    return request, feeds


def build_response(request: dict, model: ServedModel, outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """Response body and, when any output goes as binary data, the JSON header's length."""
    wanted = request.get("outputs")
    params = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    default_binary = bool(params.get("binary_data_output", False))
    if wanted is None:
        selection = [(name, default_binary) for name in outputs]
    else:
        if not isinstance(wanted, list):
            raise RequestError(400, "'outputs' must be a list")
        selection = []
        for item in wanted:
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or name not in outputs:
                raise RequestError(400, f"unknown output {name!r}; the model's outputs are {', '.join(outputs)}")
            p = item.get("parameters") or {}
            selection.append((name, bool(p.get("binary_data", default_binary)) if isinstance(p, dict) else default_binary))
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

