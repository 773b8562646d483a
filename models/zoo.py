"""A zoo of small self-built architectures covering every BatchNorm placement bnrt meets in
practice. ``build(name)`` returns the model in eval mode with non-trivial BatchNorm statistics
(running statistics from a few training-mode batches, random gamma/beta), ``ZOO[name].input_shape``
its input shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def conv_bn(cin, cout, k=3, stride=1, groups=1, act: type[nn.Module] | None = nn.ReLU, dims=2):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


# --- ResNet-style -------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64, 128), classes=10):
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride, wide=1):
        super().__init__()
        cout, inner = width * 4, width * wide
        self.body = nn.Sequential(conv_bn(cin, inner, 1), conv_bn(inner, inner, 3, stride=stride),
                                  conv_bn(inner, cout, 1, act=None))
        self.down = conv_bn(cin, cout, 1, stride=stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.down(x))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (bottlenecks 3-4-6-3, 25.6M parameters), for the pipeline-cost
    benchmarks (tools/bench.py, tools/fold_cost.py); not in ZOO, whose models the tests fold one by
    one. ``counts`` and ``wide`` give torchvision's other layouts: ResNet-101 (3, 4, 23, 3), ResNet-152
    (3, 8, 36, 3), Wide ResNet-101-2 (3, 4, 23, 3) with ``wide=2``."""

    def __init__(self, classes=1000, counts=(3, 4, 6, 3), wide=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), counts)):
            for j in range(count):
                blocks.append(Bottleneck(cin, width, 2 if i and not j else 1, wide))
                cin = width * 4
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


# --- MobileNetV2 / V3-style ---------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        w = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(w))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, act=nn.ReLU6, se=False):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = conv_bn(cin, mid, 1, act=act)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid, act=act)
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.project = conv_bn(mid, cout, 1, act=None)

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2, act=nn.ReLU6)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 24, 2, 4),
                                    InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 32, 2, 4))
        self.head = conv_bn(32, 64, 1, act=nn.ReLU6)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class MobileNetV3(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2, act=nn.Hardswish)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 2, 1, act=nn.ReLU, se=True),
            InvertedResidual(16, 24, 2, 4, act=nn.ReLU),
            InvertedResidual(24, 24, 1, 3, act=nn.Hardswish, se=True),
            InvertedResidual(24, 40, 1, 3, act=nn.Hardswish, se=True),
        )
        self.head = conv_bn(40, 96, 1, act=nn.Hardswish)
        self.fc = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Linear(128, classes))

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


# --- ConvTranspose decoders: U-Net and a GAN generator -------------------------------------------

class UNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.enc1, self.enc2 = conv_bn(3, c), conv_bn(c, 2 * c, stride=2)
        self.bottom = conv_bn(2 * c, 4 * c, stride=2)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2, groups=2, bias=False)
        self.up2_bn = nn.BatchNorm2d(2 * c)
        self.dec2 = conv_bn(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1)
        self.up1_bn = nn.BatchNorm2d(c)
        self.dec1 = conv_bn(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        d2 = self.dec2(torch.cat([torch.relu(self.up2_bn(self.up2(b))), e2], 1))
        d1 = self.dec1(torch.cat([torch.relu(self.up1_bn(self.up1(d2))), e1], 1))
        return self.out(d1)


class Generator(nn.Module):
    def __init__(self, z=32, c=32):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(z, 4 * c, 4, 1, 0, bias=False), nn.BatchNorm2d(4 * c), nn.ReLU(),
            nn.ConvTranspose2d(4 * c, 2 * c, 4, 2, 1, bias=False, groups=4), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.ConvTranspose2d(c, 3, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z)


# --- MLPs and heads -------------------------------------------------------------------------------

class TabularMLP(nn.Module):
    """Input BatchNorm (folded forward into the first Linear), then Linear -> BN -> ReLU blocks."""

    def __init__(self, features=20, hidden=64, classes=3):
        super().__init__()
        self.input_bn = nn.BatchNorm1d(features)
        self.body = nn.Sequential(
            nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden, affine=False), nn.ReLU(),
        )
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(self.body(self.input_bn(x)))


class TokenMLP(nn.Module):
    """Tokens (N, L, C): Linear -> flatten to (N*L, C) -> BatchNorm1d -> reshape back, and a
    transpose variant (N, C, L) -> BatchNorm1d -> transpose back."""

    def __init__(self, dim=32, tokens=16, hidden=64, classes=5):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, dim), nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        n, length, _ = x.shape
        y = self.bn1(self.fc1(x).reshape(n * length, -1)).reshape(n, length, -1)
        y = torch.nn.functional.gelu(y)
        y = self.bn2(self.fc2(y).transpose(1, 2)).transpose(1, 2)
        return self.head((x + y).mean(1))


