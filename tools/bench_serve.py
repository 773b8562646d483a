"""Serving throughput and latency of `bnrt serve` against in-process onnxruntime, side by side.

    python -m tools.bench_serve [MODEL.onnx ...] [--requests 600] [-o docs/SERVING.md]

Starts `bnrt serve` on 127.0.0.1 (free ports, HTTP and gRPC), then for each protocol and 1, 8 and 32
concurrent clients (threads, each with its own tritonclient.http or tritonclient.grpc client, batch-1
requests, binary tensors / raw contents) measures requests/s and p50/p99 latency, and per request the
server process's CPU time (all its threads, from /proc) beside the wall time of its ORT runs (from
/metrics, shared by the requests batched together): the difference is what serving costs beyond ORT. In-process ORT runs the same model at batch 1…256 in the same process as the
clients; the best samples/s is the reference. Without MODEL, the bundled digits example and the zoo's
ResNet are folded and exported first. Server, clients and the in-process run share this machine's
cores.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import bnrt
from bnrt.session import Session
from bnrt.io.save import write_text
from tools import child_env
from tools.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def in_process(model: Path, seconds: float = 1.5) -> dict[int, float]:
    session = Session(model)
    spec = session.inputs[0]
    rates = {}
    for batch in (1, 8, 32, 128, 256):
        x = np.random.default_rng(0).random((batch, *spec.shape[1:]), dtype=np.float32)
        session.run([x])
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run([x])
            n += batch
        rates[batch] = n / (time.perf_counter() - start)
    return rates


def start_server(model: Path, *flags: str, grpc: bool = False) -> tuple[subprocess.Popen, str | dict[str, str]]:
    """The server and its URL (with ``grpc``: {"http": …, "grpc": …})."""
    env = child_env()
    proc = subprocess.Popen([sys.executable, "-m", "bnrt", "serve", str(model), "--port", "0",
                             *(["--grpc-port", "0"] if grpc else []), *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    port = re.search(r":(\d+) ", proc.stdout.readline()).group(1)
    grpc_port = re.search(r":(\d+)$", proc.stdout.readline().strip()).group(1) if grpc else None
    import tritonclient.http as httpclient

    for _ in range(300):
        try:
            if httpclient.InferenceServerClient(f"127.0.0.1:{port}").is_server_ready():
                break
        except Exception:
            time.sleep(0.1)
    url = f"127.0.0.1:{port}"
    return proc, {"http": url, "grpc": f"127.0.0.1:{grpc_port}"} if grpc else url


def load(url: str, name: str, shape: tuple[int, ...], clients: int, requests: int, protocol: str = "http") -> dict:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.random.default_rng(1).random((1, *shape), dtype=np.float32)
    per_client = max(1, requests // clients)
    latencies: list[float] = []

    def client_loop(_):
        if protocol == "grpc":
            client = grpcclient.InferenceServerClient(url)
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            out = [grpcclient.InferRequestedOutput("output")]
        else:
            client = httpclient.InferenceServerClient(url)
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            out = [httpclient.InferRequestedOutput("output", binary_data=True)]
        mine = []
        for _ in range(per_client):
            t = time.perf_counter()
            client.infer(name, [inp], outputs=out)
            mine.append(time.perf_counter() - t)
        return mine

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for mine in pool.map(client_loop, range(clients)):
            latencies.extend(mine)
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"protocol": protocol, "clients": clients, "requests": len(latencies), "rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def bench(model: Path, requests: int, max_delay_ms: float) -> tuple[str, str]:
    name = model.stem
    shape = Session(model).inputs[0].shape[1:]
    rates = in_process(model)
    proc, urls = start_server(model, "--max-delay-ms", str(max_delay_ms), grpc=True)
    try:
        rows = []
        for clients in (1, 8, 32):
            for protocol in ("http", "grpc"):
                before = _server_costs(proc.pid, urls["http"], name)
                rows.append(load(urls[protocol], name, shape, clients, requests, protocol))
                after = _server_costs(proc.pid, urls["http"], name)
                rows[-1].update({k: (after[k] - before[k]) / rows[-1]["requests"] for k in after})
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    best_batch = max(rates, key=rates.get)
    lines = [f"### {name}", "", "| clients | protocol | requests | requests/s | p50 ms | p99 ms | / in-process ORT best "
             "| server CPU µs/request | ORT run µs/request |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['protocol']} | {r['requests']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['rps'] / rates[best_batch]:.3f} | {r['cpu_us']:.0f} | {r['ort_us']:.0f} |")
    lines += ["", "In-process ORT, samples/s by batch: " + ", ".join(f"{b}: {v:.0f}" for b, v in rates.items())
              + f" (best: batch {best_batch})", ""]
    at_32 = ", ".join(f"{r['protocol']} {r['rps'] / rates[best_batch]:.2f}" for r in rows if r["clients"] == 32)
    return "\n".join(lines), f"{name} {at_32}"


def _server_costs(pid: int, url: str, name: str) -> dict[str, float]:
    """The server process's CPU time so far (user + system, all threads, µs) and its ORT runs' time
    (``nv_inference_compute_infer_duration_us`` from /metrics, µs)."""
    import os
    import urllib.request

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") * 1e6
    text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    ort = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("nv_inference_compute_infer_duration_us{") and f'model="{name}"' in line)
    return {"cpu_us": cpu, "ort_us": ort}


def default_models(tmp: Path) -> list[Path]:
    import torch

    from models.zoo import build

    bnrt.fold_file(bnrt.ModelSource(ROOT / "models" / "digits_cnn.pt", trust_code=True), tmp, check=None, exporter="torchscript")
    resnet = bnrt.fold(build("resnet"), (torch.randn(2, 3, 32, 32),)).model
    bnrt.export_onnx(resnet, (torch.randn(2, 3, 32, 32),), tmp / "resnet.onnx", names=(["x"], ["output"]),
                     exporter="torchscript")
    return [tmp / "digits_cnn.onnx", tmp / "resnet.onnx"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("-o", "--output", default="docs/SERVING.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m) for m in args.models] or default_models(Path(tmp))
        sections = [bench(m, args.requests, args.max_delay_ms) for m in models]
        table = "\n".join(text for text, _ in sections)
        reached = [line for _, line in sections]
    print(table)
    doc = ("# Serving benchmark\n\n" + provenance("python -m tools.bench_serve")
           + f" Dynamic batching with --max-delay-ms {args.max_delay_ms}.\n\n"
           + "Goal: 32 clients reach >= 0.7 of in-process ORT's best samples/s (>= 0.9 on a ResNet-50 at "
           + "224x224). Reached at 32 clients: " + "; ".join(reached) + ".\n\n"
           + __doc__.split("\n\n", 2)[2] + "\n" + table)
    write_text(Path(args.output), doc)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
