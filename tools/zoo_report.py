"""Fold every zoo model and report what happened and how exact it is.

    python -m tools.zoo_report [-o docs/ZOO.md] [--samples 16]

Per model: BatchNorm count, folded, skipped by reason, BatchNormalization nodes left in bnrt's
ONNX, the folded float32 model's max abs / max rel error against the unfolded float32 model and
ONNX on ORT CPU against the unfolded model, the error ratio (folded float32 vs a float64 reference,
divided by the unfolded float32 model's own error against it), the worst ULP distance of folded
weights and biases from the exact fold (float64, rounded once) for bnrt and for torch.fx's
``fuse`` (conv -> BN only), bnrt's fold time (capture + plan + fold, after a warm-up), and the
BatchNormalization nodes the TorchScript exporter leaves in the unfolded model's ONNX before and
after ``bnrt fold model.onnx``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import bnrt
from bnrt.folding.capture import quiet
from bnrt.io.export import count_ops, export_onnx, input_names, output_names
from bnrt.folding.onnxfold import fold_onnx
from bnrt.session import Session
from bnrt.io.save import write_text
from tools.provenance import provenance
from models.zoo import ZOO, build


def max_ulp(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |got - exact| in units of the float32 spacing at |exact|."""
    e = exact.detach().numpy()
    g = got.detach().double().numpy()
    spacing = np.spacing(np.abs(e).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(g - e) / spacing)) if e.size else 0.0


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (a.double() - ref.double()).abs()
    floor = 1e-3 * float(ref.abs().max())
    return float(diff.max()), float((diff / ref.double().abs().clamp_min(floor)).max())


def worst_ulp(modules: dict[str, nn.Module], exact: nn.Module, layers) -> tuple[float, float] | None:
    """Worst (weight, bias) ULP distance of ``modules[layer]`` from ``exact``'s, over ``layers``."""
    pairs = [(modules[n], exact.get_submodule(n)) for n in layers if n in modules and modules[n].bias is not None]
    if not pairs:
        return None
    return (max(max_ulp(got.weight, ref.weight) for got, ref in pairs),
            max(max_ulp(got.bias, ref.bias) for got, ref in pairs))


def fx_fuse_ulp(model: nn.Module, exact: nn.Module, result) -> tuple[float, float] | None:
    """torch.fx's fuse on the conv -> BN placements it handles (merged rep blocks left out: their
    kernels are the sum of branches, which fuse does not do); None where layers were unshared (fuse
    folds one BN into the shared conv, the others not at all)."""
    if result.unshared:
        return None
    try:
        fused = fuse(copy.deepcopy(model))
    except Exception:
        return None
    merged = {layer.name for m in result.merges for layer in (m.target, *m.convs)}
    return worst_ulp(dict(fused.named_modules()), exact, [d.into[0] for d in result.decisions
                                                          if d.rule == "conv->bn" and d.into[0] not in merged])