class ReIDHead(nn.Module):
    """Backbone -> pooled features -> BatchNorm1d bottleneck (BNNeck) -> Linear classifier."""

    def __init__(self, classes=50):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 32, stride=2), conv_bn(32, 64, stride=2), conv_bn(64, 128))
        self.neck = nn.BatchNorm1d(128)
        self.neck.bias.requires_grad_(False)
        self.classifier = nn.Linear(128, classes, bias=False)

    def forward(self, x):
        feat = torch.flatten(nn.functional.adaptive_avg_pool2d(self.backbone(x), 1), 1)
        return self.classifier(self.neck(feat))


# --- pre-activation ResNet: BN -> ReLU -> Conv (mostly not foldable) ----------------------------

class PreActBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(y)))


class PreActNet(nn.Module):
    def __init__(self, c=32, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(PreActBlock(c), PreActBlock(c), PreActBlock(c))
        self.final_bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        y = torch.relu(self.final_bn(self.blocks(self.stem(x))))
        return self.fc(y.mean((2, 3)))


# --- 1-d audio and 3-d volumes --------------------------------------------------------------------

class AudioNet(nn.Module):
    def __init__(self, classes=12):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16, 9, stride=4, dims=1), conv_bn(16, 32, 5, stride=2, dims=1),
            nn.Conv1d(32, 32, 3, padding=2, dilation=2, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
            conv_bn(32, 32, 3, groups=32, dims=1), conv_bn(32, 64, 1, dims=1),
        )
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(-1))


class Volume3d(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 8, dims=3), conv_bn(8, 16, stride=2, dims=3),
                                      conv_bn(16, 16, groups=4, dims=3), conv_bn(16, 32, stride=2, dims=3))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3, 4)))


# --- idioms of timm and torchvision ---------------------------------------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BatchNorm subclass with its activation: ``F.batch_norm`` in forward, a shape assert
    (a metadata read of the input), then the activation."""

    def __init__(self, c):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "BatchNormAct2d expects a 4-D input")
        if self.training:
            x = super().forward(x)
        else:
            x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                         self.eps)
        return self.act(self.drop(x))


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: BatchNorm with fixed statistics, all buffers."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.ones(c)), ("bias", torch.zeros(c)), ("running_mean", torch.zeros(c)),
                            ("running_var", torch.ones(c))):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class LinearNorm(nn.Module):
    """LeViT's Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as(x)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TimmStyle(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), FrozenBatchNorm2d(16)
        self.conv, self.bn_act = nn.Conv2d(16, 32, 3, padding=1, bias=False), BatchNormAct2d(32)
        self.proj = LinearNorm(32, 24)
        self.head_bn, self.drop, self.head = nn.BatchNorm1d(24), nn.Dropout(0.2), nn.Linear(24, classes)

    def forward(self, x):
        y = self.bn_act(self.conv(torch.relu(self.stem_bn(self.stem(x)))))
        tokens = self.proj(y.flatten(2).transpose(1, 2))
        return self.head(self.drop(self.head_bn(tokens.mean(1))))


# --- rep blocks: parallel conv+BN branches and an identity BN, summed ---------------------------

class RepBlock(nn.Module):
    """RepVGG / MobileOne training-time block: ``kxk`` 3x3 conv+BN branches, a 1x1 conv+BN branch
    and (stride 1, same channels) an identity BN, summed, then ReLU."""

    def __init__(self, cin, cout, stride=1, kxk=1, groups=1):
        super().__init__()
        self.kxk = nn.ModuleList(conv_bn(cin, cout, 3, stride=stride, groups=groups, act=False) for _ in range(kxk))
        self.scale = conv_bn(cin, cout, 1, stride=stride, groups=groups, act=False)
        self.identity = nn.BatchNorm2d(cin) if stride == 1 and cin == cout else None

    def forward(self, x):
        out = self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        for branch in self.kxk:
            out = out + branch(x)
        return torch.relu(out)


class RepNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.blocks = nn.Sequential(RepBlock(3, 16, stride=2), RepBlock(16, 16), RepBlock(16, 32, stride=2, kxk=2),
                                    RepBlock(32, 32, kxk=3, groups=4), RepBlock(32, 32))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


