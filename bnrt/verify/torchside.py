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
from typing import Callable, Collection, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bnrt.errors import OptionError
from bnrt.io.artifacts import folds_of
from bnrt.io.export import flatten_outputs, model_input_names, names_of_outputs
from bnrt.io.data import Runner, concatenated
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


@contextmanager
def _hooked(model: nn.Module, names: Collection[str] | None, keep: Callable[[str, torch.Tensor], None]
            ) -> Iterator[Counter]:
    """Forward hooks on every submodule (or those ``names``) within the block: ``keep(name, output)``
    hears each tensor output; the counter yielded counts each module's calls."""
    calls: Counter = Counter()
    handles = []
    for name, module in model.named_modules():
        if not name or (names is not None and name not in names):
            continue

        def hook(_module, _args, out, name=name):
            calls[name] += 1
            if isinstance(out, torch.Tensor):
                keep(name, out)

        handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def torch_taps(model: nn.Module, inputs: Sequence[np.ndarray], names: Collection[str] | None = None,
               limit: int | None = None) -> dict[str, np.ndarray]:
    """Output of every submodule (or of those ``names``) called exactly once, in the order the
    calls finished; ``limit``: about that many values kept per sample (``metrics.thinned``)."""
    taps: dict[str, np.ndarray] = {}

    def keep(name, out):  # copy: an in-place op may follow
        taps[name] = out.detach()[thinned(out.shape, limit)].cpu().numpy().copy()

    where = model_device(model)
    with _hooked(model, names, keep) as calls, torch.inference_mode(), torch_tf32(False):  # exact float32
        model(*(torch.from_numpy(np.asarray(x)).to(where) for x in inputs))
    return {k: v for k, v in taps.items() if calls[k] == 1}


