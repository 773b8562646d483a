"""Argument groups: each adds its flags to a parser, with their defaults and help, and builds the
library object they describe from the parsed flags (``SourceArgs`` -> ``ModelSource``,
``CheckArgs`` -> ``CheckOptions``, ``RuntimeArgs`` -> session settings, ``ProgressArgs`` -> whether
progress shows). Validation that argparse cannot do lives with the group that owns the flag.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path

from bnrt.errors import InputError
from bnrt.io.data import DEFAULT_BATCH, DEFAULT_SAMPLES, DISTRIBUTIONS, InputSpec
from bnrt.io.images import COLORS, PRESETS, Preprocess
from bnrt.io.shapes import ShapeOptions, parse_axes
from bnrt.io.source import KIND_NAMES, ModelSource
from bnrt.session import PROVIDERS
from bnrt.verify.check import CheckOptions
from bnrt.verify.metrics import DEFAULT_ATOL, DEFAULT_RTOL, DEFAULT_TOP_K, NOISE_FACTOR, Tolerances
from bnrt.verify.torchside import DEVICES


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive integers like 1,3,224,224")
    return dims


def value_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range like -1,1") from None
    return lo, hi


def tolerance(text: str) -> tuple[str | None, float]:
    name, sep, value = text.rpartition(":")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tolerance like 1e-4 or logits:1e-3") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance is a finite number >= 0")
    return (name if sep else None), number


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: choose on or off")
    return text == "on"


def positive(args: argparse.Namespace, *names: str) -> None:
    """``InputError`` naming the first of the flags ``names`` given a value <= 0."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} {value}: must be positive")


class SourceArgs:
    """Model source flags -> ``ModelSource``; ``shapes``: the command takes ``--input-shape``."""

    TORCH_ONLY = ("arch", "trust_pickle", "trust_code", "state_dict_key", "strip_prefix")
    PROGRAM_FLAGS = {"torchscript": ("opset",), "exported": ("trust_pickle", "opset")}

    def __init__(self, shapes: bool = True):
        self.shapes = shapes

    def add(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("model source")
        if self.shapes:
            g.add_argument("--input-shape", type=shape, action="append", metavar="SHAPE",
                           help="input shape with batch, e.g. 1,3,224,224; repeat for several inputs")
        g.add_argument("--arch", metavar="MOD:NAME", help="architecture class or factory (overrides the checkpoint's arch)")
        g.add_argument("--trust-pickle", action="store_true",
                       help="allow unpickling a full nn.Module: runs code from the file, use only for files you trust")
        g.add_argument("--trust-code", action="store_true",
                       help="allow importing the checkpoint's arch from a file in the current or the model's folder "
                            "(runs that code; installed packages need no flag)")
        g.add_argument("--state-dict-key", metavar="KEY",
                       help="the checkpoint entry holding the state_dict (default: state_dict, model_state_dict, model)")
        g.add_argument("--strip-prefix", metavar="PREFIX",
                       help="remove this prefix from the state_dict's keys (default: the one that makes them match "
                            "the architecture, e.g. Lightning's model.)")

    @staticmethod
    def build(args: argparse.Namespace, path: str) -> ModelSource:
        return ModelSource(Path(path), args.arch, args.trust_pickle, getattr(args, "input_shape", None),
                           args.trust_code, args.state_dict_key, args.strip_prefix)

    @classmethod
    def refuse_on_onnx(cls, args: argparse.Namespace, source: ModelSource, why: str, extra: tuple[str, ...] = ()) -> None:
        """One line naming every flag given that the model's kind does not use: torch-only flags
        (and ``extra``) with an ONNX model, checkpoint flags (and ``--exporter``) with a TorchScript
        archive or an ExportedProgram (the file is read only when such a flag is given)."""
        def given(names) -> list[str]:
            return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) not in (None, False)]

        names = (*extra, *cls.TORCH_ONLY)
        flags = given(names)
        if not flags:
            return
        if source.kind == "onnx":
            raise InputError(f"{source.path}: {', '.join(flags)} appl{'y' if len(flags) > 1 else 'ies'} to torch "
                             f"checkpoints only{why}")
        flags = given(n for n in names if n not in cls.PROGRAM_FLAGS.get(source.kind, names))
        if flags:
            raise InputError(f"{source.path}: {', '.join(flags)} do{'' if len(flags) > 1 else 'es'} not apply to "
                             f"{KIND_NAMES[source.kind]}, which is run as it is")


