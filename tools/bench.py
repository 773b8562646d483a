"""Regenerate docs/BENCHMARKS.md: every deployment path of every zoo model, side by side.

    python -m tools.bench [--models resnet unet ...] [--batch-sizes 1,8,32] [--threads 1]
                          [--repeats 5] [--iterations 10]

Writes docs/BENCHMARKS.md (tables and headline ratios), docs/benchmarks.json and
docs/benchmarks.png. See bnrt/bench.py for the method.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bnrt.bench import bench_model, environment, markdown, pipeline_cost, plot
from bnrt.load import ModelSource
from bnrt.save import write_json, write_text
from tools.provenance import provenance
from models.zoo import ZOO, build


def resnet50_pipeline_cost() -> str:
    """``bnrt fold`` against torch.fx fuse + torch.onnx.export on a ResNet-50 checkpoint (statistics
    of random data), medians of interleaved runs after a warm-up."""
    from models.zoo import ResNet50

    torch.manual_seed(0)
    model = ResNet50()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 224, 224))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "resnet50.pt"
        torch.save({"state_dict": model.eval().state_dict(), "arch": "models.zoo:ResNet50",
                    "input_shape": [1, 3, 224, 224]}, ckpt)
        cost = pipeline_cost(ModelSource(ckpt, trust_code=True), Path(tmp))
    ratio = cost["bnrt fold"] / cost["torch.fx fuse + torch.onnx.export"]
    return (f"ResNet-50 (25.6M parameters, 1x3x224x224): bnrt fold {cost['bnrt fold']:.2f} s, torch.fx fuse + "
            f"torch.onnx.export {cost['torch.fx fuse + torch.onnx.export']:.2f} s, ratio {ratio:.2f} (target <= 1.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ZOO))
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="only the fold pipeline's cost on a ResNet-50-sized model, printed")
    args = parser.parse_args()
    if args.pipeline_only:
        print(resnet50_pipeline_cost())
        return
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    reports = []
    for name in args.models:
        reports.append(bench_model(build(name), ZOO[name].input_shape, name=name, batch_sizes=batches,
                                   threads=args.threads, repeats=args.repeats, iterations=args.iterations))
        print(markdown(reports[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "resnet.pt"
        model = build("resnet")
        torch.save({"state_dict": model.state_dict(), "arch": "models.zoo:ResNet",
                    "input_shape": list(ZOO["resnet"].input_shape)}, ckpt)
        cost = pipeline_cost(ModelSource(ckpt, trust_code=True), Path(tmp))
    limit = [(r.model, b, r.ratio("ORT, bnrt (cpu)", "ORT, BN-free limit (cpu)", b)) for r in reports for b in batches]
    plain = [(r.model, b, r.ratio("ORT, bnrt (cpu)", "ORT, torch.onnx.export (cpu)", b)) for r in reports for b in batches]
    headline = ["## Headline ratios (median latency)", "",
                "bnrt ONNX / BN-free limit, per model and batch (target ≤ 1.01):", "",
                "| model | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for r in reports:
        headline.append(f"| {r.model} | " + " | ".join(f"{x:.3f}" for m, b, x in limit if m == r.model) + " |")
    headline += ["", "bnrt ONNX / ONNX from torch.onnx.export without bnrt:", "",
                 "| model | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for r in reports:
        headline.append(f"| {r.model} | " + " | ".join(f"{x:.3f}" for m, b, x in plain if m == r.model) + " |")
    if "resnet" in args.models:
        rn = next(r for r in reports if r.model == "resnet")
        headline += ["", f"ResNet at batch {batches[0]}: bnrt ONNX on ORT is "
                     f"{1 / rn.ratio('ORT, bnrt (cpu)', 'torch eager', batches[0]):.2f}× faster than torch eager unfolded."]
    headline += ["", "Fold pipeline cost on the ResNet checkpoint (median of 2 after a warm-up):", "",
                 f"- `bnrt fold` (load, fold, export, check): {cost['bnrt fold']:.2f} s",
                 f"- torch.fx fuse + torch.onnx.export: {cost['torch.fx fuse + torch.onnx.export']:.2f} s",
                 f"- ratio: {cost['bnrt fold'] / cost['torch.fx fuse + torch.onnx.export']:.2f} (target ≤ 1.3)"]
    env = environment(args.threads)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    write_json(docs / "benchmarks.json", {"environment": env, "pipeline_cost_s": cost,
                                          "reports": [r.to_json() for r in reports]})
    plot(reports, docs / "benchmarks.png")
    text = ("# Benchmarks\n\n" + provenance("python -m tools.bench") + " " + ", ".join(f"{k} {v}" for k, v in env.items())
            + f"; {args.repeats} interleaved rounds × {args.iterations} calls per variant and batch.\n\n"
            + "\n".join(headline) + "\n\n![median latency](benchmarks.png)\n\n## Per model\n\n"
            + "\n".join(markdown(r) for r in reports))
    write_text(docs / "BENCHMARKS.md", text)
    print("\n".join(headline))
    print(f"\nwrote {docs / 'BENCHMARKS.md'}, benchmarks.json, benchmarks.png")


if __name__ == "__main__":
    main()
