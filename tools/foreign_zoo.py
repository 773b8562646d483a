"""``bnrt fold`` on trained ONNX files other exporters wrote, shipped inside a PyPI package: the
three PaddleOCR models of ``rapidocr_onnxruntime`` (text detector, text recogniser, direction
classifier; paddle2onnx, opset 11/12, every weight a Constant node, no initializer, symbolic
batch/height/width). Runs in the project's environment (.venv); downloads the wheel from PyPI
(``pip download``) unless ``--wheel`` names one.

    python -m tools.foreign_zoo [--wheel FILE.whl] [-o docs/REAL_ZOO.md]

Per file: the command line a user runs (``bnrt fold FILE --input-shape 1,3,H,W``), BatchNorms
folded, BatchNormalization nodes and nodes in all before/after, the check's verdict (worst ratio:
error / floor), and our own onnxruntime comparison of the folded file with the original at the
check's size and at another height and width (max |folded - original| beside max |original|,
N(0, 1) inputs, batch 2). Writes the table between the ``<!-- foreign -->`` markers of the doc.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

MARK = "<!-- foreign -->"
PACKAGE = "rapidocr_onnxruntime==1.4.4"
MODELS = [  # file in the wheel, what it is, the check's input shape, another size it runs at
    ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "text direction classifier (MobileNetV3)", (1, 3, 48, 192), (2, 3, 48, 96)),
    ("ch_PP-OCRv4_rec_infer.onnx", "text recogniser (PP-LCNetV3 + SVTR neck)", (1, 3, 48, 320), (2, 3, 48, 640)),
    ("ch_PP-OCRv4_det_infer.onnx", "text detector (DBNet, PP-LCNetV3 + RSE-FPN)", (1, 3, 320, 320), (2, 3, 640, 480)),
]


def wheel(path: Path | None, into: Path) -> Path:
    if path is not None:
        return path
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", str(into)],
                   check=True, timeout=600)
    return next(into.glob("*.whl"))


def agreement(original: Path, folded: Path, shape: tuple[int, ...]) -> tuple[float, float]:
    """(max |folded - original|, max |original|) over the outputs, on N(0, 1) inputs."""
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})
            for p in (original, folded)]
    return (max(float(np.abs(a - b).max()) for a, b in zip(*outs)), max(float(np.abs(a).max()) for a in outs[0]))


def counts(path: Path) -> tuple[int, int, int]:
    import onnx

    model = onnx.load(str(path))
    return (sum(n.op_type == "BatchNormalization" for n in model.graph.node), len(model.graph.node),
            len(model.graph.initializer))


def fold(path: Path, what: str, shape: tuple[int, ...], other: tuple[int, ...], out: Path) -> dict:
    flags = ["--input-shape", ",".join(map(str, shape))]
    command = [sys.executable, "-m", "bnrt", "fold", str(path), *flags, "-o", str(out), "-q"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    row = {"file": path.name, "what": what, "flags": " ".join(flags), "wall_s": round(time.perf_counter() - start, 1),
           "exit": proc.returncode, "before": counts(path)}
    if proc.returncode not in (0, 1):
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    report = json.loads((out / f"{path.stem}.report.json").read_text())
    check = report["check"]
    ratios = [o["ratio"] for c in check["comparisons"] for o in c["outputs"] if o.get("ratio") is not None]
    row.update(folded=f"{report['summary']['folded']}/{report['summary']['bn_total']}", passed=check["passed"],
               worst=max(ratios) if ratios else None, fallback=check.get("noise_fallback"))
    if proc.returncode == 0:
        folded = out / f"{path.stem}.folded.onnx"
        row["after"] = counts(folded)
        row["agreement"] = {"x".join(map(str, s[2:])): agreement(path, folded, (2, *s[1:]))
                            for s in (shape, other)}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| file | BN folded | BN nodes | nodes | initializers | check | max \\|folded - original\\| of max "
             "\\|original\\| @ size | "
             "bnrt fold wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['file']} | refused: {r['error']} | | | | | | {r['wall_s']} |")
            continue
        (bn0, n0, i0), (bn1, n1, i1) = r["before"], r.get("after", ("-", "-", "-"))
        worst = f" (worst {r['worst']:.2f})" if r.get("worst") is not None else ""
        agree = ", ".join(f"{d:.1e} of {m:.1e} @ {k}" for k, (d, m) in r.get("agreement", {}).items()) or "not written"
        lines.append(f"| {r['file']} | {r['folded']} | {bn0} → {bn1} | {n0} → {n1} | {i0} → {i1} | "
                     f"{'pass' if r['passed'] else 'FAIL'}{worst} | {agree} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"the {PACKAGE} wheel (default: downloaded from PyPI now)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/REAL_ZOO.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel(args.wheel, tmp)) as archive:
            names = {Path(n).name: n for n in archive.namelist() if n.endswith(".onnx")}
            rows = []
            for file, what, shape, other in MODELS:
                path = tmp / file
                path.write_bytes(archive.read(names[file]))
                rows.append(fold(path, what, shape, other, tmp / "out"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    from tools.provenance import provenance, write_section

    section = (f"{MARK}\n## ONNX files other exporters wrote\n\n{provenance('python -m tools.foreign_zoo')}\n\n"
               f"`python -m tools.foreign_zoo`: the trained PaddleOCR models shipped in `{PACKAGE}` on PyPI "
               "(paddle2onnx: every weight a Constant node, no initializer, conv biases as separate Adds, symbolic "
               "batch/height/width), folded by `bnrt fold FILE --input-shape 1,3,H,W`; the last columns are our own "
               "onnxruntime run of the folded file against the original at the check's size and at another height "
               "and width (batch 2, N(0, 1) inputs, on which the detector's probabilities stay small).\n\n" + table(rows) + "\n\n"
               + "\n".join(f"- `{r['file']}`: {r['what']}; flags `{r['flags']}`"
                           + (f"; {r['fallback']}" if r.get("fallback") else "") for r in rows) + f"\n{MARK}")
    write_section(args.output, MARK, section)
    print(table(rows))
    return 0 if all(r.get("passed") and r.get("after", (1,))[0] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
