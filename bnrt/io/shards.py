"""Data split over processes: which rows a shard takes, and the process group torchrun sets up.

Shard ``index`` of ``count`` takes the rows ``np.array_split`` gives it (consecutive, sizes differing
by at most one). Under torchrun (``WORLD_SIZE`` > 1) ``process_group`` joins a gloo group (CPU
tensors and Python objects between ranks) and says this process's rank.
"""

from __future__ import annotations

import os
import re

from bnrt.errors import OptionError


def shard_rows(size: int, index: int, count: int) -> range:
    """The rows of shard ``index`` (0-based) of ``count`` over ``size`` samples."""
    base, extra = divmod(size, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (``--shard``) as (I, N): 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not int(match[1]) < int(match[2]):
        raise OptionError(f"`shard` {text!r}: give I/N with 0 <= I < N (e.g. 0/4)")
    return int(match[1]), int(match[2])


def process_group():
    """(group, rank, world size): a gloo group when launched by torchrun with WORLD_SIZE > 1, else
    (None, 0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size()
