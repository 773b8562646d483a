"""bnrt: fold BatchNorm out of PyTorch models, export verified ONNX, serve it with onnxruntime."""

from bnrt.version import __version__
from bnrt.train.calibrate import calibrate
from bnrt.errors import BnrtError, CaptureError, HealthError, InputError
from bnrt.io.export import export_onnx
from bnrt.folding.torchfold import FoldResult, fold
from bnrt.io.load import load_folded, load_model
from bnrt.io.source import ModelSource
from bnrt.io.data import InputSpec, make_inputs
from bnrt.pipeline.convert import fold_file
from bnrt.verify.check import CheckOptions, check, check_files, side
from bnrt.session import Session
from bnrt.verify.metrics import CheckReport

__all__ = [
    "__version__", "BnrtError", "CaptureError", "CheckOptions", "CheckReport", "FoldResult", "HealthError", "InputError",
    "InputSpec", "ModelSource", "make_inputs", "Session", "calibrate", "check", "check_files", "side", "export_onnx", "fold", "fold_file", "load_folded", "load_model",
]
