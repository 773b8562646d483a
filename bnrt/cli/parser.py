"""The command line's grammar: one parser per command, composed of the argument groups
(``bnrt.cli.groups``) and the command's own flags."""

from __future__ import annotations

import argparse

from bnrt.cli.groups import CheckArgs, ImageArgs, ProgressArgs, RuntimeArgs, ShapeArgs, SourceArgs, add_data, on_off
from bnrt.deploy.inferenceservice import PROTOCOLS
from bnrt.deploy.serve import KEEP_ALIVE_S
from bnrt.io.data import DEFAULT_BATCH
from bnrt.io.export import DEFAULT_OPSET, EXPORTERS
from bnrt.pipeline.quantize import CALIBRATIONS, PRECISIONS
from bnrt.session import PROVIDERS
from bnrt.train.calibrate import MODES
from bnrt.version import __version__


def _fold(sub) -> None:
    p = sub.add_parser("fold", help="fold BatchNorm, export ONNX, check equivalence")
    p.add_argument("model", help="checkpoint (a dict with a state_dict, arch, input_shape; or with --trust-pickle a "
                                 "pickled nn.Module) or an ONNX model")
    SourceArgs().add(p)
    add_data(p)
    p.add_argument("-o", "--output-dir", metavar="DIR", help="output folder (default: the model's folder)")
    p.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    p.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}; torch checkpoints only)")
    p.add_argument("--exporter", choices=EXPORTERS, help="torch ONNX exporter (default dynamo; torch checkpoints only)")
    p.add_argument("--unshare", action="store_true",
                   help="give a layer called at several places (a shared detection head) a copy per call in the ONNX "
                        "file, so that each call's BN folds into its own copy; parameters grow by one layer per "
                        "further call (torch checkpoints only)")
    ShapeArgs.add(p)
    ProgressArgs.add(p)
    CheckArgs.add(p)
    ImageArgs.add(p)


def _check(sub) -> None:
    p = sub.add_parser("check", help="compare two models (torch checkpoints or ONNX files) on the same inputs")
    p.add_argument("reference", nargs="?", help="reference model: torch checkpoint or ONNX")
    p.add_argument("candidate", nargs="?", help="candidate model: torch checkpoint or ONNX")
    SourceArgs().add(p)
    add_data(p)
    CheckArgs.add(p)
    ImageArgs.add(p)
    p.add_argument("--reference-provider", choices=sorted(PROVIDERS), default="cpu",
                   help="ORT provider when the reference is ONNX (default cpu)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"samples per run (default {DEFAULT_BATCH})")
    p.add_argument("--save-inputs", metavar="FILE.npz", help="write the inputs used to FILE.npz")
    p.add_argument("--json", metavar="FILE", help="write the report (schema bnrt.check/3) to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="write error histograms per output (needs matplotlib)")
    p.add_argument("--no-localise", action="store_true", help="do not look for the first divergent module")
    p.add_argument("--shard", metavar="I/N", help="check shard I (0-based) of N of the data and write it as a part "
                   "with --json FILE (FILE.npz beside it holds the outputs)")
    p.add_argument("--merge", nargs="+", metavar="PART", help="the report of the parts --shard wrote (no models run)")
    ProgressArgs.add(p)


def _calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="recompute BatchNorm running statistics over a dataset")
    p.add_argument("model", help="checkpoint")
    p.add_argument("--data", required=True, metavar="FILE|DIR", help=".npz/.npy inputs, or an image folder, to "
                   "calibrate on")
    p.add_argument("-o", "--output", required=True, metavar="FILE.pt", help="calibrated checkpoint to write")
    p.add_argument("--mode", choices=MODES, default="fast",
                   help="fast: one pass, exact pooled statistics; exact: BN by BN, earlier ones in force (default fast)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default 64)")
    SourceArgs(shapes=False).add(p)
    p.add_argument("--no-residuals", action="store_true", help="skip the residual measurement pass")
    ImageArgs.add(p)
    ProgressArgs.add(p)


def _run(sub) -> None:
    p = sub.add_parser("run", help="run an ONNX model on inputs from a file")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--input", required=True, metavar="FILE", help=".npy (one input) or .npz (arrays named like the inputs)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.npz", help="outputs, named like the model's outputs")
    RuntimeArgs.add(p)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"samples per run (default {DEFAULT_BATCH}; a model with a fixed batch runs that many)")


def _serve(sub) -> None:
    p = sub.add_parser("serve", help="serve ONNX models over the KServe v2 HTTP protocol")
    p.add_argument("model", help="ONNX model or Triton-style repository (REPO/NAME/VERSION/model.onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=int, metavar="PORT",
                   help="also serve KServe v2 over gRPC on PORT (Triton's is 8001; 0 picks a free one)")
    p.add_argument("--poll-repo", type=float, metavar="SECONDS",
                   help="reload new, changed and removed model files this often, failing no request (default: never)")
    RuntimeArgs.add(p, "intra-op threads per model instance (default: ORT's; with --instances, the cores shared out)")
    p.add_argument("--instances", type=int, default=1,
                   help="sessions per model, each running a batch at once (default 1)")
    p.add_argument("--max-batch", type=int, default=32, help="samples merged into one run (default 32)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="wait for more requests up to this long (default 2)")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight per model before 503 (default 256)")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MB (default 64)")
    p.add_argument("--keep-alive-s", type=float, default=KEEP_ALIVE_S,
                   help=f"close a connection idle this long, before its first request too (default {KEEP_ALIVE_S:g})")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most, more are closed when accepted (default: ulimit -n less 64)")


