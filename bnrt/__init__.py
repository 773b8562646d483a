"""bnrt: fold BatchNorm out of PyTorch models, export verified ONNX, serve it with onnxruntime."""

__version__ = "0.1.0"

from .calibrate import calibrate  # noqa: E402
from .errors import BnrtError, CaptureError, CheckFailed, HealthError, InputError  # noqa: E402
from .export import export_onnx  # noqa: E402
from .fold import FoldResult, fold  # noqa: E402
from .load import ModelSource, load_folded, load_model  # noqa: E402
from .data import InputSpec  # noqa: E402
from .pipeline import fold_file  # noqa: E402
from .sides import CheckOptions, check_files  # noqa: E402
from .run import Session  # noqa: E402
from .verify import CheckReport, check  # noqa: E402

__all__ = [
    "BnrtError", "CaptureError", "CheckFailed", "CheckOptions", "CheckReport", "FoldResult", "HealthError", "InputError",
    "InputSpec", "ModelSource", "Session", "calibrate", "check", "check_files", "export_onnx", "fold", "fold_file", "load_folded", "load_model",
]
