"""``bnrt fold`` on the files users ship (``tools.shipped_files``: Ultralytics ``best.pt``, TorchScript,
``.pt2``, Lightning, ``torch.compile`` prefixes, safetensors), each run as a user runs it: the command
line with the manifest's flags. Runs in the zoo environment (.venv-zoo with ultralytics and lightning).

    python -m tools.shipped_zoo [--files DIR] [-o docs/REAL_ZOO.md]

Per file: the format and precision bnrt read, BatchNorms folded, BatchNormalization nodes left in
the ONNX, the exporter used, the check's verdict (worst criterion ratio: error / allowance), and our
own comparison of the written ONNX (onnxruntime, CPU) with the original model loaded the way its
ecosystem loads it, at batch 1 and batch 4 on N(0, 1) inputs: the largest |ONNX - original| over
all outputs divided by the largest |original|. Writes the table between the ``<!-- shipped -->``
markers of the doc (the rest of the doc is kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MARK = "<!-- shipped -->"


def original(path: Path) -> object:
    """The model in ``path`` loaded the way its own ecosystem loads it."""
    import torch
    import torchvision

    name = path.name
    if name.endswith("_best.pt"):  # Ultralytics: the pickled model, as YOLO(...) uses it
        return torch.load(path, weights_only=False)["model"].float().eval()
    if name.endswith(".pt2"):
        return torch.export.load(str(path)).module()
    if name.endswith(("_traced.pt", "_scripted.pt")):
        return torch.jit.load(str(path)).eval()
    model = torchvision.models.resnet18()
    if name.endswith(".safetensors"):
        import safetensors.torch
        state = safetensors.torch.load_file(str(path))
    elif name.endswith(".ckpt"):
        state = {k.removeprefix("model."): v for k, v in torch.load(path, weights_only=False)["state_dict"].items()}
    else:
        state = {k.removeprefix("_orig_mod."): v for k, v in torch.load(path)["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval()


def agreement(onnx_path: Path, model, shape: list[int]) -> dict[int, float]:
    """max |ONNX - original| / max |original| over every output, at batch 1 and 4."""
    import onnxruntime as ort
    import torch

    from bnrt.io.export import flatten_outputs

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    found = {}
    for batch in (1, 4):
        x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = [t.numpy() for t in flatten_outputs(model(x))]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        if len(got) != len(expected):
            raise AssertionError(f"{len(got)} ONNX outputs, {len(expected)} of the original")
        found[batch] = max(float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-30)) for g, e in zip(got, expected))
    return found


def fold(entry: dict, files: Path, out: Path) -> dict:
    path = files / entry["file"]
    shape = entry["input_shape"]
    command = [sys.executable, "-m", "bnrt", "fold", str(path), *entry["flags"], "-o", str(out), "-q"]
    if not path.name.endswith((".pt2", "_best.pt")):  # those files record their input shape
        command += ["--input-shape", ",".join(map(str, shape))]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    row = {"file": entry["file"], "what": entry["what"], "flags": " ".join(entry["flags"]),
           "wall_s": round(time.perf_counter() - start, 1), "exit": proc.returncode}
    if proc.returncode not in (0, 1):
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    stem = path.name.rsplit(".", 1)[0]
    report = json.loads((out / f"{stem}.report.json").read_text())
    summary, check = report["summary"], report["check"]
    ratios = [o["ratio"] for c in (check or {}).get("comparisons", []) for o in c["outputs"] if o.get("ratio") is not None]
    row.update(format=report["source"]["format"], precision=report["source"].get("precision", "float32"),
               folded=f"{summary['folded']}/{summary['bn_total']}", bn_nodes=summary["batchnorm_nodes_in_onnx"],
               exporter=report["exporter"], passed=bool(check and check["passed"]),
               worst=max(ratios) if ratios else None, notes=report["source"].get("notes", []))
    if proc.returncode == 0:
        row["agreement"] = agreement(out / f"{stem}.onnx", original(path), shape)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| file | read as | precision | BN folded | BN nodes in ONNX | exporter | check | "
             "ONNX vs original, batch 1 / 4 | bnrt fold wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['file']} | refused: {r['error']} | | | | | | | {r['wall_s']} |")
            continue
        worst = f" (worst {r['worst']:.2f})" if r.get("worst") is not None else ""
        agree = " / ".join(f"{v:.1e}" for v in r["agreement"].values()) if "agreement" in r else "not written"
        lines.append(f"| {r['file']} | {r['format']} | {r['precision']} | {r['folded']} | {r['bn_nodes']} | "
                     f"{r['exporter']} | {'pass' if r['passed'] else 'FAIL'}{worst} | {agree} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=Path, help="files written by tools.shipped_files (default: written now)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/REAL_ZOO.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or Path(tmp) / "files"
        if args.files is None:
            subprocess.run([sys.executable, "-m", "tools.shipped_files", str(files)], check=True)
        entries = json.loads((files / "manifest.json").read_text())
        rows = []
        for entry in entries:
            rows.append(fold(entry, files, Path(tmp) / "out"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    from tools.provenance import provenance, write_section

    section = (f"{MARK}\n## Files users ship\n\n{provenance('python -m tools.shipped_zoo')}\n\n`python -m tools.shipped_zoo`: each file written by the "
               "library that writes it (`tools/shipped_files.py`), folded by `bnrt fold` with the flags a user passes "
               "(listed below); the last ratio columns are our own onnxruntime run of the written ONNX against the "
               "original loaded its own ecosystem's way.\n\n" + table(rows) + "\n\n"
               + "\n".join(f"- `{r['file']}`: {r['what']}" + (f"; flags `{r['flags']}`" if r["flags"] else "")
                           + "".join(f"; bnrt: {n}" for n in r.get("notes", [])) for r in rows) + f"\n{MARK}")
    write_section(args.output, MARK, section)
    print(table(rows))
    return 0 if all(r.get("passed") and r.get("bn_nodes") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
