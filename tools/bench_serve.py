"""Serving throughput and latency of `bnrt serve` against in-process onnxruntime, side by side.

    python -m tools.bench_serve [MODEL.onnx ...] [--seconds 4] [-o docs/SERVING.md]

Starts `bnrt serve` on 127.0.0.1 (free ports, HTTP and gRPC), then for each protocol and 1, 8 and 32
concurrent clients runs `tools.loadgen` in a process of its own, as Triton's perf_analyzer does:
"raw" clients (HTTP/1.1 keep-alive connections writing one pre-built request with the binary tensor
extension, or grpc.aio calls of one pre-built ModelInferRequest; every answer checked) that cost the
shared cores least, and at 32 clients the stock tritonclient.http / tritonclient.grpc clients (a
thread each) for what an application built on them sees. Each row runs for the given seconds after
a warm-up, batch-1 requests. Per request: the server process's CPU time (all its threads, from
/proc), of it the event loop's (its main thread: HTTP, the protocol, batching; gRPC's own threads
are not in it), the wall time of its ORT runs (from /metrics, shared by the requests batched
together) and the load generator's CPU time. In-process ORT runs the same model at batch 1…256
first; its best samples/s is the reference. Without MODEL, the bundled digits example, the zoo's
ResNet (32x32) and a ResNet-50 (torchvision's layout, 10 classes) at 224x224 are folded and
exported first, and the zoo ResNet is served again with `--instances 2`. Server, load and the
in-process run share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
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


def load(url: str, name: str, shape: tuple[int, ...], output_bytes: int, clients: int, seconds: float,
         protocol: str = "http", client: str = "raw") -> dict:
    """One row: ``tools.loadgen`` in a process of its own against the server at ``url``."""
    cmd = [sys.executable, "-m", "tools.loadgen", url, name, "--shape", ",".join(map(str, shape)),
           "--output-bytes", str(output_bytes), "--protocol", protocol, "--client", client,
           "--clients", str(clients), "--seconds", str(seconds)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=seconds + 120)
    if proc.returncode != 0:
        raise SystemExit(f"loadgen failed: {proc.stderr.strip()}")
    return {"protocol": protocol, "client": client, "clients": clients, **json.loads(proc.stdout)}


def bench(model: Path, seconds: float, max_delay_ms: float, flags: tuple[str, ...] = ()) -> tuple[str, str]:
    name = model.stem
    session = Session(model)
    shape = session.inputs[0].shape[1:]
    out = session.outputs[0]
    output_bytes = int(np.prod([d for d in out.shape[1:]], dtype=np.int64)) * np.dtype(out.dtype).itemsize
    rates = in_process(model)
    del session
    proc, urls = start_server(model, "--max-delay-ms", str(max_delay_ms), *flags, grpc=True)
    plan = [(c, p, "raw") for c in (1, 8, 32) for p in ("http", "grpc")] + [(32, p, "tritonclient") for p in ("http", "grpc")]
    try:
        rows = []
        for clients, protocol, client in plan:
            before = _server_costs(proc.pid, urls["http"], name)
            rows.append(load(urls[protocol], name, shape, output_bytes, clients, seconds, protocol, client))
            after = _server_costs(proc.pid, urls["http"], name)
            done = max(rows[-1]["requests"] + rows[-1]["errors"], 1)
            rows[-1].update({k: (after[k] - before[k]) / done for k in after})
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    best_batch = max(rates, key=rates.get)
    lines = [f"### {name}" + (f" ({' '.join(flags)})" if flags else ""), "",
             "| clients | protocol | client | requests/s | p50 ms | p99 ms | errors | / in-process ORT best "
             "| server CPU µs/request | of it, event loop | ORT run µs/request | load CPU µs/request |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['protocol']} | {r['client']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['errors']} | {r['rps'] / rates[best_batch]:.2f} | {r['cpu_us']:.0f} | "
                     f"{r['loop_us']:.0f} | {r['ort_us']:.0f} | {r['load_cpu_us']:.0f} |")
    lines += ["", "In-process ORT, samples/s by batch: " + ", ".join(f"{b}: {v:.0f}" for b, v in rates.items())
              + f" (best: batch {best_batch})", ""]
    at_32 = ", ".join(f"{r['protocol']} {r['rps'] / rates[best_batch]:.2f}" for r in rows
                      if r["clients"] == 32 and r["client"] == "raw")
    label = name + (f" ({' '.join(flags)})" if flags else "")
    return "\n".join(lines), f"{label} {at_32}"


def _cpu_us(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") * 1e6


def _server_costs(pid: int, url: str, name: str) -> dict[str, float]:
    """The server process's CPU time so far (user + system, all threads, µs), its main thread's
    (the event loop: HTTP, the protocol, batching; gRPC's own threads are not in it), and its ORT
    runs' time (``nv_inference_compute_infer_duration_us`` from /metrics, µs)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    ort = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("nv_inference_compute_infer_duration_us{") and f'model="{name}"' in line)
    return {"cpu_us": _cpu_us(Path(f"/proc/{pid}/stat")), "loop_us": _cpu_us(Path(f"/proc/{pid}/task/{pid}/stat")),
            "ort_us": ort}


def default_models(tmp: Path) -> list[Path]:
    import torch

    from models.zoo import ResNet50, build

    bnrt.fold_file(bnrt.ModelSource(ROOT / "models" / "digits_cnn.pt", trust_code=True), tmp, check=None, exporter="torchscript")
    for name, model, size in (("resnet", build("resnet"), 32), ("resnet50", ResNet50(classes=10).eval(), 224)):
        folded = bnrt.fold(model, (torch.randn(2, 3, size, size),)).model
        bnrt.export_onnx(folded, (torch.randn(2, 3, size, size),), tmp / f"{name}.onnx", names=(["x"], ["output"]),
                         exporter="torchscript")
    return [tmp / "digits_cnn.onnx", tmp / "resnet.onnx", tmp / "resnet50.onnx"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per row")
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("-o", "--output", default="docs/SERVING.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m) for m in args.models] or default_models(Path(tmp))
        sections = [bench(m, args.seconds * (2 if m.stem == "resnet50" else 1), args.max_delay_ms) for m in models]
        if not args.models:  # the zoo ResNet again with two sessions of one thread each
            sections.append(bench(models[1], args.seconds, args.max_delay_ms, ("--instances", "2")))
        table = "\n".join(text for text, _ in sections)
        reached = [line for _, line in sections]
    print(table)
    doc = ("# Serving benchmark\n\n" + provenance("python -m tools.bench_serve")
           + f" Dynamic batching with --max-delay-ms {args.max_delay_ms}.\n\n"
           + "Goal: 32 clients reach >= 0.7 of in-process ORT's best samples/s (>= 0.9 on a ResNet-50 at "
           + "224x224). Reached at 32 clients (raw clients): " + "; ".join(reached) + ".\n\n"
           + __doc__.split("\n\n", 2)[2] + "\n" + table)
    write_text(Path(args.output), doc)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
