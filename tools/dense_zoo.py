"""``bnrt fold`` on detectors and dense-prediction models, built with seeded random weights (and
randomised BatchNorm statistics) from their own libraries, no downloads: Ultralytics YOLO (detect,
segment, pose), torchvision's detectors, segmentation nets at any resolution, a video net. Runs in
the zoo environment (.venv-zoo with ultralytics and segmentation-models-pytorch).

    python -m tools.dense_zoo [--only NAME ...] [-o docs/REAL_ZOO.md]

Per model, run as a user runs it (the command line, flags listed): the capture bnrt used, BatchNorms
folded, BatchNormalization nodes left in the ONNX (or why none was written), the exporter, the
dynamic axes, the check's verdict (worst criterion ratio: error / allowance, over every shape the
check ran at), and our own comparison of the written ONNX with the eager original on N(0, 1)
inputs at batch 1 and 4 and, for dynamic height and width, at two further sizes (one not square):
the largest |ONNX - original| over all outputs divided by the largest |original|. The anchor: the
same model through its ecosystem's own export — Ultralytics' ``export(format="onnx")`` (which calls
its ``fuse()``) for YOLO, ``torch.onnx.export`` alone (dynamo) for the others — its BatchNormalization
nodes and its agreement at batch 1, or why it failed. Writes between the ``<!-- dense -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "0")

MARK = "<!-- dense -->"
DYNAMIC = ["--dynamic-axes", "0,2,3"]
TV_DET = {"weights": None, "weights_backbone": None}
# name, task, how it is built, input shape, bnrt fold flags
MODELS = [
    ("yolov5nu", "detect", ("yolo", "yolov5nu.yaml"), [1, 3, 640, 640], ["--trust-pickle"]),
    ("yolov5n-csp", "detect", ("yolo", str(Path(__file__).parent / "yolo" / "yolov5n-csp.yaml")), [1, 3, 640, 640],
     ["--trust-pickle"]),
    ("yolov8n", "detect", ("yolo", "yolov8n.yaml"), [1, 3, 640, 640], ["--trust-pickle"]),
    ("yolo11n", "detect", ("yolo", "yolo11n.yaml"), [1, 3, 640, 640], ["--trust-pickle"]),
    ("yolov8n-seg", "segment", ("yolo", "yolov8n-seg.yaml"), [1, 3, 640, 640], ["--trust-pickle"]),
    ("yolov8n-pose", "pose", ("yolo", "yolov8n-pose.yaml"), [1, 3, 640, 640], ["--trust-pickle"]),
    ("ssdlite320_mobilenet_v3_large", "detect", ("tv", "detection", TV_DET), [1, 3, 320, 320], []),
    ("retinanet_resnet50_fpn", "detect", ("tv", "detection", TV_DET), [1, 3, 320, 320], ["--samples", "4"]),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "detect", ("tv", "detection", TV_DET), [1, 3, 320, 320], []),
    ("fcos_resnet50_fpn", "detect", ("tv", "detection", TV_DET), [1, 3, 320, 320], ["--samples", "4"]),
    ("keypointrcnn_resnet50_fpn", "keypoints", ("tv", "detection", TV_DET), [1, 3, 320, 320], ["--samples", "4"]),
    ("lraspp_mobilenet_v3_large", "segment", ("tv", "segmentation", TV_DET), [1, 3, 256, 256], DYNAMIC),
    ("deeplabv3_mobilenet_v3_large", "segment", ("tv", "segmentation", TV_DET), [1, 3, 256, 256], DYNAMIC),
    ("fcn_resnet50", "segment", ("tv", "segmentation", TV_DET), [1, 3, 256, 256], DYNAMIC),
    ("smp_unet_resnet18", "segment", ("smp", "Unet", {"encoder_name": "resnet18", "encoder_weights": None,
                                                       "classes": 3}), [1, 3, 256, 256], DYNAMIC),
    ("r3d_18", "video", ("tv", "video", {"weights": None}), [1, 3, 8, 64, 64], ["--dynamic-axes", "0,2,3,4"]),
]


def build(recipe: tuple, name: str):
    """The model, seeded, BN statistics randomised, eval mode, and how bnrt is told its architecture."""
    import torch

    from tools.shipped_files import randomise_bn

    torch.manual_seed(0)
    kind = recipe[0]
    if kind == "yolo":
        from ultralytics import YOLO

        model = YOLO(recipe[1]).model
        randomise_bn(model)
        model.float().eval()
        with torch.no_grad():  # as a validation pass leaves it: the head's anchor cache filled
            model(torch.zeros(1, 3, 640, 640))
        return model, None
    if kind == "smp":
        import segmentation_models_pytorch as smp

        return randomise_bn(getattr(smp, recipe[1])(**recipe[2])).eval(), (f"segmentation_models_pytorch:{recipe[1]}",
                                                                           recipe[2])
    import torchvision

    module = getattr(torchvision.models, recipe[1])
    return randomise_bn(getattr(module, name)(**recipe[2])).eval(), (f"torchvision.models.{recipe[1]}:{name}",
                                                                     recipe[2])


def save(model, arch, shape: list[int], path: Path) -> list[str]:
    """The model saved as its users save it; the flags naming its architecture."""
    import torch

    if arch is None:
        torch.save(model, path)  # a pickled Ultralytics model, float32
        return ["--input-shape", ",".join(map(str, shape))]
    torch.save({"state_dict": model.state_dict(), "arch_kwargs": arch[1], "input_shape": shape}, path)
    return ["--arch", arch[0]]


def agreement(onnx_path: Path, model, shapes: list[list[int]]) -> dict[str, float]:
    """max |ONNX - original| / max |original| over every output, per input shape."""
    import onnxruntime as ort
    import torch

    from bnrt.io.export import flatten_outputs

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    found = {}
    for shape in shapes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            expected = [t.numpy() for t in flatten_outputs(model(x))]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        count = min(len(got), len(expected))  # an anchor may keep only the first outputs
        key = f"{shape[0]}x" + "x".join(map(str, shape[2:]))
        found[key] = max(float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-30))
                         for g, e in zip(got[:count], expected[:count]))
    return found


def _first(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # torch.onnx wraps the model's own error in its steps
        exc = exc.__cause__
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"


def _torch_onnx(model, shape: list[int], path: Path) -> str:
    """``torch.onnx.export`` alone: the dynamo exporter, else the TorchScript-based one at a fixed
    batch (as torchvision documents for its detectors); which one wrote the file."""
    import torch

    try:
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=True, verbose=False)
        return "torch.onnx.export (dynamo)"
    except Exception as exc:
        failed = _first(exc)
    torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17)
    return f"torch.onnx.export (torchscript; dynamo failed: {failed[:60]})"


def anchor(name: str, recipe: tuple, model, shape: list[int], out: Path) -> dict:
    """The ecosystem's own export of the same model: BN nodes and agreement at batch 1, or its error."""
    import onnx

    from bnrt.io.export import count_ops

    path = out / f"{name}.anchor.onnx"
    start = time.perf_counter()
    try:
        if recipe[0] == "yolo":
            from ultralytics import YOLO

            wrapper = YOLO(recipe[1])
            wrapper.model = model
            written = Path(wrapper.export(format="onnx", imgsz=shape[-1], simplify=False, dynamic=False, batch=1))
            written.replace(path)
            what = "Ultralytics export (fuse)"
        else:
            what = _torch_onnx(model, shape, path)
    except Exception as exc:
        return {"what": "torch.onnx.export" if recipe[0] != "yolo" else "Ultralytics export", "error": _first(exc)}
    row = {"what": what, "bn_nodes": count_ops(onnx.load(str(path)), "BatchNormalization"),
           "wall_s": round(time.perf_counter() - start, 1)}
    if recipe[:2] == ("tv", "detection"):  # detections in a tie-broken order: positions are not comparable
        return row
    try:
        row["agreement"] = agreement(path, model, [shape])
    except Exception as exc:
        row["run_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
    return row


def fold(entry: tuple, out: Path) -> dict:
    """``bnrt fold`` on the saved model, its report, our agreement run and the anchor row."""
    import torch

    from bnrt.io.shapes import further_shapes

    name, task, recipe, shape, flags = entry
    model, arch = build(recipe, name)
    path = out / f"{name}.pt"
    flags = [*save(model, arch, shape, path), *flags]
    command = [sys.executable, "-m", "bnrt", "fold", str(path), *flags, "-o", str(out / name), "-q"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    row = {"model": name, "task": task, "flags": " ".join(flags), "exit": proc.returncode,
           "wall_s": round(time.perf_counter() - start, 1)}
    if proc.returncode not in (0, 1, 3):
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    report = json.loads((out / name / f"{name}.report.json").read_text())
    summary, check = report["summary"], report["check"]
    ratios = [o["ratio"] for c in (check or {}).get("comparisons", []) for o in c["outputs"] if o.get("ratio") is not None]
    row.update(tracer=report["tracer"], folded=f"{summary['folded']}/{summary['bn_total']}",
               bn_nodes=summary["batchnorm_nodes_in_onnx"], no_onnx=summary.get("onnx_not_written"),
               exporter=report["exporter"], dynamic=report.get("dynamic_axes"), passed=bool(check and check["passed"]),
               worst=max(ratios) if ratios else None, outputs=len(report["output_names"]),
               shapes=sorted({c["candidate"].partition(" @ ")[2] or "example" for c in check["comparisons"]}))
    if proc.returncode == 0:
        dynamic = {k: tuple(v) for k, v in report["dynamic_axes"].items()}
        sizes = [[1, *shape[1:]], [4, *shape[1:]]] + [[2, *s[0][1:]] for s in further_shapes(dynamic, [tuple(shape)])]
        torch.manual_seed(0)
        row["agreement"] = agreement(out / name / f"{name}.onnx", model, sizes)
    row["anchor"] = anchor(name, recipe, model, shape, out)
    return row


def _cell_anchor(a: dict) -> str:
    if "error" in a:
        return f"{a['what']} failed: {a['error']}"
    agree = (f", {next(iter(a['agreement'].values())):.1e}" if "agreement" in a else
             f", {a['run_error']}" if "run_error" in a else "")
    return f"{a['what']}: {a['bn_nodes']} BN{agree}"


def table(rows: list[dict]) -> str:
    lines = ["| model | task | capture | BN folded | BN nodes in ONNX | exporter | dynamic axes | check | "
             "ONNX vs eager (batch x size) | anchor: BN nodes, vs eager | bnrt fold wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['task']} | refused: {r['error']} | | | | | | | | {r['wall_s']} |")
            continue
        worst = f" (worst {r['worst']:.2f})" if r.get("worst") is not None else ""
        nodes = r["bn_nodes"] if r["no_onnx"] is None else "no ONNX (see below)"
        dynamic = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in (r["dynamic"] or {}).items()) or "-"
        agree = "<br>".join(f"{k}: {v:.1e}" for k, v in r.get("agreement", {}).items()) or "-"
        lines.append(f"| {r['model']} | {r['task']} | {r['tracer']} | {r['folded']} | {nodes} | {r['exporter'] or '-'} | "
                     f"{dynamic} | {'pass' if r['passed'] else 'FAIL'}{worst} at {', '.join(r['shapes'])} | {agree} | "
                     f"{_cell_anchor(r['anchor'])} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/REAL_ZOO.md"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in MODELS:
            if args.only and entry[0] not in args.only:
                continue
            rows.append(fold(entry, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    from tools.provenance import provenance, write_section

    section = (f"{MARK}\n## Detectors and dense prediction\n\n{provenance('python -m tools.dense_zoo')}\n\n"
               "`python -m tools.dense_zoo`: each model built with seeded random weights by its own library, "
               "saved as its users save it, folded by `bnrt fold` with the flags listed; the agreement and anchor "
               "columns are our own onnxruntime runs (max |ONNX - eager| / max |eager| over all outputs).\n\n"
               + table(rows) + "\n\n"
               + "\n".join(f"- `{r['model']}`: flags `{r['flags']}`" + (f"; no ONNX: {r['no_onnx']}" if r.get("no_onnx")
                                                                        else "") for r in rows) + f"\n{MARK}")
    write_section(args.output, MARK, section)
    print(table(rows))
    return 0 if all(r.get("passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