def add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="FILE|DIR", help=".npz/.npy inputs (and integer labels under 'y') to check "
                                                         "on, or a folder of images (DIR/<class>/*.png: labelled)")


def numbers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers like 0.485,0.456,0.406") from None
    return values


def crop(text: str) -> tuple[int, int]:
    dims = shape(text)
    if len(dims) > 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a crop like 224 or 224,192")
    return (dims[0], dims[-1])


class ImageArgs:
    """Image-folder flags (``--data DIR``) -> ``Preprocess``."""

    FLAGS = ("resize", "crop", "mean", "std", "color")

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("image folders (--data DIR; default: the model's channels, resized and "
                                      "center-cropped to its H x W, pixels in [0, 1])")
        g.add_argument("--preprocess", choices=sorted(PRESETS), help="a preset: imagenet = resize 256, crop 224, "
                       "ImageNet mean/std, rgb; timm = a timm model's own data config (flags below override)")
        g.add_argument("--resize", type=int, metavar="N", help="resize the shorter side to N (default: to cover the crop)")
        g.add_argument("--crop", type=crop, metavar="H[,W]", help="center crop (default: the model's H x W)")
        g.add_argument("--mean", type=numbers, metavar="A[,B,C]", help="subtracted per channel, after scaling to [0, 1]")
        g.add_argument("--std", type=numbers, metavar="A[,B,C]", help="divided per channel, after the mean")
        g.add_argument("--color", choices=COLORS, help="channel order (default: gray for 1 channel, rgb for 3)")
        g.add_argument("--workers", type=int, default=0, metavar="N",
                       help="processes decoding each batch of images (default 0: the main process)")

    @classmethod
    def build(cls, args: argparse.Namespace) -> Preprocess:
        base = PRESETS[args.preprocess] if getattr(args, "preprocess", None) else Preprocess()
        positive(args, "resize")
        if getattr(args, "workers", 0) < 0:
            raise InputError(f"--workers {args.workers}: must be 0 or more")
        given = {k: getattr(args, k) for k in cls.FLAGS if getattr(args, k, None) is not None}
        return replace(base, **given)


def add_tf32(parser, default: str) -> None:
    parser.add_argument("--tf32", type=on_off, metavar="on|off",
                        help=f"TF32 on CUDA: ORT's use_tf32 (and torch's matmul/cuDNN TF32 for --device cuda); "
                             f"cuda only (default {default})")