class RepVggDw(nn.Module):
    """RepViT's token mixer: a BN after the sum of a 3x3 depthwise conv+BN, a 1x1 depthwise conv
    and the input itself."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.conv1 = conv_bn(c, c, 3, groups=c, act=False), nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class RepMixerBlock(nn.Module):
    """FastViT's RepMixer ``x + γ·(mixer(x) − norm(x))`` (mixer: 3x3 and 1x1 depthwise conv+BN and
    an identity BN summed; norm: an identity BN), then a conv MLP scaled by a LayerScale."""

    def __init__(self, c):
        super().__init__()
        self.kxk, self.scale = conv_bn(c, c, 3, groups=c, act=False), conv_bn(c, c, 1, groups=c, act=False)
        self.identity, self.norm = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.mlp = nn.Sequential(conv_bn(c, 2 * c, 1, act=nn.GELU), nn.Conv2d(2 * c, c, 1))
        self.gamma2 = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        x = x + self.gamma * (self.kxk(x) + self.scale(x) + self.identity(x) - self.norm(x))
        return x + self.gamma2 * self.mlp(x)


class RepMixNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, stride=2)
        self.blocks = nn.Sequential(RepVggDw(16), RepMixerBlock(16), RepMixerBlock(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class SharedHead(nn.Module):
    """An EfficientDet-style shared head: one 3x3 conv applied to every pyramid level, each level
    with a BN of its own, then one shared 1x1 output conv (the levels' outputs flattened and
    concatenated)."""

    def __init__(self, levels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(levels))
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        feats, y = [], torch.relu(self.stem(x))
        for _ in self.bns:
            feats.append(y)
            y = nn.functional.max_pool2d(y, 2)
        return torch.cat([self.out(torch.relu(bn(self.conv(f)))).flatten(1) for f, bn in zip(feats, self.bns)], 1)


@dataclass(frozen=True)
class Entry:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str
    unshare: bool = False  # folded with --unshare


ZOO: dict[str, Entry] = {
    "resnet": Entry(ResNet, (1, 3, 32, 32), "ResNet-18-style, basic blocks, 1x1 downsample shortcuts"),
    "mobilenetv2": Entry(MobileNetV2, (1, 3, 32, 32), "inverted residuals, depthwise, ReLU6"),
    "mobilenetv3": Entry(MobileNetV3, (1, 3, 32, 32), "squeeze-excitation, hardswish"),
    "unet": Entry(UNet, (1, 3, 32, 32), "U-Net with grouped ConvTranspose -> BN decoder"),
    "generator": Entry(Generator, (1, 32, 1, 1), "DCGAN-style generator, ConvTranspose -> BN"),
    "tabular": Entry(TabularMLP, (1, 20), "input BN, Linear -> BN (affine and not)"),
    "token_mlp": Entry(TokenMLP, (1, 16, 32), "Linear -> flatten/transpose -> BatchNorm1d -> reshape"),
    "reid": Entry(ReIDHead, (1, 3, 64, 32), "pooled features -> BatchNorm1d -> Linear"),
    "preact": Entry(PreActNet, (1, 3, 16, 16), "pre-activation BN -> ReLU -> Conv"),
    "audio1d": Entry(AudioNet, (1, 1, 4000), "1-d conv net, strided, dilated, depthwise"),
    "volume3d": Entry(Volume3d, (1, 1, 16, 16, 16), "3-d conv net, grouped"),
    "timm_style": Entry(TimmStyle, (1, 3, 16, 16), "frozen-BN stem, BatchNormAct2d, LeViT LinearNorm, Dropout -> head"),
    "repnet": Entry(RepNet, (1, 3, 32, 32), "RepVGG/MobileOne blocks: 3x3 and 1x1 conv+BN branches, identity BN"),
    "repmixnet": Entry(RepMixNet, (1, 3, 32, 32), "RepViT's RepVggDw (BN after a sum with the input), FastViT's "
                                                  "RepMixer (a difference, LayerScales)"),
    "shared_head": Entry(SharedHead, (1, 3, 32, 32), "EfficientDet-style shared head: one conv on 3 pyramid levels, "
                                                     "a BN per level; folded with --unshare (+2 convs)", unshare=True),
}


def build(name: str, seed: int = 0, batches: int = 3) -> nn.Module:
    """``ZOO[name]`` in eval mode with running statistics from ``batches`` training-mode batches of
    shifted, scaled random data and random gamma/beta, so that every fold does real work."""
    entry = ZOO[name]
    torch.manual_seed(seed)
    model = entry.factory()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.numel()
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
        model.train()
        for _ in range(batches):
            model(torch.randn(8, *entry.input_shape[1:], generator=gen) * 2 + 0.5)
    return model.eval()