def _triton(sub) -> None:
    p = sub.add_parser("triton", help="write a Triton model repository for an ONNX model")
    p.add_argument("model", help="ONNX model")
    p.add_argument("-o", "--output", required=True, metavar="REPO", help="repository folder")
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="max_batch_size when the batch axis is dynamic (default 8; 0: no batching)")
    p.add_argument("--gpu", action="store_true", help="instance_group kind KIND_GPU (default KIND_CPU)")
    p.add_argument("--instances", type=int, default=1, help="instances of the model (default 1)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads per instance (default 0: ORT's)")
    p.add_argument("--inter-threads", type=int, default=0, help="ORT inter-op threads (default 0: ORT's)")
    p.add_argument("--preferred-batch-sizes", type=_sizes, default=(), metavar="N[,N…]",
                   help="the dynamic batcher's preferred batch sizes")
    p.add_argument("--max-queue-delay-us", type=int, default=0, help="the dynamic batcher's wait (default 0)")
    p.add_argument("--warmup-data", metavar="FILE.npz", help="warm each instance up with the first sample of FILE")
    p.add_argument("--tf32", type=on_off, metavar="on|off", help="the CUDA provider's TF32 (--gpu; default: ORT's, on)")
    p.add_argument("--tensorrt", action="store_true", help="the TensorRT accelerator (--gpu)")
    p.add_argument("--fp16", action="store_true", help="TensorRT in FP16 precision (--tensorrt)")


def _kserve(sub) -> None:
    p = sub.add_parser("kserve", help="write a KServe InferenceService manifest serving a Triton repository")
    p.add_argument("repo", help="Triton model repository (bnrt triton -o REPO)")
    p.add_argument("--storage-uri", required=True, metavar="URI",
                   help="where REPO is uploaded (gs://BUCKET/PATH, s3://…, pvc://CLAIM/PATH)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="folder for NAME.yaml")
    p.add_argument("--name", help="service name (default: REPO's folder name)")
    p.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="v2", help="v2 (HTTP/REST) or grpc-v2 (default v2)")
    p.add_argument("--runtime-version", metavar="TAG", help="Triton image tag, e.g. 25.01-py3 (default: the runtime's)")
    p.add_argument("--cpu", default="1", help="CPU requested and limited (default 1)")
    p.add_argument("--memory", help="memory requested and limited (default: 1 GiB + twice the model files per instance)")
    p.add_argument("--gpus", type=int, help="GPUs per replica (default: 1 when a model has GPU instances, else 0)")
    p.add_argument("--min-replicas", type=int, default=1, help="default 1 (0: scale to zero)")
    p.add_argument("--max-replicas", type=int, default=1, help="default 1")
    p.add_argument("--service-account", metavar="NAME", help="service account with the storage credentials")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 4,8") from None


def _bench(sub) -> None:
    p = sub.add_parser("bench", help="latency and throughput of every deployment path, side by side")
    p.add_argument("model", help="checkpoint")
    SourceArgs().add(p)
    add_data(p)
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--iterations", type=int, default=20, help="timed calls per variant per round (default 20)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a latency chart (needs matplotlib)")


def _quantize(sub) -> None:
    p = sub.add_parser("quantize", help="fold, then quantize to INT8 or FP16, verified on your data")
    p.add_argument("model", help="checkpoint (folded first, as bnrt fold does) or an ONNX model (folded by the ONNX folder)")
    p.add_argument("--data", required=True, metavar="FILE.npz",
                   help="real inputs (and integer labels under 'y'): calibration (INT8), activation ranges (FP16), verification")
    p.add_argument("--precision", choices=PRECISIONS, default="int8", help="int8 (QDQ, per-channel) or fp16 (default int8)")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="output folder (default: the model's folder)")
    p.add_argument("--calibration", choices=CALIBRATIONS, default="minmax", help="INT8 activation calibration (default minmax)")
    p.add_argument("--calibration-samples", type=int, default=256, help="first samples of --data calibrated on (default 256)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="nodes kept in float32 (INT8)")
    p.add_argument("--no-keep-io-types", action="store_true", help="FP16: float16 inputs and outputs too")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="budget with labels: top-1 accuracy points lost at most (default 1.0)")
    p.add_argument("--max-disagreement", type=float, default=0.01,
                   help="budget without labels: fraction of samples whose top-1 changes at most (default 0.01)")
    SourceArgs().add(p)
    ProgressArgs.add(p)


def _inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list BatchNorms and what fold would do; writes nothing")
    p.add_argument("model", help="checkpoint or ONNX model")
    SourceArgs().add(p)
    add_data(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnrt", description="Fold BatchNorm, export verified ONNX, run it with onnxruntime.")
    parser.add_argument("--version", action="version", version=f"bnrt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_fold, _check, _calibrate, _run, _serve, _triton, _kserve, _bench, _quantize, _inspect):
        add(sub)
    return parser
