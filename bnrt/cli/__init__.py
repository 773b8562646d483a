"""Command line: parses flags, calls the library, prints. Exit codes: 0 ok, 1 check failed,
2 bad input or usage (one line on stderr; ``--debug`` shows the traceback)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Sequence

from bnrt.version import __version__
from bnrt.io.data import DISTRIBUTIONS
from bnrt.errors import BnrtError, InputError, OptionError, Terminated, first_line, interruption
from bnrt.io.export import DEFAULT_OPSET, EXPORTERS
from bnrt.train.calibrate import MODES
from bnrt.pipeline.quantize import CALIBRATIONS, PRECISIONS
from bnrt.io.data import DEFAULT_SAMPLES, InputSpec
from bnrt.io.source import ModelSource
from bnrt.io.save import refuse_overwrite
from bnrt.verify.check import CheckOptions
from bnrt.session import PROVIDERS, show_ort_logs
from bnrt.deploy.serve import KEEP_ALIVE_S
from bnrt.io.data import DEFAULT_BATCH
from bnrt.verify.metrics import DEFAULT_ATOL, DEFAULT_RTOL, DEFAULT_TOP_K, NOISE_FACTOR, Tolerances
from bnrt.verify.torchside import DEVICES


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive integers like 1,3,224,224")
    return dims


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range like -1,1") from None
    return lo, hi


def _tolerance(text: str) -> tuple[str | None, float]:
    name, sep, value = text.rpartition(":")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tolerance like 1e-4 or logits:1e-3") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance is a finite number >= 0")
    return (name if sep else None), number


def tolerances_from(args: argparse.Namespace) -> Tolerances:
    """``--atol``/``--rtol`` values (a bare number for every output, ``NAME:X`` for one; none: the
    noise-aware criterion) and ``--noise-factor``."""
    defaults: dict[str, float | None] = {"atol": None, "rtol": None}
    per_output: dict[str, list] = {}
    for i, key in enumerate(("atol", "rtol")):
        for name, value in getattr(args, key) or []:
            if name is None:
                defaults[key] = value
            else:
                per_output.setdefault(name, [None, None])[i] = value
    if not 0 < args.noise_factor < float("inf"):
        raise InputError(f"--noise-factor {args.noise_factor}: must be a finite positive number")
    return Tolerances(defaults["atol"], defaults["rtol"], {k: tuple(v) for k, v in per_output.items()},
                      args.noise_factor, args.allow_nonfinite)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} {value}: must be positive")


# Argument groups: each adds its flags and builds the library object they describe.

def _source_args(p: argparse.ArgumentParser, shapes: bool = True) -> None:
    """Model source flags -> ``ModelSource`` (``source_from``)."""
    g = p.add_argument_group("model source")
    if shapes:
        g.add_argument("--input-shape", type=_shape, action="append", metavar="SHAPE",
                       help="input shape with batch, e.g. 1,3,224,224; repeat for several inputs")
    g.add_argument("--arch", metavar="MOD:NAME", help="architecture class or factory (overrides the checkpoint's arch)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a full nn.Module: runs code from the file, use only for files you trust")
    g.add_argument("--trust-code", action="store_true",
                   help="allow importing the checkpoint's arch from a file in the current or the model's folder "
                        "(runs that code; installed packages need no flag)")


def source_from(args: argparse.Namespace, path: str) -> ModelSource:
    return ModelSource(Path(path), args.arch, args.trust_pickle, getattr(args, "input_shape", None),
                       args.trust_code)


def _model_args(p: argparse.ArgumentParser) -> None:
    _source_args(p)
    p.add_argument("--data", metavar="FILE", help=".npz/.npy inputs (and integer labels under 'y') to check on")


def check_from(args: argparse.Namespace) -> CheckOptions:
    """Check flags -> ``CheckOptions``."""
    _positive(args, "samples", "top_k", "batch_size")
    return CheckOptions(InputSpec(args.data, args.samples, args.seed, args.dist, args.val_range, args.allow_nonfinite),
                        args.provider,
                        tolerances_from(args), args.top_k, getattr(args, "batch_size", DEFAULT_BATCH),
                        not getattr(args, "no_localise", False), args.tf32, args.device)


def _tf32(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: choose on or off")
    return text == "on"


def _tf32_arg(p, default: str) -> None:
    p.add_argument("--tf32", type=_tf32, metavar="on|off",
                   help=f"TF32 on CUDA: ORT's use_tf32 (and torch's matmul/cuDNN TF32 for --device cuda); "
                        f"cuda only (default {default})")


def _quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (shown only on a terminal anyway)")


def _progress_from(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not args.quiet


def _check_args(p: argparse.ArgumentParser) -> None:
    """Check flags -> ``CheckOptions`` (``check_from``)."""
    g = p.add_argument_group("check")
    g.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu", help="ORT provider for ONNX (default cpu)")
    g.add_argument("--device", choices=DEVICES, default="cpu", help="where torch sides of the check run (default cpu)")
    _tf32_arg(g, "off: checks compare exact float32")
    g.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"random samples when no --data (default {DEFAULT_SAMPLES})")
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    g.add_argument("--dist", choices=DISTRIBUTIONS, default="normal", help="random input distribution (default normal)")
    g.add_argument("--val-range", type=_pair, metavar="LO,HI", help="range of random values, e.g. 0,1")
    g.add_argument("--noise-factor", type=float, default=NOISE_FACTOR,
                   help=f"pass when the candidate's error against the float64 truth (torch) or the original graph "
                        f"(ONNX) is within this factor of the measured float32 noise floor (default {NOISE_FACTOR:g})")
    g.add_argument("--atol", type=_tolerance, action="append", metavar="[OUTPUT:]X",
                   help=f"fixed absolute tolerance instead of the noise floor (with --rtol: |c-r| <= atol + rtol*|r|; "
                        f"default then {DEFAULT_ATOL:g}); OUTPUT:X for one output; repeatable")
    g.add_argument("--rtol", type=_tolerance, action="append", metavar="[OUTPUT:]X",
                   help=f"fixed relative tolerance instead of the noise floor (default then {DEFAULT_RTOL:g}); "
                        "OUTPUT:X for one output; repeatable")
    g.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"k of top-k agreement (default {DEFAULT_TOP_K})")
    g.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN/Inf in --data and in the reference's outputs, compared position by position "
                        "(default: a finding that fails the check)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnrt", description="Fold BatchNorm, export verified ONNX, run it with onnxruntime.")
    parser.add_argument("--version", action="version", version=f"bnrt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    fold = sub.add_parser("fold", help="fold BatchNorm, export ONNX, check equivalence")
    fold.add_argument("model", help="checkpoint (a dict with a state_dict, arch, input_shape; or with --trust-pickle a "
                                    "pickled nn.Module) or an .onnx file")
    _model_args(fold)
    fold.add_argument("-o", "--output-dir", metavar="DIR", help="output folder (default: the model's folder)")
    fold.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    fold.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}; torch checkpoints only)")
    fold.add_argument("--exporter", choices=EXPORTERS, help="torch ONNX exporter (default dynamo; torch checkpoints only)")
    _quiet_arg(fold)
    _check_args(fold)

    chk = sub.add_parser("check", help="compare two models (torch checkpoints or ONNX files) on the same inputs")
    chk.add_argument("reference", help="reference model: .pt checkpoint or .onnx")
    chk.add_argument("candidate", help="candidate model: .pt checkpoint or .onnx")
    _model_args(chk)
    _check_args(chk)
    chk.add_argument("--reference-provider", choices=sorted(PROVIDERS), default="cpu",
                     help="ORT provider when the reference is ONNX (default cpu)")
    chk.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"samples per run (default {DEFAULT_BATCH})")
    chk.add_argument("--save-inputs", metavar="FILE.npz", help="write the inputs used to FILE.npz")
    chk.add_argument("--json", metavar="FILE", help="write the report (schema bnrt.check/2) to FILE")
    chk.add_argument("--plot", metavar="FILE.png", help="write error histograms per output (needs matplotlib)")
    chk.add_argument("--no-localise", action="store_true", help="do not look for the first divergent module")
    _quiet_arg(chk)

    cal = sub.add_parser("calibrate", help="recompute BatchNorm running statistics over a dataset")
    cal.add_argument("model", help="checkpoint")
    cal.add_argument("--data", required=True, metavar="FILE", help=".npz/.npy inputs to calibrate on")
    cal.add_argument("-o", "--output", required=True, metavar="FILE.pt", help="calibrated checkpoint to write")
    cal.add_argument("--mode", choices=MODES, default="fast",
                     help="fast: one pass, exact pooled statistics; exact: BN by BN, earlier ones in force (default fast)")
    cal.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default 64)")
    _source_args(cal, shapes=False)
    cal.add_argument("--no-residuals", action="store_true", help="skip the residual measurement pass")
    _quiet_arg(cal)

    run = sub.add_parser("run", help="run an ONNX model on inputs from a file")
    run.add_argument("model", help=".onnx file")
    run.add_argument("--input", required=True, metavar="FILE", help=".npy (one input) or .npz (arrays named like the inputs)")
    run.add_argument("-o", "--output", required=True, metavar="FILE.npz", help="outputs, named like the model's outputs")
    run.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    _tf32_arg(run, "ORT's, on")
    run.add_argument("--threads", type=int, default=0, help="intra-op threads (default: ORT's)")
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                     help=f"samples per run (default {DEFAULT_BATCH}; a model with a fixed batch runs that many)")

    srv = sub.add_parser("serve", help="serve ONNX models over the KServe v2 HTTP protocol")
    srv.add_argument("model", help=".onnx file or Triton-style repository (REPO/NAME/VERSION/model.onnx)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    _tf32_arg(srv, "ORT's, on")
    srv.add_argument("--threads", type=int, default=0, help="intra-op threads per model (default: ORT's)")
    srv.add_argument("--max-batch", type=int, default=32, help="samples merged into one run (default 32)")
    srv.add_argument("--max-delay-ms", type=float, default=2.0, help="wait for more requests up to this long (default 2)")
    srv.add_argument("--max-queue", type=int, default=256, help="requests in flight per model before 503 (default 256)")
    srv.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MB (default 64)")
    srv.add_argument("--keep-alive-s", type=float, default=KEEP_ALIVE_S,
                     help=f"close a connection idle this long, before its first request too (default {KEEP_ALIVE_S:g})")
    srv.add_argument("--max-connections", type=int, default=None,
                     help="open connections at most, more are closed when accepted (default: ulimit -n less 64)")

    tri = sub.add_parser("triton", help="write a Triton model repository for an ONNX model")
    tri.add_argument("model", help=".onnx file")
    tri.add_argument("-o", "--output", required=True, metavar="REPO", help="repository folder")
    tri.add_argument("--name", help="model name (default: the file's stem)")
    tri.add_argument("--max-batch", type=int, default=8, help="max_batch_size when the batch axis is dynamic (default 8; 0: no batching)")
    tri.add_argument("--gpu", action="store_true", help="instance_group kind KIND_GPU (default KIND_CPU)")
    tri.add_argument("--instances", type=int, default=1, help="instances of the model (default 1)")

    ben = sub.add_parser("bench", help="latency and throughput of every deployment path, side by side")
    ben.add_argument("model", help="checkpoint")
    _model_args(ben)
    ben.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    ben.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default 1)")
    ben.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    ben.add_argument("--iterations", type=int, default=20, help="timed calls per variant per round (default 20)")
    ben.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ben.add_argument("--plot", metavar="FILE.png", help="write a latency chart (needs matplotlib)")

    qnt = sub.add_parser("quantize", help="fold, then quantize to INT8 or FP16, verified on your data")
    qnt.add_argument("model", help="checkpoint (folded first, as bnrt fold does) or an .onnx file (folded by the ONNX folder)")
    qnt.add_argument("--data", required=True, metavar="FILE.npz",
                     help="real inputs (and integer labels under 'y'): calibration (INT8), activation ranges (FP16), verification")
    qnt.add_argument("--precision", choices=PRECISIONS, default="int8", help="int8 (QDQ, per-channel) or fp16 (default int8)")
    qnt.add_argument("-o", "--output-dir", metavar="DIR", help="output folder (default: the model's folder)")
    qnt.add_argument("--calibration", choices=CALIBRATIONS, default="minmax", help="INT8 activation calibration (default minmax)")
    qnt.add_argument("--calibration-samples", type=int, default=256, help="first samples of --data calibrated on (default 256)")
    qnt.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="nodes kept in float32 (INT8)")
    qnt.add_argument("--no-keep-io-types", action="store_true", help="FP16: float16 inputs and outputs too")
    qnt.add_argument("--max-accuracy-drop", type=float, default=1.0,
                     help="budget with labels: top-1 accuracy points lost at most (default 1.0)")
    qnt.add_argument("--max-disagreement", type=float, default=0.01,
                     help="budget without labels: fraction of samples whose top-1 changes at most (default 0.01)")
    _source_args(qnt)
    _quiet_arg(qnt)

    insp = sub.add_parser("inspect", help="list BatchNorms and what fold would do; writes nothing")
    insp.add_argument("model", help="checkpoint")
    _model_args(insp)
    return parser


# flags that describe a torch checkpoint or its export; an ONNX file is folded as it is
_TORCH_ONLY = ("opset", "exporter", "input_shape", "arch", "trust_pickle", "trust_code")


def _refuse_torch_flags(args: argparse.Namespace, why: str) -> None:
    """One line naming every torch-only flag given with an ``.onnx`` model."""
    if str(args.model).lower().endswith(".onnx"):
        given = ["--" + n.replace("_", "-") for n in _TORCH_ONLY if getattr(args, n, None) not in (None, False)]
        if given:
            raise InputError(f"{args.model}: {', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to torch "
                             f"checkpoints only{why}")


def cmd_fold(args: argparse.Namespace) -> int:
    from bnrt.pipeline.convert import fold_file
    from bnrt.verify.report import check_table, decision_table

    start = time.perf_counter()
    _refuse_torch_flags(args, "; an ONNX file is folded as it is")
    outcome = fold_file(source_from(args, args.model), args.output_dir,
                        check=None if args.no_check else check_from(args),
                        opset=DEFAULT_OPSET if args.opset is None else args.opset, exporter=args.exporter or "dynamo",
                        progress=_progress_from(args))
    print(decision_table(outcome.result.decisions))
    for merge in outcome.result.merges:
        print(f"merged into '{merge.target.name}': " + ", ".join(
            [*(f"'{c.name}'" for c in merge.convs), *(f"identity BN '{b.name}'" for b in merge.bns),
             *(["the input"] * merge.inputs)]))
    print(f"BatchNormalization nodes in {'the folded ONNX' if str(args.model).lower().endswith('.onnx') else 'ONNX'}: "
          f"{outcome.onnx_batchnorm_nodes}")
    keeps = outcome.report["summary"].get("checkpoint_keeps", [])
    if keeps:
        print(f"kept in the folded checkpoint (the forward it keeps still computes the blocks the ONNX merged): {', '.join(keeps)}")
    for layer, largest in outcome.result.fp16_overflow.items():
        print(f"warning: folded weights of '{layer}' reach {largest:.3g}, beyond float16's range (65504)")
    if outcome.check is not None:
        print()
        print(check_table(outcome.check))
    print()
    elapsed = time.perf_counter() - start
    if outcome.passed:
        print(f"wrote {', '.join(str(p) for p in outcome.written)} in {elapsed:.2f} s")
        return 0
    print(f"wrote only {outcome.report_path}: the folded model is not written when the check fails", file=sys.stderr)
    return 1


def cmd_check(args: argparse.Namespace) -> int:
    from bnrt.verify.check import check_files
    from bnrt.verify.report import check_table, plot_errors
    from bnrt.io.save import write_json

    refuse_overwrite([args.json, args.plot, args.save_inputs], [args.reference, args.candidate])
    report = check_files(source_from(args, args.reference), source_from(args, args.candidate), check_from(args),
                         reference_provider=args.reference_provider, save_inputs=args.save_inputs,
                         progress=_progress_from(args))
    print(check_table(report))
    if args.json:
        write_json(Path(args.json), report.to_json())
    if args.plot:
        plot_errors(report, report.errors, Path(args.plot))
    return 0 if report.passed else 1


def _progress(stage: str, i: int, total: int | None) -> None:
    sys.stderr.write(f"\rcalibrate {stage}: batch {i}" + (f"/{total}" if total else "") + " " * 8)
    sys.stderr.flush()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from bnrt.train.calibrate import calibrate_file

    start = time.perf_counter()
    shown = _progress_from(args)
    outcome = calibrate_file(source_from(args, args.model), args.data, args.output, mode=args.mode,
                             batch_size=args.batch_size, progress=_progress if shown else None,
                             measure=not args.no_residuals)
    if shown:
        sys.stderr.write("\n")
    if outcome.rank != 0:
        return 0
    r = outcome.report
    print(f"calibrated {len(r.bn)} BatchNorm ({r.mode}) on {r.samples} samples in {r.batches} batches, "
          f"{r.passes} pass(es), {time.perf_counter() - start:.2f} s")
    if outcome.residuals:
        worst_mean = max(v[0] for v in outcome.residuals.values())
        worst_var = max(v[1] for v in outcome.residuals.values())
        print(f"residuals over the data (standardised BN inputs): max |mean| {worst_mean:.3g}, max |var - 1| {worst_var:.3g}")
    print(f"wrote {outcome.written}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from bnrt.io.data import load_data
    from bnrt.session import Session
    from bnrt.io.save import atomic_path
    from bnrt.io.data import run_batched

    _positive(args, "batch_size")
    refuse_overwrite([args.output], [args.model, args.input])
    session = Session(args.model, args.provider, args.threads, tf32=args.tf32)
    if session.tf32 is not None:
        print(f"TF32 {'on' if session.tf32 else 'off'}" + (" (ORT's CUDA default)" if args.tf32 is None else ""))
    data = load_data(args.input, session.input_names, allow_nonfinite=True)  # running is not judging
    fixed = session.inputs[0].shape[0] if session.inputs and session.inputs[0].shape else None
    try:
        arrays = run_batched(lambda xs: list(session.run_dict(dict(zip(session.input_names, xs))).values()), data,
                             fixed or args.batch_size)
    except InputError as exc:
        raise InputError(f"{args.input}: {exc}") from exc
    outputs = dict(zip(session.output_names, arrays))
    with atomic_path(Path(args.output)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **outputs)
    for name, array in outputs.items():
        print(f"{name}: {array.dtype} {tuple(array.shape)}")
    print(f"wrote {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bnrt.deploy.serve import serve

    serve(args.model, host=args.host, port=args.port, provider=args.provider, threads=args.threads,
          max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
          max_request_mb=args.max_request_mb, tf32=args.tf32, keep_alive_s=args.keep_alive_s,
          max_connections=args.max_connections, announce=lambda m: print(m, flush=True))
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from bnrt.deploy.triton import write_repository

    target = write_repository(args.model, args.output, name=args.name, max_batch=args.max_batch, gpu=args.gpu,
                              instances=args.instances)
    print((target / "config.pbtxt").read_text().rstrip())
    print(f"wrote {target}/config.pbtxt and {target}/1/model.onnx")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bnrt.pipeline.bench import bench_model, markdown, plot
    from bnrt.pipeline.convert import example_data
    from bnrt.io.load import load
    from bnrt.io.save import write_json

    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise InputError(f"--batch-sizes {args.batch_sizes!r}: expected integers like 1,8,32") from None
    if not batches or min(batches) <= 0 or args.threads <= 0 or args.repeats <= 0 or args.iterations <= 0:
        raise InputError("--batch-sizes, --threads, --repeats and --iterations must be positive")
    refuse_overwrite([args.json, args.plot], [args.model])
    loaded = load(source_from(args, args.model))
    data = example_data(loaded, args.input_shape, args.data, args.model)
    if len(data.inputs) != 1:
        raise InputError(f"{args.model}: bnrt bench handles single-input models")
    # real inputs (all of --data): INT8 and FP16 variants too, calibrated on up to 256 of them
    calibration = data.inputs[0][:256] if args.data else None
    report = bench_model(loaded.model, data.shapes()[0], name=Path(args.model).stem, batch_sizes=batches,
                         threads=args.threads, repeats=args.repeats, iterations=args.iterations,
                         calibration=calibration)
    print(markdown(report))
    if args.json:
        write_json(Path(args.json), report.to_json())
    if args.plot:
        plot([report], Path(args.plot))
    return 0


def _db(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"


def cmd_quantize(args: argparse.Namespace) -> int:
    from bnrt.pipeline.quantize import QuantizeOptions, quantize_file

    _refuse_torch_flags(args, "")
    start = time.perf_counter()
    options = QuantizeOptions(args.precision, args.calibration, args.calibration_samples, tuple(args.exclude),
                              not args.no_keep_io_types, args.max_accuracy_drop, args.max_disagreement)
    outcome = quantize_file(source_from(args, args.model), args.data, args.output_dir, options,
                            progress=_progress_from(args))
    r = outcome.report
    for kept in r["batchnorm_kept"]:
        print(f"warning: BatchNorm '{kept['bn']}' is not folded and stays float32 between quantize/dequantize "
              f"pairs: {kept['reason']}")
    for kept in r.get("fp16", {}).get("kept_float32", []):
        print(f"kept in float32: {kept['node']} ({kept['op']}): {kept['why']}")
    for o in r["outputs"]:
        print(f"output {o['name']}: SQNR {_db(o['sqnr_db'])}, max abs error {o['max_abs']:.3g}"
              + (f", top-1 agreement {100 * o['top1_agreement']:.2f}%" if o["top1_agreement"] is not None else ""))
    if r["accuracy"]:
        print("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in r["accuracy"].items()))
    b = r["budget"]
    print(f"{b['kind']}: {b['value']:.3g} (budget {b['limit']:g}) -> {'ok' if outcome.passed else 'OVER BUDGET'}")
    if outcome.passed:
        print(f"wrote {', '.join(str(p) for p in outcome.written)} in {time.perf_counter() - start:.2f} s")
        return 0
    if r["worst_layers"]:
        print("worst layers by SQNR (exclude with --exclude NODE …): " + ", ".join(
            f"{w['node']} ({_db(w['sqnr_db'])})" for w in r["worst_layers"]))
    print(f"wrote only {outcome.report_path}: the {r['precision']} model is not written when it is over budget",
          file=sys.stderr)
    return 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from bnrt.pipeline.convert import inspect_file
    from bnrt.verify.report import decision_table

    loaded, decisions = inspect_file(source_from(args, args.model), data=args.data)
    if loaded is not None:
        print(f"{loaded.path}  arch {loaded.arch}  sha256 {loaded.sha256[:12]}")
    print(decision_table(decisions))
    return 0


COMMANDS = {"fold": cmd_fold, "check": cmd_check, "calibrate": cmd_calibrate, "run": cmd_run, "serve": cmd_serve,
            "triton": cmd_triton, "bench": cmd_bench, "inspect": cmd_inspect, "quantize": cmd_quantize}


def _terminate(signum, frame) -> None:
    raise Terminated()


def _interrupted(exc: KeyboardInterrupt) -> int:
    terminated = isinstance(exc, Terminated)
    print(f"bnrt: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_ort_logs(args.debug)
    # SIGTERM unwinds like Ctrl-C, so temp files go; the server shuts down gracefully by itself
    own = args.command != "serve" and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if own else None
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:  # a model's own code can raise anything; never show a bare traceback
        stop = interruption(exc)  # Ctrl-C or SIGTERM that a library wrapped in its own error
        if stop is not None:
            return _interrupted(stop)
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, BnrtError):
            print(f"bnrt: error: {exc.as_flag() if isinstance(exc, OptionError) else exc}", file=sys.stderr)
            return exc.exit_code
        subject = getattr(args, "model", None) or getattr(args, "candidate", "")
        print(f"bnrt: error: {subject}: {type(exc).__name__}: {first_line(exc)} (--debug shows the traceback)",
              file=sys.stderr)
        return 2
    finally:
        if own:
            signal.signal(signal.SIGTERM, previous)
