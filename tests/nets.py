"""Architectures the tests save in checkpoints: a checkpoint's ``arch`` names an importable class
(``tests.nets:FunctionalBN``), so they live here rather than in a test module."""

from __future__ import annotations

import torch
from torch import nn


class FunctionalBN(nn.Module):
    """Statistics held as buffers/parameters, normalisation by F.batch_norm."""

    def __init__(self, training: bool = False, leak: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4))
        self.training_flag, self.leak = training, leak

    def forward(self, x):
        y = nn.functional.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta,
                                     self.training_flag, 0.1, 1e-3)
        if self.leak == "constant":
            return y + self.mean.sum()  # torch.fx bakes this into a tensor constant at trace time
        if self.leak == "proxy":
            return y + self.mean  # (N, 4, 4, 4) + (4,): a second graph use of the buffer
        return y


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x
