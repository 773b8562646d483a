"""Run stage: a thin layer over ``onnxruntime.InferenceSession``.

Providers are asked for by short name (``cpu``, ``cuda``). A provider that is not available, or a
session that silently fell back to another provider, is an error: bnrt never runs on the CPU when
CUDA was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .errors import InputError, first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_provider(short: str) -> str:
    """ORT's provider name for ``short``; ``InputError`` if unknown or not available here."""
    if short not in PROVIDERS:
        raise InputError(f"--provider {short!r}: choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[short]
    if name not in ort.get_available_providers():
        raise InputError(
            f"--provider {short}: {name} is not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a CUDA machine"
        )
    return name


class Session:
    """An ORT session on exactly the requested provider.

    ``path``: an ONNX file. ``provider``: ``cpu`` or ``cuda``. ``threads``: intra-op threads
    (0 = ORT's default). Raises ``InputError`` when the file cannot be loaded or the provider is
    unavailable or was not taken by the session.
    """

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int = 0) -> None:
        self.path = Path(path)
        self.provider = provider
        wanted = resolve_provider(provider)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        chain = [wanted] if wanted == PROVIDERS["cpu"] else [wanted, PROVIDERS["cpu"]]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=chain)
        except Exception as exc:
            raise InputError(f"{self.path}: onnxruntime cannot load it ({first_line(exc)})") from exc
        if self.session.get_providers()[0] != wanted:
            raise InputError(
                f"{self.path}: onnxruntime fell back to {self.session.get_providers()[0]} instead of {wanted}"
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs for positional ``inputs`` (in the order of the model's inputs)."""
        if len(inputs) != len(self.input_names):
            raise InputError(f"{self.path}: expects {len(self.input_names)} input(s) "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        return self.session.run(None, dict(zip(self.input_names, inputs)))