class CheckArgs:
    """Check flags -> ``CheckOptions`` (``--data`` is added by the command, beside its model)."""

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("check")
        g.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu", help="ORT provider for ONNX (default cpu)")
        g.add_argument("--device", choices=DEVICES, default="cpu", help="where torch sides of the check run (default cpu)")
        add_tf32(g, "off: checks compare exact float32")
        g.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                       help=f"random samples when no --data (default {DEFAULT_SAMPLES})")
        g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
        g.add_argument("--dist", choices=DISTRIBUTIONS, default="normal", help="random input distribution (default normal)")
        g.add_argument("--val-range", type=value_range, metavar="LO,HI", help="range of random values, e.g. 0,1")
        g.add_argument("--noise-factor", type=float, default=NOISE_FACTOR,
                       help=f"pass when the candidate's error against the float64 truth (torch) or the original graph "
                            f"(ONNX) is within this factor of the measured float32 noise floor (default {NOISE_FACTOR:g})")
        g.add_argument("--atol", type=tolerance, action="append", metavar="[OUTPUT:]X",
                       help=f"fixed absolute tolerance instead of the noise floor (with --rtol: |c-r| <= atol + rtol*|r|; "
                            f"default then {DEFAULT_ATOL:g}); OUTPUT:X for one output; repeatable")
        g.add_argument("--rtol", type=tolerance, action="append", metavar="[OUTPUT:]X",
                       help=f"fixed relative tolerance instead of the noise floor (default then {DEFAULT_RTOL:g}); "
                            "OUTPUT:X for one output; repeatable")
        g.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"k of top-k agreement (default {DEFAULT_TOP_K})")
        g.add_argument("--allow-nonfinite", action="store_true",
                       help="accept NaN/Inf in --data and in the reference's outputs, compared position by position "
                            "(default: a finding that fails the check)")
        g.add_argument("--no-per-layer", action="store_true",
                       help="judge the model outputs only, not also every folded layer's output against its own "
                            "noise floor (default: both)")

    @staticmethod
    def tolerances(args: argparse.Namespace) -> Tolerances:
        """``--atol``/``--rtol`` values (a bare number for every output, ``NAME:X`` for one; none:
        the noise-aware criterion), ``--noise-factor`` and ``--allow-nonfinite``."""
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

    @classmethod
    def build(cls, args: argparse.Namespace) -> CheckOptions:
        positive(args, "samples", "top_k", "batch_size")
        inputs = InputSpec(args.data, args.samples, args.seed, args.dist, args.val_range, args.allow_nonfinite,
                           ImageArgs.build(args), getattr(args, "workers", 0))
        return CheckOptions(inputs, args.provider, cls.tolerances(args), args.top_k,
                            getattr(args, "batch_size", DEFAULT_BATCH), not getattr(args, "no_localise", False),
                            args.tf32, args.device, not args.no_per_layer)


def named_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    return (name if sep else None), shape(dims)


class ShapeArgs:
    """``--dynamic-axes``, ``--static-ok``, ``--check-shapes`` -> ``ShapeOptions``."""

    FLAGS = ("dynamic_axes", "static_ok", "check_shapes")

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("dynamic axes (torch checkpoints)")
        g.add_argument("--dynamic-axes", action="append", metavar="[INPUT:]AXES",
                       help="axes of every input (0,2,3) or of one (x:0,2,3) the ONNX file leaves dynamic, verified "
                            "by running it at other sizes (default: the batch axis, 0); repeatable")
        g.add_argument("--static-ok", action="store_true",
                       help="when no exporter keeps an axis dynamic, export it fixed at the example's size "
                            "(default: an error naming the axis)")
        g.add_argument("--check-shapes", type=named_shape, action="append", metavar="[INPUT:]SHAPE",
                       help="a per-sample shape (3,96,80) the check also runs at when spatial axes are dynamic "
                            "(default: the example's x1.25 on every dynamic axis, and on the last one only); repeatable")

    @staticmethod
    def build(args: argparse.Namespace) -> ShapeOptions:
        spec = dict(parse_axes(text) for text in args.dynamic_axes) if args.dynamic_axes else None
        sets = None
        if args.check_shapes:
            sets = [{name: dims} for name, dims in args.check_shapes]
        return ShapeOptions(spec, args.static_ok, sets)


class RuntimeArgs:
    """ORT flags of the commands that run an ONNX file: provider, TF32, intra-op threads."""

    @staticmethod
    def add(parser: argparse.ArgumentParser, threads_help: str = "intra-op threads (default: ORT's)") -> None:
        g = parser.add_argument_group("runtime")
        g.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
        add_tf32(g, "ORT's, on")
        g.add_argument("--threads", type=int, default=0, help=threads_help)

    @staticmethod
    def build(args: argparse.Namespace) -> dict:
        return {"provider": args.provider, "tf32": args.tf32, "threads": args.threads}


class ProgressArgs:
    """``-q`` -> whether steps are listed on stderr (only on a terminal anyway)."""

    @staticmethod
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-q", "--quiet", action="store_true",
                            help="no progress on stderr (shown only on a terminal anyway)")

    @staticmethod
    def build(args: argparse.Namespace) -> bool:
        return sys.stderr.isatty() and not args.quiet
