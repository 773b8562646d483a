"""Command line: parses flags, calls the library, prints. Exit codes: 0 ok, 1 check failed,
2 bad input or usage (one line on stderr; ``--debug`` shows the traceback)."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Sequence

from . import __version__
from .errors import BnrtError, InputError, first_line
from .export import DEFAULT_OPSET, EXPORTERS
from .run import PROVIDERS
from .verify import DEFAULT_ATOL, DEFAULT_RTOL


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive integers like 1,3,224,224")
    return dims


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint: a dict with a state_dict (and arch, input_shape) or, with --trust-pickle, a pickled nn.Module")
    p.add_argument("--input-shape", type=_shape, action="append", metavar="SHAPE",
                   help="input shape with batch, e.g. 1,3,224,224; repeat for several inputs")
    p.add_argument("--arch", metavar="MOD:NAME", help="architecture class or factory (overrides the checkpoint's arch)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a full nn.Module: runs code from the file, use only for files you trust")
    p.add_argument("--data", metavar="FILE", help=".npz/.npy inputs (and labels under 'y') to check on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnrt", description="Fold BatchNorm, export verified ONNX, run it with onnxruntime.")
    parser.add_argument("--version", action="version", version=f"bnrt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    fold = sub.add_parser("fold", help="fold BatchNorm, export ONNX, check equivalence")
    _model_args(fold)
    fold.add_argument("-o", "--output-dir", metavar="DIR", help="output folder (default: the model's folder)")
    fold.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu", help="ORT provider for the check")
    fold.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    fold.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    fold.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="torch ONNX exporter (default dynamo)")
    fold.add_argument("--samples", type=int, default=64, help="random samples when no --data (default 64)")
    fold.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    fold.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default {DEFAULT_ATOL:g})")
    fold.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default {DEFAULT_RTOL:g})")

    insp = sub.add_parser("inspect", help="list BatchNorms and what fold would do; writes nothing")
    _model_args(insp)
    return parser


def cmd_fold(args: argparse.Namespace) -> int:
    from .pipeline import fold_file
    from .report import check_table, decision_table

    if args.samples <= 0:
        raise InputError(f"--samples {args.samples}: must be positive")
    start = time.perf_counter()
    outcome = fold_file(
        args.model, args.output_dir, input_shapes=args.input_shape, arch=args.arch,
        trust_pickle=args.trust_pickle, data=args.data, provider=args.provider, run_check=not args.no_check,
        opset=args.opset, exporter=args.exporter, samples=args.samples, seed=args.seed,
        atol=args.atol, rtol=args.rtol,
    )
    print(decision_table(outcome.result.decisions))
    print(f"BatchNormalization nodes in ONNX: {outcome.onnx_batchnorm_nodes}")
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from .pipeline import inspect_file
    from .report import decision_table

    loaded, decisions = inspect_file(args.model, input_shapes=args.input_shape, arch=args.arch,
                                     trust_pickle=args.trust_pickle, data=args.data)
    print(f"{loaded.path}  arch {loaded.arch}  sha256 {loaded.sha256[:12]}")
    print(decision_table(decisions))
    return 0


COMMANDS = {"fold": cmd_fold, "inspect": cmd_inspect}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BnrtError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"bnrt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bnrt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a model's own code can raise anything; never show a bare traceback
        if args.debug:
            traceback.print_exc()
        print(f"bnrt: error: {args.model}: {type(exc).__name__}: {first_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2
