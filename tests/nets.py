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


class DeepNoFold(nn.Module):
    """24 conv layers, each conv -> ReLU -> BatchNorm (a BN after a nonlinearity, before a zero-padded
    conv: nothing folds), with BNs that amplify: activations grow to the hundreds, float32 noise with
    them, and the output mixes large values and small differences of large values."""

    def __init__(self, depth: int = 24, width: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # conv initialisation from the seed, whatever ran before
            torch.manual_seed(seed)
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            convs = [nn.Conv2d(width, width, 3, padding=1) for _ in range(depth)]
            self.head = nn.Conv2d(width, 4, 3, padding=1)
        self.blocks = nn.ModuleList()
        for conv in convs:
            bn = nn.BatchNorm2d(width)
            with torch.no_grad():
                bn.running_mean.copy_(torch.rand(width, generator=gen) * 0.5)
                bn.running_var.copy_(torch.rand(width, generator=gen) * 0.5 + 0.25)
                bn.weight.copy_(torch.rand(width, generator=gen) * 0.6 + 2.3)
                bn.bias.copy_(torch.randn(width, generator=gen) * 0.5)
            self.blocks.append(nn.Sequential(conv, nn.ReLU(), bn))
        with torch.no_grad():  # outputs 2, 3 nearly cancel outputs 0, 1: small differences of large values
            self.head.weight[2:] = self.head.weight[:2] + 1e-6 * torch.randn(2, width, 3, 3, generator=gen)
            self.head.bias[2:] = self.head.bias[:2]

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        h = self.head(x).mean((2, 3))
        return torch.cat([h[:, :2], h[:, :2] - h[:, 2:]], 1)


class RepVggDw(nn.Module):
    """RepViT's RepVggDw: a BN after the sum of a 3x3 depthwise conv+BN, a 1x1 depthwise conv and
    the input itself (``bn=False``: the sum alone)."""

    def __init__(self, channels: int = 4, bn: bool = True):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                  nn.BatchNorm2d(channels))
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels) if bn else nn.Identity()

    def forward(self, x):
        x = torch.relu(x)
        return self.bn(self.conv(x) + self.conv1(x) + x)


class ExportTrap(nn.Module):
    """Conv and BN whose forward, while an exporter traces it, fails (``fail``) or touches ``marker``
    and sleeps: a fold that fails, or that a test can interrupt, in the middle of its export."""

    def __init__(self, marker: str = "", fail: bool = False):
        super().__init__()
        self.conv, self.bn, self.marker, self.fail = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), marker, fail

    def forward(self, x):
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            if self.fail:
                raise RuntimeError("this model cannot be exported")
            if self.marker:
                import pathlib
                import time

                pathlib.Path(self.marker).touch()
                time.sleep(60)
        return self.bn(self.conv(x))


class ShipNet(nn.Module):
    """A small classifier as users ship them: conv-BN-ReLU twice, global pooling, a linear head;
    ``randomised`` gives its BNs statistics far from the defaults."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def randomised(self, seed: int = 0) -> "ShipNet":
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    n = module.num_features
                    module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                    module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
        return self.eval()


class PinsBatch(nn.Module):
    """Python that branches on the batch size (as detection heads' shape caches do): torch.export
    pins the batch to the example's, a trace follows the branch taken (the same function here)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.shape[0] == 2:
            return y * 1.0
        return y


class TinyDetector(nn.Module):
    """A detector in miniature, as torchvision's: the backbone and heads run on the batch, the
    post-processing image by image (torch.fx cannot iterate a proxy), the number of detections
    depends on the values (torch.export cannot guard on it), one dict of ``boxes``/``scores``/``labels``
    per image. conv -> BN -> ReLU backbone, conv -> BN heads."""

    def __init__(self, classes: int = 3, cap: int = 12):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.cls = nn.Sequential(nn.Conv2d(8, classes, 1), nn.BatchNorm2d(classes))
        self.reg = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        self.cap = cap

    def forward(self, images):
        out = []
        features = self.backbone(images)
        for logits, regression in zip(self.cls(features), self.reg(features)):
            scores, labels = logits.flatten(1).T.sigmoid().max(1)
            keep = scores > 0.3
            if int(keep.sum()) > self.cap:
                keep = scores >= scores.topk(self.cap).values[-1]
            corners = regression.flatten(1).T
            boxes = torch.cat([corners[:, :2], corners[:, :2] + corners[:, 2:].exp()], 1)
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return out


class IteratedConv(nn.Module):
    """A conv output read twice, once by iterating over it (which torch.fx cannot trace, and a
    data-dependent test torch.export cannot guard on): the BN after the conv must not fold into it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        total = sum(row.sum() for row in y)
        z = self.bn(y)
        return z * 2 if total > 0 else z + total


class TinySeg(nn.Module):
    """A segmentation net in miniature: a stride-2 conv -> BN -> ReLU encoder, per-pixel logits
    upsampled to the size of the input it is given (any height and width)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        return nn.functional.interpolate(self.head(self.encoder(x)), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)


class SizeBaked(nn.Module):
    """conv -> BN, then the feature map's height and width read as Python ints: the eager model runs
    at any size, but a trace bakes the ints in and torch.export specialises them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        h, w = int(y.shape[2]), int(y.shape[3])
        return y.reshape(y.shape[0], 4, h * w).mean(2)


class CspMix(nn.Module):
    """YOLOv5's BottleneckCSP (``bn(cat(cv3(m(cv1(x))), cv2(x)))``, then an activation) followed by
    a mixed-kernel depthwise block (channel split, one conv per kernel size, ``cat``, BN): both BNs
    read a concatenation of convs."""

    def __init__(self):
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
        self.m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
        self.cv3, self.cv2 = nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(3, 4, 1, bias=False)
        self.bn, self.act = nn.BatchNorm2d(8), nn.SiLU()
        self.mix = nn.ModuleList(nn.Conv2d(4, 4, k, padding=k // 2, groups=4, bias=False) for k in (3, 5))
        self.mix_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.act(self.bn(torch.cat([self.cv3(self.m(self.cv1(x))), self.cv2(x)], 1)))
        a, b = y.split(4, 1)
        return self.head(torch.relu(self.mix_bn(torch.cat([self.mix[0](a), self.mix[1](b)], 1))))



class TimmConfigured(nn.Module):
    """A conv -> BN -> pool -> Linear classifier carrying a timm-style data config (``pretrained_cfg``),
    for ``--preprocess timm``."""

    def __init__(self):
        super().__init__()
        self.pretrained_cfg = {"input_size": (3, 8, 8), "crop_pct": 0.8, "interpolation": "bicubic",
                               "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_mode": "center"}
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.body(x)
