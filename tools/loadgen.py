"""A load generator for `bnrt serve` (or any KServe v2 server), in a process of its own, like
Triton's perf_analyzer: CLIENTS concurrent clients, each sending batch-1 infer requests one after
the other for SECONDS after a short warm-up, and checking every answer (status, output size).

    python -m tools.loadgen URL MODEL --input x --shape 3,32,32 --output output --output-bytes 40
                            --protocol http|grpc --clients 32 [--seconds 4] [--client raw|tritonclient]

``raw`` clients cost the load least: HTTP/1.1 keep-alive connections on asyncio (uvloop where
installed) writing one pre-built request (binary tensor extension) and reading the answer; over
gRPC, grpc.aio calls of one pre-built ``ModelInferRequest``. ``tritonclient`` clients are the stock
ones, a thread each: what an application built on them sees, and what their own cost leaves.
Prints one JSON line: requests, errors, requests/s, p50/p99 ms, the load's CPU µs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _cpu_us() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1e6


def _http_request(host: str, model: str, name: str, x: np.ndarray, output: str) -> bytes:
    head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": output, "parameters": {"binary_data": True}}]}).encode()
    body = head + x.tobytes()
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _http_client(host: str, port: int, request: bytes, output_bytes: int, until: float, warm: float,
                       latencies: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (now := time.perf_counter()) < until:
            writer.write(request)
            status = await reader.readline()
            if not status:  # the server closed the connection: this client stops, one error counted
                errors.append(0.0)
                return
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            ok = status.split(b" ", 2)[1:2] == [b"200"] and len(body) >= output_bytes
            if now >= warm:
                (latencies if ok else errors).append(time.perf_counter() - now)
    finally:
        writer.close()


async def _grpc_client(stub, request, output_bytes: int, until: float, warm: float, latencies: list,
                       errors: list) -> None:
    import grpc

    while (now := time.perf_counter()) < until:
        try:
            reply = await stub.ModelInfer(request)
            ok = len(reply.raw_output_contents[0]) == output_bytes
        except grpc.aio.AioRpcError:
            ok = False
        if now >= warm:
            (latencies if ok else errors).append(time.perf_counter() - now)


async def _raw(args, x: np.ndarray, latencies: list, errors: list) -> None:
    host, port = args.url.rsplit(":", 1)
    warm = time.perf_counter() + args.warmup
    until = warm + args.seconds
    if args.protocol == "http":
        request = _http_request(args.url, args.model, args.input, x, args.output)
        await asyncio.gather(*(_http_client(host, int(port), request, args.output_bytes, until, warm, latencies,
                                            errors) for _ in range(args.clients)))
        return
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=args.model, raw_input_contents=[x.tobytes()])
    request.inputs.add(name=args.input, datatype="FP32", shape=list(x.shape))
    request.outputs.add(name=args.output)
    async with grpc.aio.insecure_channel(args.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await asyncio.gather(*(_grpc_client(stub, request, args.output_bytes, until, warm, latencies, errors)
                               for _ in range(args.clients)))


def _tritonclient(args, x: np.ndarray, latencies: list, errors: list) -> None:
    if args.protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    start = time.perf_counter()
    warm, until = start + args.warmup, start + args.warmup + args.seconds

    def loop(_):
        client = client_module.InferenceServerClient(args.url)
        inp = client_module.InferInput(args.input, list(x.shape), "FP32")
        if args.protocol == "grpc":
            inp.set_data_from_numpy(x)
            out = [client_module.InferRequestedOutput(args.output)]
        else:
            inp.set_data_from_numpy(x, binary_data=True)
            out = [client_module.InferRequestedOutput(args.output, binary_data=True)]
        while (now := time.perf_counter()) < until:
            try:
                ok = client.infer(args.model, [inp], outputs=out).as_numpy(args.output).nbytes == args.output_bytes
            except Exception:
                ok = False
            if now >= warm:
                (latencies if ok else errors).append(time.perf_counter() - now)

    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(loop, range(args.clients)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("--input", default="x")
    parser.add_argument("--shape", required=True, help="one sample's shape, e.g. 3,32,32")
    parser.add_argument("--output", default="output")
    parser.add_argument("--output-bytes", type=int, required=True, help="bytes one answer's output holds")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--client", choices=("raw", "tritonclient"), default="raw")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args()
    x = np.random.default_rng(1).random((1, *map(int, args.shape.split(","))), dtype=np.float32)
    latencies: list[float] = []
    errors: list[float] = []
    if args.client == "raw":
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        cpu = _cpu_us()
        asyncio.run(_raw(args, x, latencies, errors))
    else:
        cpu = _cpu_us()
        _tritonclient(args, x, latencies, errors)
    cpu = _cpu_us() - cpu
    ms = np.array(latencies or [float("nan")]) * 1000
    done = len(latencies)
    print(json.dumps({"requests": done, "errors": len(errors), "rps": done / args.seconds,
                      "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                      "load_cpu_us": cpu / max(done + len(errors), 1) * (args.seconds / (args.seconds + args.warmup))}))


if __name__ == "__main__":
    main()
