"""INT8 and FP16 latency against float32 on onnxruntime, side by side in one run.

    python -m tools.bench_quantize [--model resnet] [--batch-sizes 1,8] [--threads 1] [--repeats 5]
                                   [--providers cpu,cuda]

Folds a zoo model (random weights, statistics of random data), quantizes it with ``bnrt quantize``
(INT8: calibrated on random inputs, which is fine for timing and nothing else; the budget is
opened, since random data says nothing about accuracy), and times float32, INT8 and FP16 on ORT's
CPU provider (and CUDA where present) with bnrt.pipeline.bench's interleaved method. Prints a table of p50
latencies and the speed-ups.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bnrt.pipeline.bench import measure
from bnrt.io.source import ModelSource
from bnrt.pipeline.quantize import QuantizeOptions, quantize_file
from bnrt.session import Session
from models.zoo import ZOO, build
from tools.provenance import provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(ZOO) + ["resnet50"],
                        help="a zoo model, or resnet50 (models.zoo.ResNet50, 1x3x224x224)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--providers", help="comma-separated ORT providers (default: cpu, and cuda where present)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.model == "resnet50":
        from models.zoo import ResNet50
        model, shape = ResNet50().eval(), (1, 3, 224, 224)
    else:
        model, shape = build(args.model), ZOO[args.model].input_shape
    providers = (args.providers.split(",") if args.providers else
                 ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else []))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({"state_dict": model.state_dict(), "arch": f"models.zoo:{type(model).__name__}",
                    "input_shape": list(shape)}, tmp / "m.pt")
        x = np.random.default_rng(0).standard_normal((16, *shape[1:])).astype(np.float32)
        np.savez(tmp / "d.npz", x=x)
        paths = {}
        for precision in ("int8", "fp16"):
            outcome = quantize_file(ModelSource(tmp / "m.pt", trust_code=True), tmp / "d.npz", tmp / "q",
                                    QuantizeOptions(precision=precision, max_disagreement=1.0))
            paths[precision] = Path(outcome.report["output"])
        from bnrt.pipeline.convert import fold_file
        fold_file(ModelSource(tmp / "m.pt", trust_code=True), tmp / "f", check=None)
        paths = {"float32": tmp / "f" / "m.onnx", **paths}
        print(provenance("python -m tools.bench_quantize") + f" {args.model}, {args.threads} thread(s), "
              f"{args.repeats} interleaved rounds x {args.iterations} calls.\n")
        print("| provider | batch | float32 p50 ms | int8 p50 ms | fp16 p50 ms | int8 speed-up | fp16 speed-up |")
        print("|---|---|---|---|---|---|---|")
        for provider in providers:
            sessions = {k: Session(p, provider, threads=args.threads) for k, p in paths.items()}
            for batch in batches:
                runners = {k: (lambda x, s=s: s.run([x])) for k, s in sessions.items()}
                times = measure(runners, x[:batch] if batch <= len(x) else np.resize(x, (batch, *x.shape[1:])),
                                args.repeats, args.iterations)
                p50 = {k: float(np.median(t)) * 1000 for k, t in times.items()}
                print(f"| {provider} | {batch} | {p50['float32']:.3f} | {p50['int8']:.3f} | {p50['fp16']:.3f} | "
                      f"{p50['float32'] / p50['int8']:.2f}x | {p50['float32'] / p50['fp16']:.2f}x |")


if __name__ == "__main__":
    main()
