"""Recalibration of BatchNorm population statistics over a dataset (Ioffe & Szegedy, Algorithm 2).

Two modes:
- ``fast``: one pass like ``torch.optim.swa_utils.update_bn`` (BatchNorms normalise with batch
  statistics during the pass; other modules, Dropout included, stay in eval), but each BN's
  statistics are pooled exactly over all samples in float64 (Chan's merge of per-batch count, mean
  and M2) instead of averaging batch variances;
- ``exact``: BNs are calibrated one at a time in execution order, the model in eval mode with the
  new statistics of earlier BNs in force, so that afterwards every BN's normalised input over the
  calibration set has mean 0 and unbiased variance 1. One (early-stopped) pass per BN.
``running_var`` is the pooled unbiased variance M2 / (n − 1), as PyTorch keeps it.

Memory is O(C) per BN. With a ``torch.distributed`` process group, each rank passes over its own
shard and the ranks all-reduce count and sum (for the global mean), then the mean-corrected M2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnrt.io.artifacts import calibrated_checkpoint
from bnrt.io.data import InputSpec, load_data, make_inputs
from bnrt.io.images import Preprocess, listing_sha256
from bnrt.errors import InputError, OptionError, first_line
from bnrt.io.export import model_input_names
from bnrt.io.load import load
from bnrt.io.source import ModelSource, file_sha256
from bnrt.io.save import output_folder, refuse_overwrite, write_torch
from bnrt.io.shards import process_group, shard_rows

MODES = ("fast", "exact")
Progress = Callable[[str, int, int | None], None]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the BN being calibrated has been seen."""


@dataclass
class _Moments:
    """Per-channel count, mean and M2 (sum of squared deviations), float64 numpy, merged batch by
    batch."""

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    _shift: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge a batch (N, C, ...) in; returns its (mean, biased var) as float64 tensors.

        Shifted sums: d = x − shift with the shift close to the mean (the pooled mean so far, or
        this batch's first sample); Σd and Σd² per batch in the input's dtype (torch's pairwise
        reductions), pooled across batches in float64 with Chan's merge. Shifting keeps the sums
        free of the cancellation of E[x²] − E[x]² when |mean| ≫ std. Few tensor operations per
        call: the hook runs once per BN per batch."""
        x = x.detach()
        dims = (0,) + tuple(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        if self._shift is None or self._shift.dtype != x.dtype:
            self._shift = x[0].reshape(x.shape[1], -1)[:, 0].clone()
        d = x - self._shift.reshape((1, -1) + (1,) * (x.dim() - 2))
        s1, s2 = torch.stack((d.sum(dim=dims), (d * d).sum(dim=dims))).to(torch.float64).numpy()
        mean_d = s1 / n
        mean = self._shift.to(torch.float64).numpy() + mean_d
        m2 = np.maximum(s2 - s1 * mean_d, 0.0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
            self.count = total
        self._shift = torch.from_numpy(self.mean).to(x.dtype)  # the next batch shifts by the pooled mean
        return torch.from_numpy(mean), torch.from_numpy(m2 / n)

    def all_reduce(self, group) -> None:
        """Pool the moments of every rank of ``group`` (exactly: global mean first, then each
        rank's M2 corrected to it)."""
        import torch.distributed as dist

        c = self.mean.shape[0] if self.mean is not None else 0
        sizes = torch.tensor([float(self.count), float(c)], dtype=torch.float64)
        dist.all_reduce(sizes, group=group)
        channels = int(sizes[1].item()) // dist.get_world_size(group)
        mean = torch.from_numpy(self.mean) if self.mean is not None else torch.zeros(channels, dtype=torch.float64)
        m2 = torch.from_numpy(self.m2) if self.m2 is not None else torch.zeros(channels, dtype=torch.float64)
        total = sizes[0]
        sums = mean * self.count
        dist.all_reduce(sums, group=group)
        global_mean = sums / total
        corrected = m2 + self.count * (mean - global_mean) ** 2
        dist.all_reduce(corrected, group=group)
        self.count, self.mean, self.m2 = int(total.item()), global_mean.numpy(), corrected.numpy()


@dataclass
class CalibrationReport:
    mode: str
    samples: int
    batches: int
    passes: int
    bn: list[str] = field(default_factory=list)


def _batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


def _as_tuple(batch) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, np.ndarray):
        return (torch.from_numpy(batch),)
    return tuple(torch.from_numpy(b) if isinstance(b, np.ndarray) else b for b in batch)


def _set_statistics(bn: _BatchNorm, moments: _Moments, batches: int, name: str) -> None:
    if moments.count < 2:
        raise InputError(f"BatchNorm '{name}' saw {moments.count} value(s) per channel; calibration needs at least 2")
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(moments.mean))
        bn.running_var.copy_(torch.from_numpy(moments.m2 / (moments.count - 1)))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(batches)