class TapRecorder:
    """The module outputs ``torch_taps`` gives, caught while a run the check makes anyway goes
    through the first samples (the noise run, a head-only candidate), batch after batch: those of
    ``names`` thinned to about ``limit`` values per sample, the first rows kept while every module's
    together stay under ``budget`` values (at least one row; the per-layer comparison's sample
    count). ``taps(rows)``: the first ``rows`` of each, or None when fewer were kept or the outputs do
    not hold one row per sample (a module on a flattened batch). ``whole``: only the rows of the first
    run, all of them, are of use (a float32 model's outputs depend on its batch's size): none are
    kept when they do not fit."""

    def __init__(self, names: Collection[str], limit: int, budget: int, whole: bool = False):
        self.names, self.limit, self.budget, self.whole = set(names), limit, budget, whole
        self.parts: dict[str, list[np.ndarray]] = {}
        self.sizes: dict[str, int] = {}  # values per sample of each module's output (first call)
        self.kept = 0  # rows kept of the runs before this one
        self.runs = 0
        self.batched = False  # a run with hooks on took several samples: axis 0 was seen to be the samples
        self.twice: set[str] = set()  # modules called more than once in a run: no taps (as torch_taps)
        self.unusable = False  # outputs that are not one row per sample, rows that do not line up, an error

    def cap(self) -> int:
        """Rows kept in all: every module's values per sample so far within the budget."""
        return max(1, self.budget // max(1, sum(self.sizes.values())))

    def run(self, model: nn.Module, run: Callable[[], list[np.ndarray]], rows: int) -> list[np.ndarray]:
        """``run()`` (the model on the next ``rows`` samples) with the hooks on while rows are wanted;
        nothing the hooks meet stops the run (the recorder gives up instead)."""
        if self.unusable or self.kept >= self.cap() or (self.whole and self.runs):
            self.runs += 1
            return run()

        def keep(name, out):
            try:
                catch(name, out)
            except Exception:  # a tensor numpy cannot hold, say: the per-layer comparison taps on its own
                self.unusable = True

        def catch(name, out):
            if calls[name] > 1:
                self.twice.add(name)
                return
            parts = self.parts.get(name)
            if (out.ndim == 0 or out.shape[0] != rows or (self.runs and name not in self.sizes)
                    or (parts and parts[0].shape[1:] != out[thinned(out.shape, self.limit)].shape[1:])):
                self.unusable = True  # not one row per sample (a flattened batch), first seen later, reshaped
            if self.unusable:
                return
            index = thinned(out.shape, self.limit)
            self.sizes.setdefault(name, out[(slice(0, 1), *index[1:])].numel())
            cap = self.cap()
            self.parts.setdefault(name, []).append(out.detach()[:max(0, cap - self.kept)][index].cpu().numpy().copy())
            self._trim(cap)

        with _hooked(model, self.names, keep) as calls:
            outputs = run()
        self.runs += 1
        self.batched |= rows > 1
        self.kept = min(self.cap(), self.kept + rows)
        if any(sum(len(p) for p in parts) != self.kept for name, parts in self.parts.items()
               if name not in self.twice):
            self.unusable = True  # a module that skipped this run: its rows would not line up
        if self.unusable or (self.whole and self.kept < rows):  # a float32 run is of use only whole
            self.parts.clear()
            self.unusable = True
        return outputs

    def _trim(self, cap: int) -> None:
        for name, parts in self.parts.items():
            if sum(len(p) for p in parts) > cap:
                whole = np.concatenate(parts)[:cap].copy()
                self.parts[name] = [whole]

    def taps(self, rows: int) -> dict[str, np.ndarray] | None:
        if self.unusable or (rows > 1 and not self.batched) or (self.whole and rows != self.kept):
            return None  # single-sample runs never showed that axis 0 is the samples
        for name, parts in self.parts.items():  # joined once, in place
            if len(parts) > 1:
                self.parts[name] = [np.concatenate(parts)]
        joined = {name: parts[0] for name, parts in self.parts.items() if name not in self.twice}
        if not joined or any(len(v) < rows for v in joined.values()):
            return None
        return {name: v[:rows] for name, v in joined.items()}


def float64_noise(model: nn.Module) -> NoiseReference:
    """The float64 truth of a torch model: a float64 copy (made on first use) run on float64 inputs;
    its ``tapping`` runs catch module outputs on the way (``TapRecorder``)."""
    def copy64() -> nn.Module:
        with warnings.catch_warnings():  # a TorchScript module's copy touches .grad of non-leaves
            warnings.simplefilter("ignore")
            return copy.deepcopy(model).double()

    double = cache(copy64)

    def inputs64(xs):
        return double(), [x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x for x in xs]

    def run(xs, recorder: TapRecorder | None = None):
        m, xs = inputs64(xs)
        run64 = torch_runner(m)  # where the model is: the reference ran first and placed it
        parts = _thread_parts(len(xs[0]) if xs and np.ndim(xs[0]) else 0, m)
        outs = []
        for part in parts:
            inputs = xs if len(parts) == 1 else [x[part] for x in xs]
            rows = part.stop - part.start
            outs.append(run64(inputs) if recorder is None else recorder.run(m, lambda: run64(inputs), rows))
        return outs[0] if len(outs) == 1 else [concatenated([o[i] for o in outs]) for i in range(len(outs[0]))]

    def taps(xs, names=None, limit=None):
        m, xs = inputs64(xs)
        return torch_taps(m, xs, names, limit)

    return NoiseReference("float64", run, taps, tapping=lambda recorder: lambda xs: run(xs, recorder))


def _thread_parts(n: int, model: nn.Module) -> list[slice]:
    """How a float64 batch of ``n`` runs on the CPU: a multiple of torch's thread count at once, the
    rest one sample at a time. torch has no oneDNN kernel for float64 convolutions: its own one
    gives each thread whole samples (3 samples on 2 threads take as long as 4), while one sample
    runs its matrix products on every thread."""
    threads = torch.get_num_threads()
    whole = n - n % threads
    if model_device(model).type != "cpu" or threads < 2 or n % threads == 0 or n < 2:
        return [slice(0, n)]
    return ([slice(0, whole)] if whole else []) + [slice(i, i + 1) for i in range(whole, n)]


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
    runner = torch_runner(model, device, bool(tf32), outputs)
    exact = not (tf32 and device == "cuda")  # taps are exact float32: a TF32 run's are not
    return Side(label=label + (" cuda" if device == "cuda" else ""), runner=runner,
                tapping=(lambda recorder: lambda xs: recorder.run(model, lambda: runner(xs), len(xs[0]))) if exact
                else None,
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
