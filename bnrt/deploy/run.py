"""``bnrt run``: an ONNX model over the inputs of a data file, in batches, its outputs written to an
.npz named like the model's outputs (atomically; never over an input)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnrt.errors import InputError
from bnrt.io.data import DEFAULT_BATCH, load_data, run_batched
from bnrt.io.save import atomic_path, refuse_overwrite
from bnrt.session import Session


@dataclass
class RunOutcome:
    """``outputs``: name -> (dtype, shape) of each output written; ``tf32``: the CUDA session's TF32
    (None elsewhere); ``written``: the .npz."""

    outputs: dict[str, tuple[str, tuple[int, ...]]]
    tf32: bool | None
    written: Path


def run_file(model: str | os.PathLike, inputs: str | os.PathLike, output: str | os.PathLike, *,
             provider: str = "cpu", threads: int = 0, tf32: bool | None = None,
             batch_size: int = DEFAULT_BATCH) -> RunOutcome:
    """Run ``model`` on the arrays of ``inputs`` (.npy for one input, .npz named like the inputs;
    NaN/Inf allowed: running is not judging) in batches of ``batch_size`` (a fixed batch axis
    decides instead) and write the outputs to ``output``. ``InputError`` naming the file for bad
    inputs, before anything is written."""
    refuse_overwrite([output], [model, inputs])
    session = Session(model, provider, threads, tf32=tf32)
    data = load_data(inputs, session.input_names, allow_nonfinite=True)
    fixed = session.inputs[0].shape[0] if session.inputs and session.inputs[0].shape else None
    try:
        arrays = run_batched(lambda xs: list(session.run_dict(dict(zip(session.input_names, xs))).values()), data,
                             fixed or batch_size)
    except InputError as exc:
        raise InputError(f"{inputs}: {exc}") from exc
    outputs = dict(zip(session.output_names, arrays))
    with atomic_path(Path(output)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **outputs)
    return RunOutcome({name: (str(a.dtype), tuple(a.shape)) for name, a in outputs.items()}, session.tf32, Path(output))