def _run(model: nn.Module, batch, where: str) -> None:
    try:
        model(*_as_tuple(batch))
    except _Stop:
        pass
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in _as_tuple(batch))
        raise InputError(f"{where}: the model cannot run on a batch of shape {shapes} ({first_line(exc)})") from exc


def execution_order(model: nn.Module, batch, where: str = "data") -> list[str]:
    """Names of the BatchNorms (with running statistics) in the order a forward pass calls them."""
    order: list[str] = []
    handles = [bn.register_forward_pre_hook(lambda m, a, n=name: order.append(n) if n not in order else None)
               for name, bn in _batchnorms(model).items()]
    try:
        with torch.no_grad():
            _run(model, batch, where)
    finally:
        for h in handles:
            h.remove()
    return order


def calibrate(
    model: nn.Module,
    batches: Iterable | Callable[[], Iterable],
    *,
    mode: str = "fast",
    process_group=None,
    progress: Progress | None = None,
    where: str = "data",
) -> CalibrationReport:
    """Recompute every BatchNorm's running statistics of ``model`` (in place) over ``batches``.

    ``batches``: a re-iterable of input batches (tensors, arrays or tuples of them), or a function
    returning a fresh iterator; ``exact`` iterates it once per BN. ``process_group``: pool the
    statistics over a torch.distributed group (each rank passes its own shard). ``progress(stage,
    i, total)`` is called per batch. Raises ``InputError`` when the model cannot run on a batch.
    The model is left in eval mode.
    """
    if mode not in MODES:
        raise OptionError(f"`mode` {mode!r}: choose one of {', '.join(MODES)}")
    fresh = batches if callable(batches) else (lambda: batches)
    bns = _batchnorms(model)
    if not bns:
        raise InputError("the model has no BatchNorm with running statistics to calibrate")
    first = next(iter(fresh()), None)
    if first is None:
        raise InputError(f"{where}: no batches to calibrate on")
    order = [n for n in execution_order(model.eval(), first, where) if n in bns]
    report = CalibrationReport(mode, 0, 0, 0, order)
    if mode == "fast":
        _fast(model, bns, order, fresh, process_group, progress, where, report)
    else:
        _exact(model, bns, order, fresh, process_group, progress, where, report)
    model.eval()
    return report


def _pass(model, fresh, hooks, progress, stage, where, report, count_samples=False) -> int:
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    seen = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(fresh(), 1):
                _run(model, batch, where)
                if count_samples:
                    report.samples += int(_as_tuple(batch)[0].shape[0])
                seen = i
                if progress:
                    progress(stage, i, None)
    finally:
        for h in handles:
            h.remove()
    report.passes += 1
    return seen


def _total(group, count: int) -> int:
    """``count`` summed over the ranks of ``group`` (itself without a group)."""
    if group is None:
        return count
    import torch.distributed as dist

    value = torch.tensor([count], dtype=torch.float64)
    dist.all_reduce(value, group=group)
    return int(value.item())


def _fast(model, bns, order, fresh, group, progress, where, report) -> None:
    moments = {name: _Moments() for name in order}
    model.eval()

    def hook(bn, args, acc):
        # normalise with this batch's statistics, as a training-mode BN (and update_bn) would, at
        # eval-mode cost: the statistics are computed once, here, and lent to the BN
        mean, var = acc.add(args[0])
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)

    hooks = [(bns[name], lambda m, args, acc=moments[name]: hook(m, args, acc)) for name in order]
    report.batches = _total(group, _pass(model, fresh, hooks, progress, "fast", where, report, count_samples=True))
    for name in order:
        if group is not None:
            moments[name].all_reduce(group)
        _set_statistics(bns[name], moments[name], report.batches, name)


def _exact(model, bns, order, fresh, group, progress, where, report) -> None:
    model.eval()
    for k, name in enumerate(order):
        acc = _Moments()

        def hook(module, args, acc=acc):
            acc.add(args[0])
            raise _Stop  # later layers are not needed for this BN

        batches = _total(group, _pass(model, fresh, [(bns[name], hook)], progress,
                                      f"exact {k + 1}/{len(order)} {name}", where, report, count_samples=(k == 0)))
        if group is not None:
            acc.all_reduce(group)
        _set_statistics(bns[name], acc, batches, name)
        report.batches = batches


