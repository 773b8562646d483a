"""Recalibrate every zoo model three ways and report residuals and cost side by side.

    python -m tools.calibration_report [-o docs/CALIBRATION.md] [--json docs/calibration.json]
                                       [--samples 512] [--batch-size 64]

Each model gets non-trivial statistics (models.zoo.build), then the data shifts (x·1.7 + 0.4) so
that the old statistics are wrong. Residuals: max over BNs and channels of |mean| and |var − 1| of
the BN inputs standardised with the new running statistics (bnrt.train.calibrate.residuals). Cost: wall
time of bnrt's ``fast`` and ``exact`` modes and of torch.optim.swa_utils.update_bn, and the
throughput ratio plain eval forward / calibration over the same batches (median of 3 runs).
Per-BN residuals of every mode go to docs/calibration.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from bnrt.train.calibrate import batches_of, calibrate, residuals
from bnrt.io.save import write_json, write_text
from tools.provenance import provenance
from models.zoo import ZOO, build


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report_model(name: str, samples: int, batch_size: int) -> dict:
    model = build(name)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(samples, *ZOO[name].input_shape[1:], generator=gen) * 1.7 + 0.4).numpy()
    batches = batches_of([x], batch_size)

    def plain():
        with torch.no_grad():
            for (b,) in batches():
                model(b)

    row = {"model": name, "plain_s": timed(plain)}
    for mode in ("fast", "exact"):
        calibrated = copy.deepcopy(model)
        row[f"{mode}_s"] = timed(lambda: calibrate(copy.deepcopy(model), batches, mode=mode))
        calibrate(calibrated, batches, mode=mode)
        found = residuals(calibrated, batches())
        row[mode] = (max(v[0] for v in found.values()), max(v[1] for v in found.values()))
        row[f"{mode}_per_bn"] = found
    swa = copy.deepcopy(model)
    row["update_bn_s"] = timed(lambda: update_bn((b for (b,) in batches()), copy.deepcopy(model)))
    update_bn((b for (b,) in batches()), swa)
    found = residuals(swa, batches())
    row["update_bn"] = (max(v[0] for v in found.values()), max(v[1] for v in found.values()))
    row["update_bn_per_bn"] = found
    row["bn"] = len(found)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | BN | update_bn max abs mean / var−1 | fast | exact | plain eval s | update_bn s | fast s | exact s | "
             "throughput fast (plain / fast) | exact (plain / exact) |", "|" + "---|" * 11]
    for r in rows:
        pair = lambda k: f"{r[k][0]:.2e} / {r[k][1]:.2e}"  # noqa: E731
        lines.append(f"| {r['model']} | {r['bn']} | {pair('update_bn')} | {pair('fast')} | {pair('exact')} | "
                     f"{r['plain_s']:.3f} | {r['update_bn_s']:.3f} | {r['fast_s']:.3f} | {r['exact_s']:.3f} | "
                     f"{r['plain_s'] / r['fast_s']:.2f} | {r['plain_s'] / r['exact_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="docs/CALIBRATION.md")
    parser.add_argument("--json", default="docs/calibration.json", help="per-BN residuals of every mode")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("models", nargs="*", default=[n for n in ZOO if n != "preact"] + ["preact"])
    args = parser.parse_args()
    rows = [report_model(n, args.samples, args.batch_size) for n in args.models]
    table = markdown(rows)
    print(table)
    doc = ("# Calibration report\n\n" + provenance("python -m tools.calibration_report")
           + f" {torch.get_num_threads()} threads, {args.samples} samples, batches of {args.batch_size}.\n\n"
           + __doc__.split("\n\n", 2)[2] + "\n" + table + "\n")
    write_text(Path(args.output), doc)
    write_json(Path(args.json), {r["model"]: {mode: {bn: {"abs_mean": v[0], "abs_var_minus_1": v[1]}
                                                    for bn, v in r[f"{mode}_per_bn"].items()}
                                             for mode in ("update_bn", "fast", "exact")} for r in rows})
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
