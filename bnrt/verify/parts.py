"""A check in parts: each process or machine runs the sides on its shard of the data
(``check_part``) and ``merge`` makes the parts into the report one process gives, number for number.

A part runs the single run's batches that hold the data's first ``HEAD`` samples and its own rows
(``bnrt.io.shards.shard_rows``), whole (a model's output may depend on what shares its batch): the
noise floor, the head-only candidates, the per-layer comparison and the localisation all use the
first samples, as one process does. It keeps every side's outputs on its own rows and what was
measured on the first samples; ``merge`` joins the outputs in row order and judges them once
(``check.judge``). A comparison that fails takes the first divergent module a part found (a part
whose own rows failed looks for it, on the first samples, as one process would).

``write_part`` / ``read_part``: a part as a JSON file (what was measured, schema
``bnrt.check-part/1``) beside an .npz of the outputs, never a pickle. Under torchrun ``gather``
brings every rank's part to rank 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bnrt.errors import InputError, OptionError
from bnrt.io.data import Dataset, concatenated, picked
from bnrt.io.save import atomic_path, write_json
from bnrt.io.shards import process_group, shard_rows
from bnrt.io.source import file_sha256
from bnrt.verify.check import CheckOptions, Model, Observed, judge, model_checks, observe, sides
from bnrt.verify.layers import LOCALISE_SAMPLES
from bnrt.verify.metrics import TRUTH_SAMPLES, CheckReport, Divergence, LayerCheck, Tolerances
from bnrt.verify.sides import Candidate

HEAD = max(TRUTH_SAMPLES, LOCALISE_SAMPLES)  # the first samples every part runs
PART_SCHEMA = "bnrt.check-part/1"


@dataclass
class Part:
    """Shard ``index`` of ``count``: its first row ``start`` of the data's ``size``, what it saw
    (``seen``: outputs on its rows, a head-only candidate's on the first samples), and per
    candidate the per-layer comparison and the first divergent module it found (or None)."""

    index: int
    count: int
    start: int
    size: int
    source: str
    preprocess: dict | None
    top_k: int
    tolerances: Tolerances
    seen: Observed
    layers: list[LayerCheck | None]
    divergences: list[Divergence | None]


def check_part(reference: Model, candidates: Sequence[Model | Candidate], data: Dataset, options: CheckOptions,
               index: int, count: int, *, output_names: list[str] | None = None, folds: list[dict] | None = None,
               note: Callable[[str], None] | None = None) -> Part:
    """The check of shard ``index`` of ``count`` of ``data`` (``check.check``'s arguments)."""
    note = note or (lambda text: None)
    rows, size, batch = shard_rows(data.size, index, count), data.size, options.batch_size
    reference, candidates = sides(reference, candidates, options)
    fixed = next((s.fixed_batch for s in [reference, *(c.side for c in candidates)] if s.fixed_batch), None)
    if fixed:
        raise OptionError(f"{data.source}: a graph that takes exactly {fixed} samples at a time cannot be "
                          "checked in parts (the first samples and each shard would have to be whole batches)")
    # whole batches of the single run only (a model's output can depend on what shares its batch):
    # the ones holding the first samples, then the ones holding this shard's rows
    first = min(size, -(-HEAD // batch) * batch)
    start = max(first, rows.start // batch * batch)
    stop = max(start, min(size, -(-rows.stop // batch) * batch))
    mine = picked(data, [*range(first), *range(start, stop)], first)
    keep = np.array([r if r < first else first + r - start for r in rows], dtype=np.int64)
    seen = observe(reference, candidates, mine, options, output_names, note, folds)
    comparisons = judge(seen, options)[0]
    model_checks(reference, candidates, comparisons, mine, folds, options, seen, note)
    kept = replace(seen, ref_out=[o[keep] for o in seen.ref_out],
                   outs=[o if head_only else [x[keep] for x in o] for o, (_, head_only, _) in zip(seen.outs,
                                                                                                   seen.candidates)],
                   labels=None if seen.labels is None else seen.labels[keep], recorded=None)
    return Part(index, count, rows.start, data.size, data.source, data.preprocess, options.top_k, options.tolerances,
                kept, [c.layers for c in comparisons], [c.divergence for c in comparisons])


def _same(parts: list[Part]) -> None:
    """Refuse parts that are not the shards of one check, saying what differs."""
    first = parts[0]
    indices = sorted(p.index for p in parts)
    if indices != list(range(first.count)) or any(p.count != first.count for p in parts):
        raise InputError(f"the parts are shards {', '.join(f'{p.index}/{p.count}' for p in parts)}; "
                         f"a merge needs each of 0/{first.count} .. {first.count - 1}/{first.count} once")
    keys = {"data": lambda p: (p.source, p.size, p.preprocess), "sides": lambda p: (p.seen.ref_label, p.seen.candidates),
            "outputs": lambda p: p.seen.names, "noise floor": lambda p: (p.seen.truth, p.seen.noise),
            "tolerances": lambda p: (p.tolerances, p.top_k)}
    for what, key in keys.items():
        if any(key(p) != key(first) for p in parts):
            raise InputError(f"the parts differ in their {what}: they are not shards of one check")


def merge(parts: Sequence[Part]) -> CheckReport:
    """The report of the check whose shards ``parts`` are (any order)."""
    parts = sorted(parts, key=lambda p: p.index)
    _same(parts)
    first = parts[0].seen
    joined = [[concatenated([p.seen.outs[i][k] for p in parts]) for k in range(len(first.outs[i]))]
              if not head_only else first.outs[i] for i, (_, head_only, _) in enumerate(first.candidates)]
    labels = None if first.labels is None else np.concatenate([p.seen.labels for p in parts])
    seen = replace(first, ref_out=[concatenated([p.seen.ref_out[k] for p in parts]) for k in range(len(first.ref_out))],
                   outs=joined, labels=labels)
    options = CheckOptions(tolerances=parts[0].tolerances, top_k=parts[0].top_k)
    comparisons, acc, stats, errors = judge(seen, options)
    for i, comparison in enumerate(comparisons):
        comparison.layers = parts[0].layers[i]
        if not comparison.passed:
            comparison.divergence = next((p.divergences[i] for p in parts if p.divergences[i] is not None), None)
    return CheckReport(parts[0].size, parts[0].source, parts[0].top_k, comparisons, acc, errors, seen.noise,
                       seen.truth if seen.pairs else None, noise_fallback=seen.fallback, accuracy_stats=stats,
                       preprocess=parts[0].preprocess)


def gather(part: Part) -> list[Part] | None:
    """Under torchrun: every rank's part on rank 0 (others: None); alone: ``[part]``."""
    group, rank, world = process_group()
    if group is None:
        return [part]
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    try:
        dist.gather_object(part, parts, dst=0, group=group)
    finally:  # a gloo group left open aborts the process at exit
        dist.barrier(group)
        dist.destroy_process_group()
    return parts if rank == 0 else None


def write_part(part: Part, path: str | Path) -> Path:
    """``part`` as ``path`` (JSON) and, beside it, the outputs as ``path`` with suffix .npz; returns
    the .npz path."""
    path = Path(path)
    seen, arrays = part.seen, {}
    arrays.update({f"ref.{k}": o for k, o in enumerate(seen.ref_out)})
    arrays.update({f"out.{i}.{k}": o for i, outs in enumerate(seen.outs) for k, o in enumerate(outs)})
    arrays.update({f"{kind}.{k}": pair[j] for k, pair in enumerate(seen.pairs or [])
                   for j, kind in enumerate(("anchor", "noisy"))})
    if seen.labels is not None:
        arrays["labels"] = seen.labels
    if any(not isinstance(a, np.ndarray) for a in arrays.values()):
        raise InputError(f"{path}: the model's outputs are not arrays; this check cannot be split into parts")
    outputs = path.with_suffix(".npz")
    with atomic_path(outputs) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_json(path, {
        "schema": PART_SCHEMA, "shard": [part.index, part.count], "start": part.start, "size": part.size,
        "source": part.source, "preprocess": part.preprocess, "top_k": part.top_k,
        "tolerances": asdict(part.tolerances), "reference": seen.ref_label, "candidates": seen.candidates,
        "names": seen.names, "outputs": [len(seen.ref_out), *(len(o) for o in seen.outs)],
        "noise_pairs": seen.pairs is not None,
        "truth": seen.truth, "fallback": seen.fallback, "noise": seen.noise,
        "layers": [None if x is None else _spelled(asdict(x)) for x in part.layers],
        "divergences": [None if x is None else _spelled(asdict(x)) for x in part.divergences],
        "arrays": outputs.name, "arrays_sha256": file_sha256(outputs)})
    return outputs


def read_part(path: str | Path) -> Part:
    """A part ``write_part`` wrote (its .npz beside it, checked against the digest it recorded)."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable part of a check ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("schema") != PART_SCHEMA:
        raise InputError(f"{path}: not a part of a check (schema {PART_SCHEMA}); write parts with --shard I/N --json")
    arrays_path = path.parent / meta["arrays"]
    if not arrays_path.is_file() or file_sha256(arrays_path) != meta["arrays_sha256"]:
        raise InputError(f"{path}: its outputs {arrays_path} are missing or not the ones it was written with")
    with np.load(arrays_path, allow_pickle=False) as arrays:
        a = {k: arrays[k] for k in arrays.files}
    (outputs, *counts), candidates = meta["outputs"], [tuple(c) for c in meta["candidates"]]
    pairs = [(a[f"anchor.{k}"], a[f"noisy.{k}"]) for k in range(outputs)] if meta["noise_pairs"] else None
    seen = Observed(meta["reference"], [a[f"ref.{k}"] for k in range(outputs)], candidates,
                    [[a[f"out.{i}.{k}"] for k in range(n)] for i, n in enumerate(counts)],
                    a.get("labels"), meta["names"], pairs, meta["truth"], meta["fallback"], meta["noise"])
    tolerances = meta["tolerances"]
    tolerances["per_output"] = {n: tuple(v) for n, v in tolerances["per_output"].items()}
    return Part(*meta["shard"], meta["start"], meta["size"], meta["source"], meta["preprocess"], meta["top_k"],
                Tolerances(**tolerances), seen, [None if x is None else LayerCheck(**_read(x)) for x in meta["layers"]],
                [None if x is None else Divergence(**_read(x)) for x in meta["divergences"]])


_NONFINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _spelled(record: dict) -> dict:
    """Non-finite numbers as the strings ``inf``, ``-inf``, ``nan`` (JSON has none; null would lose them)."""
    return {k: repr(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _read(record: dict) -> dict:
    return {k: _NONFINITE.get(v, v) if isinstance(v, str) and k not in ("module", "layer", "worst") else v
            for k, v in record.items()}
