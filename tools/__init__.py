"""Benchmarks, reports and the example's training: scripts run as ``python -m tools.NAME``."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """The environment of a ``python -m bnrt`` child: this repository first on PYTHONPATH, then
    what the caller's PYTHONPATH held (packages carried beside a machine's own, as on a GPU box)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
