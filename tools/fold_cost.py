"""What `bnrt fold` costs as models grow: wall time and peak resident memory of `bnrt fold M.pt`
with and without its check, against exporting the same model alone, on four sizes.

    python -m tools.fold_cost [--models resnet14 resnet50 resnet152 wide_resnet101_2] [--rounds 1]
                              [--write docs/BENCHMARKS.md]
    .venv-zoo/bin/python -m tools.fold_cost --models timm/resnet18 timm/resnet50 timm/resnet152 timm/regnety_160

Models: torchvision's ResNet layouts built by models.zoo.ResNet50 (10.1M, 25.6M, 60.2M and 126.9M
parameters), or timm's models (``timm/NAME``, in .venv-zoo: a pickled nn.Module folded with
--trust-pickle), 1x3x224x224, BN statistics from a training pass on random data. Each command runs as
a process of its own (peak RSS: its ``ru_maxrss``), the three commands of a model one after the
other, rounds interleaved, after a warm-up run of each; medians. "export alone" loads the same
checkpoint, builds the model (or unpickles it) and runs ``torch.onnx.export(dynamo=True)`` with a
dynamic batch axis (``python -m tools.fx_fuse_export CKPT OUT --no-fuse``). Below the table, bnrt's own steps from its
report: seconds per step and the peak memory when each step ended (a step that raised it shows).
Goals (#28): with its check <= 1.3x the wall time and the peak RSS of export alone, --no-check
<= 1.1x and <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tools.bench import interleaved, resnet50_checkpoint, trained_statistics
from tools.provenance import provenance, write_section

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- fold-cost -->"
TIMM_MARK = "<!-- fold-cost-timm -->"  # the timm models' section (measured in .venv-zoo)
MODELS = {  # name -> ResNet50 keyword arguments
    "resnet14": {"counts": [1, 1, 1, 1]},
    "resnet50": {},
    "resnet152": {"counts": [3, 8, 36, 3]},
    "wide_resnet101_2": {"counts": [3, 4, 23, 3], "wide": 2},
}
TIMM = ["timm/resnet18", "timm/resnet50", "timm/resnet152", "timm/regnety_160"]  # the issue's own table
SHAPE = "1,3,224,224"


def timm_checkpoint(path: Path, name: str, batch: int = 2) -> int:
    """timm's ``name`` (random weights, BN statistics of one training pass on ``batch`` random
    images) pickled whole at ``path``; its parameter count."""
    import timm
    import torch

    torch.manual_seed(0)
    model = trained_statistics(timm.create_model(name, pretrained=False), batch)
    torch.save(model, path)
    return sum(p.numel() for p in model.parameters())


def measure(name: str, rounds: int, tmp: Path) -> dict:
    stem = name.replace("/", "_")
    ckpt = tmp / f"{stem}.pt"
    if name in TIMM:
        params = timm_checkpoint(ckpt, name.split("/", 1)[1])
        trust = alone_trust = ["--trust-pickle", "--input-shape", SHAPE]
    else:
        params = resnet50_checkpoint(ckpt, MODELS[name], batch=2)
        trust, alone_trust = ["--trust-code"], []
    commands = {
        "export alone": lambda i: [sys.executable, "-m", "tools.fx_fuse_export", str(ckpt),
                                   str(tmp / f"alone{i}.onnx"), "--no-fuse", *alone_trust],
        "bnrt fold --no-check": lambda i: [sys.executable, "-m", "bnrt", "fold", str(ckpt), *trust, "-q",
                                           "--no-check", "-o", str(tmp / f"nocheck{i}")],
        "bnrt fold": lambda i: [sys.executable, "-m", "bnrt", "fold", str(ckpt), *trust, "-q",
                                "-o", str(tmp / f"check{i}")],
    }
    medians = interleaved(commands, rounds)
    steps = {}
    for label, folder in (("bnrt fold --no-check", "nocheck"), ("bnrt fold", "check")):
        report = json.loads((tmp / f"{folder}{rounds}" / f"{stem}.report.json").read_text())
        steps[label] = (report["timings_s"], report.get("peak_rss_mb", {}))
    return {"name": name, "params": params, "medians": medians, "steps": steps}


def table(results: list[dict]) -> list[str]:
    lines = ["| model | params | export alone s / MB | bnrt fold --no-check s / MB | bnrt fold s / MB | "
             "--no-check wall / RSS ratio | check wall / RSS ratio |", "|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["medians"]
        alone, nocheck, check = m["export alone"], m["bnrt fold --no-check"], m["bnrt fold"]
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} M | {alone[0]:.1f} / {alone[1]:.0f} | "
                     f"{nocheck[0]:.1f} / {nocheck[1]:.0f} | {check[0]:.1f} / {check[1]:.0f} | "
                     f"{nocheck[0] / alone[0]:.2f} / {nocheck[1] / alone[1]:.2f} | "
                     f"{check[0] / alone[0]:.2f} / {check[1] / alone[1]:.2f} |")
    lines += ["", "bnrt's steps (last round; seconds, and the peak MB when the step ended):", ""]
    for r in results:
        for label, (timings, peaks) in r["steps"].items():
            lines.append(f"- {r['name']}, `{label}`: " + ", ".join(
                f"{k} {v:.1f} s / {peaks.get(k, float('nan')):.0f}" for k, v in timings.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, *TIMM])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write", metavar="FILE.md", help="replace the fold-cost section of FILE.md")
    args = parser.parse_args()
    if args.write and len({m in TIMM for m in args.models}) > 1:
        parser.error("--write: timm's models and the ResNet layouts go to sections of their own; measure them apart")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results.append(measure(name, args.rounds, Path(tmp)))
            print(f"measured {name}", file=sys.stderr, flush=True)
    lines = table(results)
    print("\n".join(lines))
    if args.write:
        mark = TIMM_MARK if all(m in TIMM for m in args.models) else MARK
        text = "\n".join([mark, f"## Fold cost as models grow ({', '.join(args.models)})", "",
                          provenance("python -m tools.fold_cost"), "", __doc__.split("\n\n", 2)[2].strip(), "",
                          *lines, mark])
        write_section(Path(args.write), mark, text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
