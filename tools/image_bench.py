"""Peak memory and throughput of `bnrt check` on a folder of JPEG images, side by side in one run.

    python -m tools.image_bench [--small 2000] [--large 20000] [--heavy 512] [--workers 2] [--batch-size 32]
                                [--write docs/BENCHMARKS.md]

Writes ``--large`` random 224x224 RGB JPEG files in 10 class folders (the first ``--small`` of them
also linked into a second folder, the first ``--heavy`` into a third), exports two nets to ONNX (a
small conv net: stride-4 stem, four conv layers, global pool, Linear; and models.zoo.ResNet50,
torchvision's ResNet-50 layout) and runs, each as its own process:
- ``bnrt check net.onnx net.onnx --data DIR`` with the small net on the small and on the large folder:
  wall time and peak RSS (the process's ``ru_maxrss``); the images are decoded batch by batch, so
  the peak should not grow with the folder;
- the same with ResNet-50 on the ``--heavy`` folder;
- onnxruntime alone, for each net, on images decoded beforehand (cycled), as many model runs as
  the check made (reference and candidate over every sample): model runs per second.
Prints a markdown table and the throughput ratio (check / ORT alone) per net: with the small net
decoding JPEG files bounds the check, with ResNet-50 the model does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from tools.provenance import provenance, write_section

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- images -->"


def _images(root: Path, count: int, subsets: dict[Path, int]) -> None:
    """``count`` distinct JPEG files in 10 class folders; each subset folder links the first ones."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for i in range(count):
        folder, name = f"c{i % 10}", f"{i:06d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        pixels = np.roll(base, i, axis=1) ^ np.uint8(i % 251)  # distinct images, cheap to make
        Image.fromarray(pixels).save(root / folder / name, quality=90)
        for other, size in subsets.items():
            if i < size:
                (other / folder).mkdir(parents=True, exist_ok=True)
                os.link(root / folder / name, other / folder / name)


def _net(path: Path, kind: str) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "small":
        layers = [nn.Conv2d(3, 16, 4, 4), nn.BatchNorm2d(16), nn.ReLU()]
        for cin, cout in ((16, 32), (32, 32), (32, 64), (64, 64)):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU()]
        model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    else:
        from models.zoo import ResNet50

        model = ResNet50(classes=10).eval()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})


def _measured(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of ``cmd`` run as its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out


ORT_ALONE = """
import sys, time, numpy as np, onnxruntime as ort
from pathlib import Path
from bnrt.io.images import load_images, Preprocess
images, _, _ = load_images(Path(sys.argv[2]), (1, 3, 224, 224), Preprocess())
x = images[:int(sys.argv[4])]  # decoded beforehand (all of a large folder would not fit in memory)
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
start, batch, total = time.perf_counter(), int(sys.argv[3]), int(sys.argv[5])
for done in range(0, total, batch):
    i = done % len(x)
    session.run(None, {"x": x[i:i + batch]})
print(f"RATE {total / (time.perf_counter() - start):.1f}")
"""


def _check(net: Path, folder: Path, args) -> tuple[float, float]:
    wall, rss, _ = _measured([sys.executable, "-m", "bnrt", "check", str(net), str(net), "--data", str(folder),
                              "--workers", str(args.workers), "--batch-size", str(args.batch_size),
                              "--no-localise"])
    return wall, rss


def _alone(net: Path, folder: Path, count: int, runs: int, batch: int) -> tuple[float, float, float]:
    wall, rss, out = _measured([sys.executable, "-c", ORT_ALONE, str(net), str(folder), str(batch), str(count),
                                str(runs)])
    return wall, rss, float(next(line for line in out.splitlines() if line.startswith("RATE")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--heavy", type=int, default=512, help="images checked with ResNet-50")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--write", metavar="FILE", help="replace the image-folder section of FILE (docs/BENCHMARKS.md)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        _images(tmp / "large", args.large, {tmp / "small": args.small, tmp / "heavy": args.heavy})
        made = time.perf_counter() - start
        for kind in ("small", "resnet50"):  # in a process of its own: a child's ru_maxrss starts at the
            # parent's size when it forks, and torch would make this one large
            subprocess.run([sys.executable, "-c", f"from tools.image_bench import _net; from pathlib import Path; "
                            f"_net(Path({str(tmp / (kind + '.onnx'))!r}), {kind!r})"], cwd=ROOT, check=True)
        rows, ratios = [], []
        for kind, folders in (("small", ("small", "large")), ("resnet50", ("heavy",))):
            net = tmp / f"{kind}.onnx"
            for folder in folders:
                count = getattr(args, folder)
                wall, rss = _check(net, tmp / folder, args)
                rows.append((f"bnrt check, {kind} net, {count:,} images, {args.workers} workers", wall, rss,
                             2 * count / wall))
            count = getattr(args, folders[-1])
            wall, rss, speed = _alone(net, tmp / folders[0], min(count, args.small), 2 * count, args.batch_size)
            rows.append((f"onnxruntime alone, {kind} net, {2 * count:,} runs on images decoded beforehand", wall,
                         rss, speed))
            ratios.append(f"{kind} net {rows[-2][3] / speed:.2f}")
    lines = [MARK, "## Checks on image folders: peak memory and throughput", "",
             provenance("python -m tools.image_bench --write docs/BENCHMARKS.md"), "",
             f"{args.large:,} JPEG files (224x224, 10 class folders) written in {made:.0f} s; `bnrt check net.onnx "
             f"net.onnx --data DIR --workers {args.workers} --batch-size {args.batch_size}`, each run its own "
             f"process; {os.cpu_count()} cores. Throughput: model runs per second (the check runs reference and "
             "candidate on every sample; its wall time includes start-up, the noise floor and the report), "
             "against onnxruntime alone on the same images decoded beforehand.", "",
             "| run | wall s | peak RSS MB | model runs/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {wall:.1f} | {rss:.0f} | {speed:.0f} |" for name, wall, rss, speed in rows]
    lines += ["", f"Peak RSS, {args.large:,} / {args.small:,} images: {rows[1][2] / rows[0][2]:.2f}. Throughput, "
              f"bnrt check / onnxruntime alone: {'; '.join(ratios)}.", MARK]
    print("\n".join(lines))
    if args.write:
        write_section(Path(args.write), MARK, "\n".join(lines))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
