"""A bounded load test of `bnrt serve` on 127.0.0.1: N valid requests from K concurrent clients.

    python -m tools.load_test [MODEL.onnx] [--requests 10000] [--clients 64]
    python -m tools.load_test [MODEL.onnx] --large 245760

Reports failures, requests/s, p50/p99 latency and the server's resident memory (VmRSS) after a
warm-up and after the run. Every request is bounded in time; the run stops by itself. `--large N`
instead sends one JSON request of N samples (values 0-16 like the digits data, written by
json.dumps: 51 MB for 245,760 digits samples) and reports the server's memory before it, at its
peak (VmHWM) and after it, in MB.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import bnrt
from tools.bench_serve import ROOT, start_server


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key}")


def valid_body(shape: tuple[int, ...]) -> bytes:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    return json.dumps({"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def run_load(host: str, port: int, path: str, body: bytes, requests: int, clients: int) -> dict:
    """Send ``requests`` POSTs of ``body`` from ``clients`` keep-alive connections."""
    def client(i):
        per_client = requests // clients + (i < requests % clients)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        latencies, failures = [], 0
        for _ in range(per_client):
            start = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                failures += response.status != 200
            except (OSError, http.client.HTTPException):
                failures += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            latencies.append(time.perf_counter() - start)
        conn.close()
        return latencies, failures

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    ms = np.array([t for r in results for t in r[0]]) * 1000
    return {"requests": len(ms), "clients": clients, "failures": sum(r[1] for r in results),
            "rps": len(ms) / wall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def load_test(model: Path, requests: int, clients: int) -> dict:
    proc, url = start_server(model, "--max-queue", str(max(256, clients * 2)))
    host, port = url.split(":")
    try:
        path = f"/v2/models/{model.stem}/infer"
        body = valid_body((1, *bnrt.Session(model).inputs[0].shape[1:]))
        run_load(host, int(port), path, body, min(1000, requests), clients)  # warm-up
        before = rss_kib(proc.pid)
        stats = run_load(host, int(port), path, body, requests, clients)
        stats.update(rss_before_kib=before, rss_after_kib=rss_kib(proc.pid))
        stats["rss_growth"] = stats["rss_after_kib"] / before - 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return stats


def large_request(model: Path, samples: int) -> dict:
    """The server's memory (MB) before, at the peak of and after one JSON request of ``samples`` samples."""
    proc, url = start_server(model)
    host, port = url.split(":")
    try:
        shape = (samples, *bnrt.Session(model).inputs[0].shape[1:])
        values = np.random.default_rng(0).integers(0, 17, shape)
        body = json.dumps({"inputs": [{"name": bnrt.Session(model).input_names[0], "shape": list(shape),
                                       "datatype": "FP32", "data": values.ravel().tolist()}]}).encode()
        before = rss_kib(proc.pid)
        start = time.perf_counter()
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.request("POST", f"/v2/models/{model.stem}/infer", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        conn.close()
        seconds = time.perf_counter() - start
        time.sleep(0.5)  # the response is sent before the server drops what it held
        mb = {key: round(rss_kib(proc.pid, key) / 1024) for key in ("VmHWM", "VmRSS")}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"samples": samples, "body_mb": round(len(body) / 2**20, 1), "status": response.status,
            "seconds": round(seconds, 2), "rss_before_mb": round(before / 1024), "peak_mb": mb["VmHWM"],
            "rss_after_mb": mb["VmRSS"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--large", type=int, metavar="N", help="one request of N samples: the server's memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            bnrt.fold_file(bnrt.ModelSource(ROOT / "models" / "digits_cnn.pt", trust_code=True), tmp, check=None, exporter="torchscript")
            model = Path(tmp) / "digits_cnn.onnx"
        stats = large_request(model, args.large) if args.large else load_test(model, args.requests, args.clients)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
