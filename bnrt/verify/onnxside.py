"""ONNX models in a check: an ONNX file (or bytes) on ORT as a side, its values that hold torch
modules' outputs ("taps", read by ``bnrt.session.probe``) and its rounding-noise reference."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from bnrt.io.artifacts import folds_in
from bnrt.session import Session, probe
from bnrt.verify.localise import onnx_module_values
from bnrt.verify.metrics import NoiseReference
from bnrt.verify.sides import Side


def session_tf32(provider: str, tf32: bool | None) -> bool | None:
    """The ``tf32`` of a check's ORT session: on CUDA off unless asked for (exact float32); None
    (not applicable) elsewhere."""
    return bool(tf32) if provider == "cuda" else None


def onnx_taps(model: onnx.ModelProto, inputs: Sequence[np.ndarray], provider: str = "cpu",
              tf32: bool | None = None) -> dict[str, np.ndarray]:
    """Values of ``onnx_module_values`` computed on ``inputs``, keyed by module path."""
    values = onnx_module_values(model)
    got = probe(model, values.values(), inputs, provider=provider, tf32=tf32)
    return {module: got[value] for module, value in values.items() if value in got}


def rounding_noise(model: onnx.ModelProto, label: str, provider: str, tf32: bool | None = None,
                   seed: int = 0) -> NoiseReference:
    """The graph with every float32 initializer moved by one ULP on a random half of its elements:
    its difference from the graph is the float32 noise that re-rounding the weights (any fold) causes."""
    rng = np.random.default_rng(seed)
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    for init in noisy.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(init)
        away = np.where(rng.random(w.shape) < 0.5, np.float32(np.inf), np.float32(-np.inf))
        moved = np.where(rng.random(w.shape) < 0.5, np.nextafter(w, away), w)
        init.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), init.name))
    session = Session(f"{label} (weights re-rounded)", provider, model_bytes=noisy.SerializeToString(), tf32=tf32)
    return NoiseReference("rounding", session.run, lambda xs: onnx_taps(noisy, xs, provider, tf32))


def onnx_side(label: str, model: Path | bytes, provider: str = "cpu", tf32: bool | None = None) -> Side:
    """An ONNX file (or serialized model) on ORT, on CUDA with TF32 as asked (off by default); its
    graph (for taps) and its noise reference (``rounding_noise``) are made on first use. On CUDA
    with TF32 off, ``deployed`` makes the same model under ORT's default TF32."""
    tf32 = session_tf32(provider, tf32)

    def session_with(tf32: bool | None) -> Session:
        if isinstance(model, bytes):
            return Session(label, provider, model_bytes=model, tf32=tf32)
        return Session(model, provider=provider, tf32=tf32)

    session = session_with(tf32)
    graph = cache(lambda: onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model)))
    shapes = [spec.shape for spec in session.inputs]
    noise = cache(lambda: rounding_noise(graph(), label, provider, tf32))

    def deployed() -> Side:  # what a deployment gets: ORT's CUDA default, TF32 on
        twin = session_with(True)
        return Side(label=f"{label} tf32 (ORT default)", runner=twin.run, input_names=twin.input_names,
                    input_shapes=[], input_dtypes=[])

    return Side(label=label, runner=session.run, input_names=session.input_names, input_shapes=shapes,
                input_dtypes=[spec.dtype for spec in session.inputs], output_names=session.output_names,
                taps=lambda xs: onnx_taps(graph(), xs, provider, tf32),
                folds=folds_in(session.session.get_modelmeta().custom_metadata_map),
                fixed_batch=shapes[0][0] if shapes and shapes[0] else None,
                noise=NoiseReference("rounding", lambda xs: noise().runner(xs), lambda xs: noise().taps(xs)),
                deployed=deployed if provider == "cuda" and not tf32 else None)