def residuals(model: nn.Module, batches: Iterable, where: str = "data") -> dict[str, tuple[float, float]]:
    """For each BatchNorm, in eval mode: max over channels of |mean| and of |var − 1| (unbiased
    variance) of its input standardised with the running statistics, (x − running_mean) /
    sqrt(running_var), over ``batches``. (eps is left out: by design it shrinks the normalised
    variance of a channel to var / (var + eps).)"""
    bns = _batchnorms(model)
    moments = {name: _Moments() for name in bns}

    def hook(module, args, name):
        x = args[0].detach().to(torch.float64)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.to(torch.float64).reshape(shape)
        std = torch.sqrt(module.running_var.to(torch.float64)).reshape(shape)
        moments[name].add((x - mean) / std)

    model.eval()
    handles = [bn.register_forward_pre_hook(lambda m, a, n=name: hook(m, a, n)) for name, bn in bns.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch, where)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in moments.items():
        if m.count > 1:
            out[name] = (float(np.abs(m.mean).max()), float(np.abs(m.m2 / (m.count - 1) - 1).max()))
    return out


def batches_of(arrays: Sequence[np.ndarray], batch_size: int) -> Callable[[], Iterable[tuple[torch.Tensor, ...]]]:
    """A re-iterable of batches over equally long arrays (the last batch may be short)."""
    n = arrays[0].shape[0]

    def gen():
        for start in range(0, n, batch_size):
            yield tuple(torch.from_numpy(a[start:start + batch_size]) for a in arrays)
    return gen


@dataclass
class CalibrationOutcome:
    """What ``calibrate_file`` did: the report, the residuals measured after it, the file written
    (None on ranks other than 0)."""

    report: CalibrationReport
    residuals: dict[str, tuple[float, float]]
    written: Path | None
    rank: int = 0


def calibrate_file(
    source: ModelSource | str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    mode: str = "fast",
    batch_size: int = 64,
    progress: Progress | None = None,
    measure: bool = True,
    preprocess: Preprocess = Preprocess(),
    workers: int = 0,
) -> CalibrationOutcome:
    """Recalibrate the BatchNorm statistics of the checkpoint at ``path`` over ``data`` (an .npz/.npy,
    or an image folder preprocessed by ``preprocess``, decoded by ``workers`` processes) and write a
    checkpoint (state_dict, arch, arch_kwargs, input_shape, and a ``bnrt_calibration`` entry) to
    ``output``. Under torchrun (WORLD_SIZE > 1) each rank takes its shard of the data, the ranks
    pool their statistics over a gloo process group and rank 0 writes the file."""
    source, out = ModelSource.of(source), Path(output)
    refuse_overwrite([out], [source.path, data])
    if batch_size <= 0:
        raise OptionError(f"`batch_size` {batch_size}: must be positive")
    loaded = load(source, needs_modules="bnrt calibrate")
    names = model_input_names(loaded.model, loaded.input_shapes)
    if Path(data).is_dir():
        dataset = make_inputs(InputSpec(data=data, preprocess=preprocess, workers=workers), names,
                              list(loaded.input_shapes or [None] * len(names)), where=str(source.path),
                              config=getattr(loaded.model, "pretrained_cfg", None))
    else:
        dataset = load_data(data, names)
    group, rank, world = process_group()
    try:
        shard = shard_rows(dataset.size, rank, world)
        arrays = [x[shard.start:shard.stop] for x in dataset.inputs]
        batches = batches_of(arrays, batch_size)
        report = calibrate(loaded.model, batches, mode=mode, process_group=group, progress=progress, where=str(data))
        report.samples = dataset.size if group is not None else report.samples
        found = residuals(loaded.model, batches(), where=str(data)) if measure and group is None else {}
    finally:
        if group is not None:  # a gloo group left open aborts the process at exit
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    written = None
    if rank == 0:
        with output_folder(out.parent if str(out.parent) else Path(".")):
            write_torch(out, calibrated_checkpoint(loaded.model.state_dict(), loaded, dataset.shapes(), {
                "mode": mode, "samples": report.samples, "batch_size": batch_size,
                "data_sha256": file_sha256(Path(data)) if Path(data).is_file() else listing_sha256(Path(data)),
                "preprocess": dataset.preprocess, "source_sha256": loaded.sha256, "world_size": world}))
        written = out
    return CalibrationOutcome(report, found, written, rank)
