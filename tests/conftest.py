from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "digits_cnn.pt"


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m bnrt ARGS`` in a subprocess, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "bnrt", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr containing every fragment, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def save_checkpoint(path: Path, model: torch.nn.Module, arch: str | None, input_shape=None, **extra) -> Path:
    ckpt = {"state_dict": model.state_dict(), **extra}
    if arch is not None:
        ckpt["arch"] = arch
    if input_shape is not None:
        ckpt["input_shape"] = list(input_shape)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def example() -> Path:
    return EXAMPLE
