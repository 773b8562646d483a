"""Example CNN for scikit-learn's 8x8 digits: conv->BN->ReLU stem, a residual block, a depthwise
separable block and a Linear->BatchNorm1d head. Every BatchNorm sits where bnrt folds it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

INPUT_SHAPE = (1, 1, 8, 8)
TEST_FRACTION = 0.2
SPLIT_SEED = 0


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, groups: int = 1, bias: bool = False, relu: bool = True):
        layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([nn.ReLU()] if relu else []))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ConvBN(channels, channels), ConvBN(channels, channels, relu=False))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class DigitsNet(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.stem = ConvBN(1, width)
        self.block = Residual(width)
        self.depthwise = ConvBN(width, width, groups=width)
        self.pointwise = ConvBN(width, 2 * width, k=1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, hidden)
        self.fc_bn = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.block(self.stem(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.head(torch.relu(self.fc_bn(self.fc(x))))


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (x_train, y_train, x_test, y_test); x is float32
    (N, 1, 8, 8) scaled to [0, 1], y int64. The split is fixed (seeded, stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te
