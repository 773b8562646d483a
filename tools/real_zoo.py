"""bnrt on architectures nobody here wrote: torchvision and timm models, random weights with
randomised BatchNorm statistics. Runs in the zoo environment (``make zoo``: .venv-zoo with
torchvision and timm), never in ``make test``.

    python -m tools.real_zoo [-o docs/REAL_ZOO.md] [--samples 8] [--timeout 900] [NAME ...]
    python -m tools.real_zoo --rows ROWS.jsonl --remeasure NAME ...   # re-measure rows of a full run

A run writes every row as a JSON line to ``--jsonl`` (and prints it on stderr); ``--rows`` rebuilds
the doc from such lines, measuring again only the ``--remeasure`` models with the current code; the doc
keeps the full run's header and says which rows were re-measured, at which commit.

Statistics: two training-mode passes over random batches (cumulative averages, so activations stay
O(1) as after training), then perturbed; gamma, beta and frozen-BN statistics random.

Per model, in its own subprocess (a model that hangs or crashes costs one row): BatchNorm-like
layers (bnrt's decisions), folded by bnrt, BN-like nodes left in bnrt's ONNX, left by
``torch.onnx.export`` (dynamo) of the unfolded model alone and by torch.fx ``fuse``, kept BNs by
refusal code, bnrt's check (torch unfolded vs folded vs ORT CPU, the noise-aware criterion), ORT's error
against eager float32, and bnrt's fold time (capture + plan + fold). BN-like ONNX nodes are
``BatchNormalization`` and a per-channel constant ``Mul`` straight after a Conv/Gemm/MatMul (what a
frozen BN exports to).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHIPPED = "<!-- shipped -->"  # where tools.shipped_zoo's section of the doc starts (kept by a rebuild)

# (source, name, family, input size)
MODELS: list[tuple[str, str, str, int]] = [
    ("tv", "resnet50", "ResNet", 224), ("tv", "resnext50_32x4d", "ResNeXt", 224),
    ("tv", "regnet_y_400mf", "RegNet", 224), ("tv", "efficientnet_b0", "EfficientNet", 224),
    ("tv", "efficientnet_v2_s", "EfficientNetV2", 224), ("tv", "mobilenet_v2", "MobileNetV2", 224),
    ("tv", "mobilenet_v3_large", "MobileNetV3", 224), ("tv", "densenet121", "DenseNet", 224),
    ("tv", "inception_v3", "Inception", 299), ("tv", "googlenet", "Inception", 224),
    ("tv", "shufflenet_v2_x1_0", "ShuffleNet", 224), ("tv", "mnasnet1_0", "MNASNet", 224),
    ("tv", "vgg11_bn", "VGG", 224), ("tv", "resnet50_frozenbn", "detection backbone (FrozenBatchNorm2d)", 224),
    ("timm", "resnet50d", "ResNet", 224), ("timm", "resnetv2_50", "ResNetV2 (pre-activation)", 224),
    ("timm", "regnety_002", "RegNet", 224), ("timm", "efficientnet_b0", "EfficientNet", 224),
    ("timm", "efficientnetv2_rw_t", "EfficientNetV2", 224), ("timm", "mobilenetv3_large_100", "MobileNetV3", 224),
    ("timm", "mobilenetv4_conv_small", "MobileNetV4", 224), ("timm", "ghostnet_100", "GhostNet", 224),
    ("timm", "ghostnetv2_100", "GhostNet", 224), ("timm", "repvgg_a0", "RepVGG", 224),
    ("timm", "repvgg_b0", "RepVGG", 224), ("timm", "mobileone_s0", "MobileOne", 224),
    ("timm", "mobileone_s1", "MobileOne", 224), ("timm", "fastvit_t8", "FastViT", 256),
    ("timm", "fastvit_sa12", "FastViT", 256), ("timm", "levit_128s", "LeViT", 224),
    ("timm", "levit_conv_128s", "LeViT", 224), ("timm", "efficientvit_b0", "EfficientViT (MIT)", 224),
    ("timm", "efficientvit_m0", "EfficientViT (MSRA)", 224), ("timm", "mobilevit_xxs", "MobileViT", 256),
    ("timm", "mobilevitv2_050", "MobileViT", 256), ("timm", "dla34", "DLA", 224),
    ("timm", "hrnet_w18_small", "HRNet", 224), ("timm", "densenet121", "DenseNet", 224),
    ("timm", "inception_v3", "Inception", 299), ("timm", "repvit_m0_9", "RepViT", 224),
    ("timm", "repghostnet_050", "RepGhost", 224), ("timm", "tiny_vit_5m_224", "TinyViT", 224),
    ("timm", "efficientformer_l1", "EfficientFormer", 224), ("timm", "cspresnet50", "CSPNet", 224),
    ("timm", "rexnet_100", "ReXNet", 224), ("timm", "lcnet_050", "LCNet", 224),
    ("timm", "dpn68", "DPN", 224), ("timm", "xception41", "Xception", 299),
    ("timm", "mixnet_s", "MixNet", 224), ("timm", "mobilenetv4_hybrid_medium", "MobileNetV4 (hybrid)", 224),
    ("timm", "efficientformerv2_s0", "EfficientFormerV2", 224),
]


def build(source: str, name: str, size: int = 224):
    import torch
    from torch import nn

    torch.manual_seed(0)  # the same random weights on every run
    if source == "tv":
        import torchvision
        if name == "resnet50_frozenbn":
            from torchvision.ops.misc import FrozenBatchNorm2d
            model = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        else:
            model = torchvision.models.get_model(name, weights=None, **({"aux_logits": False, "init_weights": False}
                                                                         if name in ("inception_v3", "googlenet") else {}))
    else:
        import timm
        model = timm.create_model(name, pretrained=False)
    gen = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():  # random gamma/beta, and statistics for frozen BNs (no training pass)
            buffers = dict(m.named_buffers(recurse=False))
            if "running_mean" in buffers and buffers["running_mean"] is not None and "running_var" in buffers:
                c = buffers["running_mean"].numel()
                weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(weight, torch.Tensor) and weight.shape == (c,):
                    weight.copy_(torch.rand(c, generator=gen) + 0.5)
                if isinstance(bias, torch.Tensor) and bias.shape == (c,):
                    bias.copy_(torch.randn(c, generator=gen) * 0.1)
                if m not in bns:
                    buffers["running_mean"].copy_(torch.randn(c, generator=gen) * 0.1)
                    buffers["running_var"].copy_(torch.rand(c, generator=gen) + 0.5)
        # statistics of random data, as after training (activations stay O(1)), then perturbed
        for m in bns:
            m.momentum = None
            m.reset_running_stats()
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=gen))
        for m in bns:
            if m.running_mean is not None:
                m.running_mean.add_(torch.randn(m.num_features, generator=gen) * 0.05)
                m.running_var.mul_(torch.rand(m.num_features, generator=gen) * 0.4 + 0.8)
    return model.eval(), nn


def bn_like_nodes(proto) -> int:
    """BatchNormalization nodes, plus per-channel constant Muls straight after a Conv/Gemm/MatMul."""
    from onnx import numpy_helper

    from bnrt.io.export import count_ops

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    producer = {o: n for n in proto.graph.node for o in n.output}
    mul_after_layer = 0
    for n in proto.graph.node:
        if n.op_type != "Mul":
            continue
        values = [inits.get(i, consts.get(i)) for i in n.input]
        data = [i for i, v in zip(n.input, values) if v is None]
        const = next((v for v in values if v is not None), None)
        if len(data) == 1 and const is not None and const.size > 1 and const.size == max(const.shape) and \
                data[0] in producer and producer[data[0]].op_type in ("Conv", "Gemm", "MatMul"):
            mul_after_layer += 1
    return count_ops(proto, "BatchNormalization") + mul_after_layer


def one(source: str, name: str, size: int, samples: int) -> dict:
    """Everything measured on one model (run in a subprocess by ``main``)."""
    import torch
    from torch.fx.experimental.optimization import fuse

    from bnrt.folding.capture import capture, quiet
    from bnrt.folding.torchfold import apply
    from bnrt.folding.torchgraph import plan
    from bnrt.io.artifacts import folds_of
    from bnrt.io.data import random_inputs
    from bnrt.io.export import export_onnx, flatten_outputs, output_names
    from bnrt.pipeline.convert import torch_certificate
    from bnrt.verify.check import check, side
    from bnrt.verify.sides import Candidate

    torch.set_num_threads(2)
    model, nn = build(source, name, size)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    row = {"source": source, "name": name, "params": sum(p.numel() for p in model.parameters())}
    start = time.perf_counter()
    cap = capture(model, (example,))
    planned = plan(cap)
    result = apply(model, planned, cap)
    row["fold_s"] = time.perf_counter() - start
    result.tracer = cap.tracer
    row["bn"] = len(result.decisions)
    row["folded"] = len(result.folded)
    row["codes"] = dict(collections.Counter(" / ".join(d.codes) for d in result.skipped))
    row["tracer"] = result.tracer
    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            outs = len(flatten_outputs(result.model(example)))
        start = time.perf_counter()
        proto = export_onnx(result.model, (example,), Path(tmp) / "f.onnx", names=(["x"], output_names(outs)))
        row["export_s"] = time.perf_counter() - start
        row["bn_left_bnrt"] = bn_like_nodes(proto)
        data = random_inputs([(1, 3, size, size)], samples, seed=2)
        folds = folds_of(planned.decisions, planned.merges)  # as bnrt fold checks: fold partners known
        # both compared layer by layer (bnrt fold compares the torch one; bnrt check an ONNX file)
        # as bnrt fold checks: the user-structured copy (the folded checkpoint's), and the ONNX file
        report = check(model, [Candidate(side(result.structured, label="torch folded"), head_only=True,
                                         per_layer=True), Path(tmp) / "f.onnx"], data,
                       output_names=output_names(outs), folds=folds)
        report.certificate = torch_certificate(planned, model, proto, result.model)
        row["check"] = report.passed
        row["outputs_pass"] = all(o.passed for c in report.comparisons for o in c.outputs)
        row["layers"] = [None if c.layers is None else [c.layers.points, c.layers.failed, c.layers.worst,
                                                        c.layers.margin] for c in report.comparisons]
        worst = report.certificate.worst
        row["certificate"] = [report.certificate.passed, len(report.certificate.layers),
                              worst.worst_ulp if worst else None, worst.layer if worst else None]
        onnx_cmp = report.comparisons[1].outputs[0]
        row["ort_err"] = (onnx_cmp.max_abs, onnx_cmp.max_rel)
        row["ratio"] = max(o.ratio or 0.0 for c in report.comparisons for o in c.outputs)
        row["folded_err"] = report.comparisons[0].outputs[0].max_abs
        try:
            with quiet():
                plain = torch.onnx.export(model, (example,), dynamo=True)
            row["bn_left_dynamo"] = bn_like_nodes(plain.model_proto)
        except Exception as exc:  # the exporter's own failure is a finding, not a crash of the report
            row["bn_left_dynamo"] = f"error: {type(exc).__name__}"
    try:
        fused = fuse(model)
        row["bn_left_fx"] = sum(1 for n in fused.graph.nodes if n.op == "call_module" and isinstance(
            fused.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)) + sum(
            1 for n in fused.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
    except Exception as exc:
        row["bn_left_fx"] = f"error: {type(exc).__name__}"
    return row


def _layers_and_weights(row: dict) -> str:
    """The per-layer comparison's worst margin and the certificate's worst ULP, where measured."""
    layers = [c for c in row.get("layers") or [] if c]
    text = ""
    if layers:
        worst = max(layers, key=lambda c: c[3] if c[3] is not None else -1)
        failed = sum(c[1] for c in layers)
        text += f"; layers {worst[3]:.2f}" + (f", {failed} beyond" if failed else "") if worst[3] is not None else ""
    if row.get("certificate") and row["certificate"][2] is not None:
        text += f"; {row['certificate'][2]:.2f} ULP" + ("" if row["certificate"][0] else " FAIL")
    return text


def markdown(rows: list[dict]) -> str:
    head = ("| model | family | params | BN-like | folded by bnrt | left in bnrt's ONNX | left by dynamo export | "
            "left by fx fuse | check (worst error / noise floor; per-layer worst margin, 1 fails; "
            "weights' worst ULP) | ORT vs eager max abs / rel | fold s | "
            "kept BNs by refusal code |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['source']}:{r['name']} | {r['family']} | | | | | | | error | | | {r['error']} |")
            continue
        codes = "; ".join(f"{n}× {c}" for c, n in r["codes"].items()) or "-"
        lines.append(
            f"| {r['source']}:{r['name']} | {r['family']} | {r['params'] / 1e6:.1f}M | {r['bn']} | {r['folded']} | "
            f"{r['bn_left_bnrt']} | {r['bn_left_dynamo']} | {r['bn_left_fx']} | "
            f"{'pass' if r['check'] else 'FAIL'} ({r['ratio']:.2f}{_layers_and_weights(r)}) | "
            f"{r['ort_err'][0]:.2e} / {r['ort_err'][1]:.2e} | {r['fold_s']:.2f} | {codes} |")
    ok = [r for r in rows if "error" not in r]
    lines += ["", f"{len(rows)} models ({len(ok)} measured): {sum(r['bn'] for r in ok)} BatchNorm-like layers, "
                  f"{sum(r['folded'] for r in ok)} folded by bnrt; BN-like ONNX nodes left: bnrt "
                  f"{sum(r['bn_left_bnrt'] for r in ok)}, dynamo export alone "
                  f"{sum(r['bn_left_dynamo'] for r in ok if isinstance(r['bn_left_dynamo'], int))}; "
                  f"checks passed {sum(r['check'] for r in ok)}/{len(ok)}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="docs/REAL_ZOO.md")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--one", nargs=3, metavar=("SOURCE", "NAME", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--jsonl", default="docs/real_zoo.jsonl", help="every row as a JSON line (default docs/real_zoo.jsonl)")
    parser.add_argument("--rows", metavar="ROWS.jsonl", help="rows of a full run (its --jsonl, or its stderr), instead of measuring")
    parser.add_argument("--remeasure", nargs="*", default=[], metavar="NAME",
                        help="with --rows: measure these again (NAME, or SOURCE:NAME for one of tv/timm)")
    parser.add_argument("models", nargs="*", help="names from MODELS (default: all)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]), args.samples)))
        return
    chosen = [m for m in MODELS if not args.models or m[1] in args.models]
    previous = {}
    if args.rows:
        for line in Path(args.rows).read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                previous[(row["source"], row["name"])] = row  # tv and timm both have e.g. densenet121
    rows = []
    for i, (source, name, family, size) in enumerate(chosen, 1):
        if (source, name) in previous and not {name, f"{source}:{name}"} & set(args.remeasure):
            rows.append(previous[(source, name)])
            continue
        print(f"[{i}/{len(chosen)}] {source}:{name}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "tools.real_zoo", "--samples", str(args.samples), "--one",
                                   source, name, str(size)], capture_output=True, text=True, timeout=args.timeout)
            row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {args.timeout} s"}
        rows.append({"source": source, "name": name, "family": family, **row})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    from tools.provenance import provenance
    header = provenance("make zoo") + f" Random weights with randomised BatchNorm statistics, {args.samples} random " \
        "samples per check, 2 threads."
    if args.rows:
        out = Path(args.output)  # the full run's own header, where its doc is still there
        first = next((ln.split(" Re-measured with the current code:")[0].split(" Rebuilt from its rows")[0]
                      for ln in (out.read_text().splitlines() if out.exists() else []) if ln.startswith("Generated by")),
                     None)
        command = f"python -m tools.real_zoo --rows {args.rows}" + (
            f" --remeasure {' '.join(args.remeasure)}" if args.remeasure else "")
        what = (" Re-measured with the current code: " + ", ".join(args.remeasure)) if args.remeasure else \
            " Rebuilt from its rows"
        header = (first or f"Rows from `{args.rows}`.") + what + " — " + provenance(command)
    doc = "# Real-model zoo\n\n" + header + "\n\n" + table + "\n"
    previous = Path(args.output).read_text() if Path(args.output).exists() else ""
    if SHIPPED in previous:  # tools.shipped_zoo's section is its own
        doc += "\n" + SHIPPED + previous.split(SHIPPED, 1)[1]
    from bnrt.io.save import write_text
    write_text(Path(args.jsonl), "".join(json.dumps(row) + "\n" for row in rows))
    write_text(Path(args.output), doc)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
