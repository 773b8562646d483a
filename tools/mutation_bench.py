"""Mutation benchmark of bnrt's check: how small an error in a folded layer it catches.

    python -m tools.mutation_bench [--models NAME ...] [--eps 1e-2,1e-3,1e-4,1e-5,1e-6] [--samples 16]
                                   [--write docs/BENCHMARKS.md]

Per model (the zoo's, and ``resnet50``: models.zoo.ResNet50 at 1x3x224x224): ``bnrt fold`` with its
check (unmodified: a failure is a false alarm); then, in the ONNX file it wrote, one output
channel (weights and bias) of one folded layer scaled by (1 + ε): the first, middle and last folded
layer, and the first merged rep block's conv. Each corrupted file is checked against the original
model as ``bnrt check model.pt corrupted.onnx`` would (same data, same criterion), and certified
(``bnrt.verify.certify``) as ``bnrt fold`` certifies what it writes. Prints, per model and way of
catching, the smallest ε caught on every layer tried (every larger ε caught too):

- *outputs*: the model outputs against the noise floor (what the check judged before per-layer);
- *per-layer*: outputs and every module output against its own floor (the check's default now);
- *certificate*: the folded weights against the exact fold, within half an ULP.

``--write FILE`` replaces the section between ``<!-- mutation -->`` markers in FILE (appended
when missing), with the table and the provenance line.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import bnrt
from bnrt.folding.capture import capture, quiet
from bnrt.folding.torchfold import apply
from bnrt.folding.torchgraph import plan
from bnrt.io.source import ModelSource
from bnrt.pipeline.convert import torch_certificate
from bnrt.verify.check import CheckOptions, check, inputs_for, side
from bnrt.verify.sides import Side
from bnrt.verify.metrics import NoiseReference
from bnrt.io.data import InputSpec
from tools.provenance import provenance, write_section
from models.zoo import ZOO, ResNet50, build

MARK_START, MARK_END = "<!-- mutation -->", "<!-- /mutation -->"
WAYS = ("outputs", "per-layer", "certificate")


def resnet50() -> torch.nn.Module:
    """models.zoo.ResNet50 with statistics from two training-mode batches and random γ/β."""
    torch.manual_seed(0)
    model = ResNet50()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.weight.copy_(torch.rand(m.num_features) + 0.5)
                m.bias.copy_(torch.randn(m.num_features) * 0.2)
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 224, 224))
    return model.eval()


def _memo(run):
    """``run`` remembering its result per input batch (by buffer address and shape) and arguments."""
    seen = {}

    def call(xs, *args):
        key = (tuple((x.__array_interface__["data"][0], x.shape) for x in xs),
               tuple(tuple(sorted(a)) if isinstance(a, (set, frozenset)) else a for a in args))
        if key not in seen:
            seen[key] = run(xs, *args)
        return seen[key]
    return call


def cached(reference: Side) -> Side:
    """The reference side with its runs, taps and noise runs computed once per input batch."""
    noise = reference.noise
    return Side(**{**vars(reference), "runner": _memo(reference.runner), "taps": _memo(reference.taps),
                   "noise": NoiseReference(noise.kind, _memo(noise.runner), _memo(noise.taps))})


def corrupt(proto: onnx.ModelProto, layer, eps: float) -> onnx.ModelProto:
    """A copy with output channel 0 of ``layer`` (weights and bias) scaled by 1 + eps."""
    bad = copy.deepcopy(proto)
    for init in bad.graph.initializer:
        if init.name not in (f"{layer.name}.weight", f"{layer.name}.bias"):
            continue
        value = numpy_helper.to_array(init).copy()
        if init.name.endswith(".weight") and layer.kind == "conv-transpose":
            value[:, 0] *= np.float32(1 + eps)
        else:
            value[0] *= np.float32(1 + eps)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    return bad


def targets(planned, proto: onnx.ModelProto) -> list[tuple[str, object]]:
    """(label, layer): the first, middle and last folded layer the ONNX file stores under its
    parameter names with a non-zero channel 0, and the first merged rep block's conv."""
    stored = {t.name: t for t in proto.graph.initializer}
    layers = {}
    for decision in planned.decisions:
        for target in decision.targets if decision.folded and decision.direction != "merge" else ():
            layers.setdefault(target.layer, target.handle)
    usable = [layer for name, layer in layers.items() if f"{name}.weight" in stored
              and np.any(numpy_helper.to_array(stored[f"{name}.weight"])[0])]
    picked = [("first", usable[0]), ("middle", usable[len(usable) // 2]), ("last", usable[-1])] if usable else []
    merged = [m.target for m in planned.merges if f"{m.target.name}.weight" in stored]
    unique = {}
    for label, layer in picked + ([("rep block", merged[0])] if merged else []):
        unique.setdefault(layer.name, (label, layer))
    return list(unique.values())


def smallest_caught(caught: dict[float, bool]) -> float | None:
    """The smallest ε caught with every larger ε caught too (None: the largest was missed)."""
    smallest = None
    for eps in sorted(caught, reverse=True):
        if not caught[eps]:
            break
        smallest = eps
    return smallest


def run_model(name: str, model: torch.nn.Module, shape: tuple[int, ...], eps_list: list[float],
              samples: int, workdir: Path) -> dict:
    path = workdir / f"{name}.pt"
    torch.save(model, path)
    source = ModelSource(path, trust_pickle=True, input_shapes=[shape])
    options = CheckOptions(InputSpec(samples=samples))
    outcome = bnrt.fold_file(source, workdir / name, check=options)
    proto = onnx.load(str(workdir / name / f"{name}.onnx"))
    reference = cached(side(model, input_shapes=[shape]))
    data, _ = inputs_for(reference, [], options, name)
    example = tuple(torch.from_numpy(x[:2].copy()) for x in data.inputs)
    with quiet():
        cap = capture(model, example)
        planned = plan(cap)
        folded = apply(model, planned, cap).model
    rows = []
    for label, layer in targets(planned, proto):
        caught = {way: {} for way in WAYS}
        for eps in eps_list:
            bad = corrupt(proto, layer, eps)
            report = check(reference, [bad.SerializeToString()], data, options)
            comparison = report.comparisons[0]
            caught["outputs"][eps] = not all(o.passed for o in comparison.outputs)
            caught["per-layer"][eps] = not comparison.passed
            caught["certificate"][eps] = not torch_certificate(planned, model, bad, folded).passed
        rows.append({"target": f"{label} '{layer.name}'", **{w: smallest_caught(caught[w]) for w in WAYS}})
        print(f"  {name} {rows[-1]}", flush=True)
    layers = outcome.check.comparisons[0].layers  # the folded torch model, compared layer by layer
    return {"model": name, "false_alarm": not outcome.passed, "rows": rows, "margin": layers.margin if layers else None,
            "certificate_ulp": outcome.check.certificate.worst.worst_ulp if outcome.check.certificate.layers else None}


def _eps(x: float | None) -> str:
    return "missed" if x is None else f"{x:.0e}"


def markdown(results: list[dict], eps_list: list[float], samples: int) -> str:
    lines = [MARK_START, "## Mutation benchmark: what the check catches", "",
             provenance("python -m tools.mutation_bench --write docs/BENCHMARKS.md"), "",
             f"One output channel (weights and bias) of one folded layer of bnrt's ONNX scaled by (1 + ε), ε in "
             f"{', '.join(f'{e:.0e}' for e in eps_list)}; {samples} random samples, the default noise-aware "
             "criterion (factor 8). The smallest ε caught on every layer tried (every larger one caught too), "
             "by the output comparison alone, by outputs and per-layer comparison (the default), and by the "
             "weight certificate; false alarm: the unmodified fold failed its check. Per-layer margin: the "
             "unmodified fold's worst module output, as a fraction of its allowance (1 fails).", "",
             "| model | layer | outputs | per-layer | certificate |", "|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['model']} | {row['target']} | " + " | ".join(_eps(row[w]) for w in WAYS) + " |")
    lines += ["", "| model | false alarm | unmodified: per-layer margin | unmodified: worst ULP |",
              "|---|---|---|---|"]
    for r in results:
        margin = "-" if r["margin"] is None else f"{r['margin']:.3f}"
        ulp = "-" if r["certificate_ulp"] is None else f"{r['certificate_ulp']:.2f}"
        alarm = "YES" if r["false_alarm"] else "no"
        lines.append(f"| {r['model']} | {alarm} | {margin} | {ulp} |")
    every = []
    for way in WAYS:
        found = [row[way] for r in results for row in r["rows"]]
        every.append(f"{way} " + ("missed somewhere" if None in found else _eps(max(found, default=None))))
    alarms = sum(r["false_alarm"] for r in results)
    lines += ["", f"Smallest ε caught on every layer of every model: {', '.join(every)}; "
              f"false alarms {alarms} of {len(results)}.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[*ZOO, "resnet50"])
    parser.add_argument("--eps", default="1e-2,1e-3,1e-4,1e-5,1e-6")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--write", metavar="FILE", help="replace the mutation section of FILE (docs/BENCHMARKS.md)")
    args = parser.parse_args()
    eps_list = [float(e) for e in args.eps.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, shape = (resnet50(), (1, 3, 224, 224)) if name == "resnet50" else (build(name), ZOO[name].input_shape)
            with quiet():
                results.append(run_model(name, model, shape, eps_list, args.samples, Path(tmp)))
    section = markdown(results, eps_list, args.samples)
    print(section)
    if args.write:
        write_section(Path(args.write), MARK_START, section, MARK_END)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
