"""bnrt: fold BatchNorm out of PyTorch models, export verified ONNX, serve it with onnxruntime."""

from bnrt.version import __version__
from bnrt.train.calibrate import calibrate
from bnrt.errors import BnrtError, CaptureError, CheckFailed, HealthError, InputError
from bnrt.io.export import export_onnx
from bnrt.folding.torchfold import FoldResult, fold
from bnrt.io.load import ModelSource, load_folded, load_model
from bnrt.io.data import InputSpec
from bnrt.pipeline.convert import fold_file
from bnrt.check.sides import CheckOptions, check_files
from bnrt.deploy.run import Session
from bnrt.check.metrics import CheckReport, check

__all__ = [
    "BnrtError", "CaptureError", "CheckFailed", "CheckOptions", "CheckReport", "FoldResult", "HealthError", "InputError",
    "InputSpec", "ModelSource", "Session", "calibrate", "check", "check_files", "export_onnx", "fold", "fold_file", "load_folded", "load_model",
]
