"""Torch models in a check (``torch_side``): running one on numpy inputs (on the CPU or CUDA, TF32 as asked), its
modules' outputs ("taps", for localisation) and its float64 copy, the truth the noise floor is
measured against. Imports torch; the metrics do not.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from contextlib import contextmanager
from functools import cache
from typing import Collection, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bnrt.errors import OptionError
from bnrt.io.artifacts import folds_of
from bnrt.io.export import flatten_outputs, model_input_names, names_of_outputs
from bnrt.io.data import Runner
from bnrt.verify.metrics import NoiseReference, thinned
from bnrt.verify.sides import Side

DEVICES = ("cpu", "cuda")


def check_device(device: str) -> None:
    """``OptionError`` unless torch can run on ``device`` here."""
    if device not in DEVICES:
        raise OptionError(f"`device` {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"`device` cuda: torch {torch.__version__} has no CUDA device here "
                          f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'})")


@contextmanager
def torch_tf32(enabled: bool) -> Iterator[None]:
    """TF32 in torch's CUDA matmuls and cuDNN convolutions on (``enabled``) or off within the block.
    (cuDNN's default is on: an exact float32 check must turn it off.)"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def model_device(model: nn.Module) -> torch.device:
    return next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device


def torch_runner(model: nn.Module, device: str | None = None, tf32: bool = False,
                 names: list[str] | None = None) -> Runner:
    """Run ``model`` on numpy inputs; with ``device`` the model moves there (in place) on the first
    run, its inputs follow it, and on CUDA TF32 is as ``tf32`` says (off: exact float32). An empty
    ``names`` list gets the outputs' names (``names_of_outputs``) on the first run."""
    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if device is not None and model_device(model).type != device:
            model.to(device)
        where = model_device(model)
        with torch.inference_mode(), torch_tf32(tf32 and where.type == "cuda"):
            out = model(*(torch.from_numpy(np.asarray(x)).to(where) for x in inputs))
        if names is not None and not names:
            names.extend(names_of_outputs(out))
        return [t.detach().cpu().numpy() for t in flatten_outputs(out)]
    return run


def torch_taps(model: nn.Module, inputs: Sequence[np.ndarray], names: Collection[str] | None = None,
               limit: int | None = None) -> dict[str, np.ndarray]:
    """Output of every submodule (or of those ``names``) called exactly once, in the order the
    calls finished; ``limit``: about that many values kept per sample (``metrics.thinned``)."""
    taps: dict[str, np.ndarray] = {}
    calls: Counter = Counter()
    handles = []
    for name, module in model.named_modules():
        if not name or (names is not None and name not in names):
            continue

        def hook(_module, _args, out, name=name):
            calls[name] += 1
            if isinstance(out, torch.Tensor):  # copy: an in-place op may follow
                taps[name] = out.detach()[thinned(out.shape, limit)].cpu().numpy().copy()

        handles.append(module.register_forward_hook(hook))
    where = model_device(model)
    try:
        with torch.inference_mode(), torch_tf32(False):  # module outputs in exact float32
            model(*(torch.from_numpy(np.asarray(x)).to(where) for x in inputs))
    finally:
        for handle in handles:
            handle.remove()
    return {k: v for k, v in taps.items() if calls[k] == 1}


def float64_noise(model: nn.Module) -> NoiseReference:
    """The float64 truth of a torch model: a float64 copy (made on first use) run on float64 inputs."""
    def copy64() -> nn.Module:
        with warnings.catch_warnings():  # a TorchScript module's copy touches .grad of non-leaves
            warnings.simplefilter("ignore")
            return copy.deepcopy(model).double()

    double = cache(copy64)

    def inputs64(xs):
        return double(), [x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x for x in xs]

    def run(xs):
        m, xs = inputs64(xs)
        return torch_runner(m)(xs)  # where the model is: the reference ran first and placed it

    def taps(xs, names=None, limit=None):
        m, xs = inputs64(xs)
        return torch_taps(m, xs, names, limit)

    return NoiseReference("float64", run, taps)


def torch_side(model: nn.Module, *, label: str = "torch", input_shapes: list[tuple[int, ...]] | None = None,
               device: str = "cpu", tf32: bool | None = None, folds: list[dict] | None = None) -> Side:
    """A torch model as a check side; on ``device`` (moved there at its first run) with TF32 as
    ``tf32`` says (off by default: exact float32); " cuda" ends its label there. Its noise
    reference is its float64 copy. ``folds``: the folds bnrt made in it (default: those a model
    from ``bnrt.fold`` carries, ``bnrt_folded``)."""
    names = model_input_names(model, input_shapes)
    if folds is None and isinstance(getattr(model, "bnrt_folded", None), tuple):
        folds = folds_of(*model.bnrt_folded)
    outputs: list[str] = []  # named on the first run: the output's structure is known then
    return Side(label=label + (" cuda" if device == "cuda" else ""), runner=torch_runner(model, device, bool(tf32), outputs),
                output_names=outputs,
                input_names=names, input_shapes=list(input_shapes) if input_shapes else [None] * len(names),
                input_dtypes=[None] * len(names), taps=lambda xs, names=None, limit=None: torch_taps(model, xs, names, limit),
                folds=list(folds or []), noise=float64_noise(model),
                module_names=[name for name, _ in model.named_modules() if name],
                data_config=_data_config(model))


def _data_config(model) -> dict | None:
    """A timm model's data config (``pretrained_cfg``, older ``default_cfg``), if it is a dict."""
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return config if isinstance(config, dict) else None
