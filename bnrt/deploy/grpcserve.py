"""`bnrt serve --grpc-port`: the KServe v2 / Open Inference Protocol over gRPC, beside HTTP.

The ``GRPCInferenceService`` of the protocol as tritonclient ships it (``tritonclient.grpc.service_pb2``
and ``service_pb2_grpc``, generated from the protocol's .proto), served by grpc.aio in the HTTP
server's own event loop: ``ModelInfer`` goes through the same batcher, limits and metrics as
``POST …/infer``, so the stock ``tritonclient.grpc`` client works unmodified. Served: server and model
liveness, readiness, metadata, config and statistics (Triton's ``ModelConfig`` and ``ModelStatistics``,
as ``GET …/config`` and ``…/stats``), ``ModelInfer`` (raw tensor contents or typed contents in; raw
contents out, as Triton answers), the repository index, load and unload. A refused request is a gRPC status:
INVALID_ARGUMENT (400), NOT_FOUND (404), RESOURCE_EXHAUSTED (413, and messages over the size limit),
UNAVAILABLE (503, queue full).
"""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as rpc

from bnrt.version import __version__
from bnrt.deploy.kserve import DATATYPE_OF, EXTENSIONS, KSERVE_TYPES, MAX_DIM, MAX_RANK, RequestError, ServedModel, validated

# the typed field of InferTensorContents holding each datatype (FP16 travels only as raw bytes)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


def _status(code: int):
    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
            413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}.get(
        code, grpc.StatusCode.INTERNAL)


def _tensor(tensor, raw: bytes | None) -> tuple[str, np.ndarray]:
    """One input of a ModelInferRequest as (name, array), from its raw bytes or its typed contents."""
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    if len(shape) > MAX_RANK or not all(0 <= d <= MAX_DIM for d in shape):
        raise RequestError(400, f"input {name!r}: a shape of at most {MAX_RANK} integers in [0, {MAX_DIM}]")
    if datatype not in KSERVE_TYPES:
        raise RequestError(400, f"input {name!r}: datatype {datatype!r} is not supported")
    dtype, count = np.dtype(KSERVE_TYPES[datatype]), math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise RequestError(400, f"input {name!r}: {len(raw)} bytes of raw contents for shape {shape} of "
                                    f"{datatype} ({count * dtype.itemsize} bytes)")
        return name, np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = CONTENTS.get(datatype)
    values = getattr(tensor.contents, field) if field else []
    if len(values) != count:
        raise RequestError(400, f"input {name!r}: {len(values)} values for shape {shape}")
    try:
        return name, np.asarray(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise RequestError(400, f"input {name!r}: values out of {datatype}'s range ({exc})") from None


def parse_infer(request, model: ServedModel) -> dict[str, np.ndarray]:
    """The input arrays of a ModelInferRequest, validated against ``model``'s inputs."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise RequestError(400, f"{len(raws)} raw input contents for {len(request.inputs)} inputs")
    return validated([_tensor(tensor, raws[i] if raws else None) for i, tensor in enumerate(request.inputs)], model)


def infer_response(request, model: ServedModel, outputs: dict[str, np.ndarray]):
    """The ModelInferResponse: the requested outputs (all when none is named) as raw contents."""
    wanted = [o.name for o in request.outputs] or list(outputs)
    unknown = [n for n in wanted if n not in outputs]
    if unknown:
        raise RequestError(400, f"unknown output {unknown[0]!r}")
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    for name in wanted:
        array = np.ascontiguousarray(outputs[name])
        response.outputs.add(name=name, datatype=DATATYPE_OF[array.dtype], shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


def _tensors(specs) -> list:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=DATATYPE_OF.get(s.dtype, "FP32"),
                                                    shape=[-1 if d is None else d for d in s.shape]) for s in specs]


class Service(rpc.GRPCInferenceServiceServicer):
    """The GRPCInferenceService over ``api`` (the HTTP application's endpoints: repository,
    batchers, metrics, ``lookup``)."""

    def __init__(self, api):
        self.api = api

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        try:
            self.api.lookup(request.name, request.version)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="bnrt", version=__version__, extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request, context):
        try:
            model = self.api.lookup(request.name, request.version)
        except RequestError as exc:
            await context.abort(_status(exc.status), str(exc))
        return pb.ModelMetadataResponse(name=model.name, versions=sorted(self.api.models[model.name], key=int),
                                        platform="onnxruntime_onnx", inputs=_tensors(model.session.inputs),
                                        outputs=_tensors(model.session.outputs))

    async def ModelConfig(self, request, context):
        try:
            config = self.api.config(self.api.lookup(request.name, request.version))
        except RequestError as exc:
            await context.abort(_status(exc.status), str(exc))
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        from google.protobuf.json_format import ParseDict

        try:
            stats = self.api.statistics(request.name, request.version)
        except RequestError as exc:
            await context.abort(_status(exc.status), str(exc))
        return ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row)
                                                  for row in self.api.repo.index()])

    async def RepositoryModelLoad(self, request, context):
        try:
            await self.api.repo.load(request.model_name)
        except RequestError as exc:
            await context.abort(_status(exc.status), str(exc))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            self.api.repo.unload(request.model_name)
        except RequestError as exc:
            await context.abort(_status(exc.status), str(exc))
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request, context):
        api, start, model = self.api, time.perf_counter(), None
        try:
            model = api.lookup(request.model_name, request.model_version)
            feeds = parse_infer(request, model)
            api.check_batch(model, feeds)
            outputs = await api.batcher(model).submit(feeds)
            response = infer_response(request, model, outputs)
        except RequestError as exc:
            api.count(model, start, success=False)
            await context.abort(_status(exc.status), str(exc))
        api.count(model, start, success=True)
        return response


async def start_grpc(api, host: str, port: int, max_message_bytes: int):
    """A started grpc.aio server for ``api`` on ``host:port`` and the port it listens on."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", -1)])
    rpc.add_GRPCInferenceServiceServicer_to_server(Service(api), server)
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    await server.start()
    return server, bound