def report_model(name: str, samples: int, workdir: Path) -> dict:
    entry = ZOO[name]
    model = build(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(samples, *entry.input_shape[1:], generator=gen)
    bnrt.fold(model, (x[:2],), unshare=entry.unshare)  # warm-up: first fx trace of a class is slower
    start = time.perf_counter()
    result = bnrt.fold(model, (x[:2],), unshare=entry.unshare)
    fold_s = time.perf_counter() - start
    exact = bnrt.fold(copy.deepcopy(model).double(), (x[:2].double(),), unshare=entry.unshare).model
    ulp = worst_ulp(dict(result.model.named_modules()), exact, sorted({n for d in result.folded for n in d.into}))
    with torch.no_grad():
        ref32, fold32 = model(x), result.model(x)
        ref64 = copy.deepcopy(model).double()(x.double())
    err_unfolded = float((ref32.double() - ref64).abs().max())
    err_folded = float((fold32.double() - ref64).abs().max())
    onnx_path = workdir / f"{name}.onnx"
    names = (input_names(result.model, 1), output_names(1))
    proto = export_onnx(result.model, (x[:2],), onnx_path, names=names)
    (ort_out,) = Session(onnx_path).run([x.numpy()])
    reasons = collections.Counter(" / ".join(d.codes) for d in result.skipped)
    ts_before, ts_after = torchscript_bn_counts(model, x, workdir, name)
    return {
        "model": name,
        "bn": len(result.decisions),
        "folded": len(result.folded),
        "skipped": sum(reasons.values()),
        "reasons": dict(reasons),
        "bn_nodes_onnx": count_ops(proto, "BatchNormalization"),
        "torch_err": rel_err(fold32, ref32),
        "ort_err": rel_err(torch.from_numpy(ort_out), ref32),
        "error_ratio": err_folded / err_unfolded if err_unfolded else float("nan"),
        "ulp_bnrt": ulp,
        "ulp_fx": fx_fuse_ulp(model, exact, result),
        "fold_s": fold_s,
        "ts_bn": (ts_before, ts_after),
        "params": sum(p.numel() for p in model.parameters()),
    }


def torchscript_bn_counts(model: nn.Module, x: torch.Tensor, workdir: Path, name: str) -> tuple[int, int]:
    """BatchNormalization nodes in the TorchScript exporter's ONNX of the unfolded model, before and
    after bnrt's ONNX folder (the exporter fuses plain conv -> BN itself)."""
    path = workdir / f"{name}.ts.onnx"
    with quiet():
        torch.onnx.export(model, (x[:2],), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    proto = onnx.load(str(path))
    return count_ops(proto, "BatchNormalization"), count_ops(fold_onnx(proto).model, "BatchNormalization")


def markdown(rows: list[dict]) -> str:
    head = ("| model | params | BN | folded | skipped | BN nodes in ONNX | folded vs torch max abs / rel | "
            "ORT vs torch max abs / rel | error ratio vs fp64 | max ULP bnrt (w / b) | max ULP fx fuse (w / b) | fold ms | "
            "TorchScript ONNX BN nodes: before → after `bnrt fold x.onnx` |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        ulp = {k: "-" if r[k] is None else f"{r[k][0]:.2f} / {r[k][1]:.2f}" for k in ("ulp_bnrt", "ulp_fx")}
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['bn']} | {r['folded']} | {r['skipped']} | {r['bn_nodes_onnx']} | "
            f"{r['torch_err'][0]:.2e} / {r['torch_err'][1]:.2e} | {r['ort_err'][0]:.2e} / {r['ort_err'][1]:.2e} | "
            f"{r['error_ratio']:.2f} | {ulp['ulp_bnrt']} | {ulp['ulp_fx']} | {1000 * r['fold_s']:.0f} | "
            f"{r['ts_bn'][0]} → {r['ts_bn'][1]} |")
    lines.append("")
    lines.append("Skipped BatchNorms by refusal code (backward / forward, or the BN's own; `bnrt/folding/decision.py` CODES):")
    lines.append("")
    for r in rows:
        for reason, count in r["reasons"].items():
            lines.append(f"- {r['model']}: {count} × {reason}")
    if not any(r["reasons"] for r in rows):
        lines.append("- none")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="docs/ZOO.md")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("models", nargs="*", default=list(ZOO))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [report_model(name, args.samples, Path(tmp)) for name in args.models]
    table = markdown(rows)
    print(table)
    doc = (
        "# Zoo report\n\n" + provenance("python -m tools.zoo_report")
        + f" {args.samples} random samples per model, 1 thread.\n\n"
        "- *error ratio*: max |folded fp32 − fp64 reference| / max |unfolded fp32 − fp64 reference|; "
        "1 means folding added no error beyond float32's own.\n"
        "- *max ULP*: worst distance of folded weights/biases from the exact fold (float64, rounded once), "
        "in float32 ULPs; 0.5 is the best any float32 result can be.\n"
        "- *fx fuse*: `torch.fx.experimental.optimization.fuse` on the same model (conv → BN only).\n\n"
        + "\n".join(f"- **{n}**: {ZOO[n].description}" for n in args.models) + "\n\n" + table + "\n"
    )
    write_text(Path(args.output), doc)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
