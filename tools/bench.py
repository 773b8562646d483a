"""Regenerate docs/BENCHMARKS.md: every deployment path of every zoo model, side by side.

    python -m tools.bench [--models resnet unet ...] [--batch-sizes 1,8,32] [--threads 1]
                          [--repeats 5] [--iterations 10] [--pipeline-model resnet50|resnet] [--rounds 3]
    python -m tools.bench --pipeline-only [--rounds 5]    # only bnrt fold's cost on ResNet-50, printed

Writes docs/BENCHMARKS.md (tables, headline ratios, and the cost of `bnrt fold` against torch.fx
fuse + torch.onnx.export as command lines: wall time and peak memory), docs/benchmarks.json and
docs/benchmarks.png. See bnrt/bench.py for the method.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import torch

from bnrt.pipeline.bench import bench_model, environment, markdown, plot
from bnrt.io.save import write_json, write_text
from tools import child_env
from tools.provenance import provenance, sections
from models.zoo import ZOO, build

ROOT = Path(__file__).resolve().parents[1]


BNRT = "bnrt fold"
ALTERNATIVE = "torch.fx fuse + torch.onnx.export"


def _run(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=child_env())
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.strip().splitlines()[-1:]}")
    return wall, usage.ru_maxrss / 1024


def pipeline_cost(checkpoint: Path, workdir: Path, rounds: int = 3) -> dict[str, dict[str, float]]:
    """`bnrt fold CHECKPOINT` (load, fold, export, check with the defaults) against `python -m
    tools.fx_fuse_export` (load, fuse, export): each as a command line, run alternately, after one
    warm-up round of both; median wall time and median peak memory per command."""
    commands = {BNRT: lambda i: [sys.executable, "-m", "bnrt", "fold", str(checkpoint), "--trust-code",
                                 "-o", str(workdir / f"bnrt{i}")],
                ALTERNATIVE: lambda i: [sys.executable, "-m", "tools.fx_fuse_export", str(checkpoint),
                                        str(workdir / f"alt{i}.onnx")]}
    return {name: {"wall_s": wall, "peak_mb": mb} for name, (wall, mb) in interleaved(commands, rounds).items()}


def interleaved(commands: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Each command line (``commands[label](round) -> argv``) run once per round, rounds alternating
    the commands, after a warm-up round: the median wall seconds and peak MB per label."""
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for i in range(rounds + 1):
        for name, argv in commands.items():
            wall_mb = _run(argv(i))
            if i:
                runs[name].append(wall_mb)
    return {k: (float(np.median([w for w, _ in r])), float(np.median([m for _, m in r]))) for k, r in runs.items()}


def cost_lines(cost: dict[str, dict[str, float]]) -> list[str]:
    b, a = cost[BNRT], cost[ALTERNATIVE]
    return [f"- `bnrt fold` (load, fold, export, check): {b['wall_s']:.2f} s, peak {b['peak_mb']:.0f} MB",
            f"- {ALTERNATIVE} (`python -m tools.fx_fuse_export`): {a['wall_s']:.2f} s, peak {a['peak_mb']:.0f} MB",
            f"- ratio: wall {b['wall_s'] / a['wall_s']:.2f}, peak memory {b['peak_mb'] / a['peak_mb']:.2f} (target ≤ 1.3 each)"]


PIPELINE_MODELS = {"resnet50": "ResNet-50 (models.zoo.ResNet50, 25.6M parameters, 1x3x224x224)",
                   "resnet": "the zoo's ResNet (0.7M parameters, 1x3x32x32)"}


def trained_statistics(model: torch.nn.Module, batch: int, size: int = 224) -> torch.nn.Module:
    """``model`` in eval mode, its BN statistics those of one training pass (cumulative average) on
    ``batch`` random ``size``x``size`` images."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(batch, 3, size, size))
    return model.eval()


def resnet50_checkpoint(path: Path, arch_kwargs: dict | None = None, batch: int = 4) -> int:
    """A checkpoint of ``models.zoo.ResNet50(**arch_kwargs)`` at ``path``, 1x3x224x224, its BN
    statistics those of one training pass on ``batch`` random images; its parameter count."""
    from models.zoo import ResNet50

    torch.manual_seed(0)
    model = trained_statistics(ResNet50(**(arch_kwargs or {})), batch)
    torch.save({"state_dict": model.state_dict(), "arch": "models.zoo:ResNet50",
                **({"arch_kwargs": arch_kwargs} if arch_kwargs else {}), "input_shape": [1, 3, 224, 224]}, path)
    return sum(p.numel() for p in model.parameters())


def pipeline_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint of ``resnet50`` (statistics of random data) or the zoo's ``resnet``."""
    path = folder / f"{name}.pt"
    if name == "resnet50":
        resnet50_checkpoint(path)
    else:
        torch.save({"state_dict": build("resnet").eval().state_dict(), "arch": "models.zoo:ResNet",
                    "input_shape": list(ZOO["resnet"].input_shape)}, path)
    return path


def pipeline_section(name: str, rounds: int) -> tuple[dict, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        cost = pipeline_cost(pipeline_checkpoint(name, Path(tmp)), Path(tmp), rounds)
    return cost, [f"Fold pipeline cost on {PIPELINE_MODELS[name]}: command lines, medians of {rounds} alternating "
                  "runs after a warm-up round:", "", *cost_lines(cost)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ZOO))
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of the pipeline comparison")
    parser.add_argument("--pipeline-model", choices=sorted(PIPELINE_MODELS), default="resnet50",
                        help="checkpoint of the pipeline comparison (default resnet50)")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="only the fold pipeline's cost on a ResNet-50-sized model, printed")
    args = parser.parse_args()
    if args.pipeline_only:
        print("\n".join(pipeline_section(args.pipeline_model, args.rounds)[1]))
        return
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    reports = []
    for name in args.models:
        reports.append(bench_model(build(name), ZOO[name].input_shape, name=name, batch_sizes=batches,
                                   threads=args.threads, repeats=args.repeats, iterations=args.iterations))
        print(markdown(reports[-1]))
    cost, cost_text = pipeline_section(args.pipeline_model, args.rounds)
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
    headline += ["", *cost_text]
    env = environment(args.threads)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    write_json(docs / "benchmarks.json", {"environment": env, "pipeline_cost": cost,
                                          "reports": [r.to_json() for r in reports]})
    plot(reports, docs / "benchmarks.png")
    text = ("# Benchmarks\n\n" + provenance("python -m tools.bench") + " " + ", ".join(f"{k} {v}" for k, v in env.items())
            + f"; {args.repeats} interleaved rounds × {args.iterations} calls per variant and batch.\n\n"
            + "\n".join(headline) + "\n\n![median latency](benchmarks.png)\n\n## Per model\n\n"
            + "\n".join(markdown(r) for r in reports))
    kept = sections(docs / "BENCHMARKS.md")  # the mutation and image-folder benchmarks' own sections
    write_text(docs / "BENCHMARKS.md", text + ("\n\n" + kept if kept else ""))
    print("\n".join(headline))
    print(f"\nwrote {docs / 'BENCHMARKS.md'}, benchmarks.json, benchmarks.png")


if __name__ == "__main__":
    main()
