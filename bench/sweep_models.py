"""The shape sweep of bench/README.md: generated workloads over MLP width,
depth, outputs and batch size, CNN channels and image size, and two graph
models (ResNet-style with BatchNorm, MobileNet-style with depthwise
convolutions and squeeze-excitation).

Each case is built from its name alone (``build(name)``), so the
laplace-torch side of the harness (``torch_child.py``) rebuilds the very
module that ``make_workloads.py --sweep`` exported, graph models included,
and loads the exported weights into it. The grid is one axis at a time
around a middle shape, not a search for shapes we are fast on.
"""

import torch
import torch.nn.functional as F
from torch import nn


def mlp(d_in, width, depth, c):
    layers, a = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(a, width), nn.Tanh()]
        a = width
    return nn.Sequential(*layers, nn.Linear(a, c))


def cnn(c_in, c, size, classes=10):
    # Two Conv-ReLU-MaxPool blocks (channels c, 2c) and a Linear head.
    return nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2 * c * (size // 4) ** 2, classes))


class ResNet(nn.Module):
    """A two-stage ResNet of torchvision BasicBlocks (BatchNorm in eval mode)."""

    def __init__(self, c_in=3, c=16, classes=10):
        from torchvision.models.resnet import BasicBlock
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(c, c)
        self.layer2 = BasicBlock(c, 2 * c, stride=2, downsample=nn.Sequential(
            nn.Conv2d(c, 2 * c, 1, stride=2, bias=False), nn.BatchNorm2d(2 * c)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand, depthwise 3x3, squeeze-excitation, 1x1 project, residual."""

    def __init__(self, c, e, r):
        super().__init__()
        self.expand = nn.Conv2d(c, e, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn2 = nn.BatchNorm2d(e)
        self.se1 = nn.Conv2d(e, r, 1)
        self.se2 = nn.Conv2d(r, e, 1)
        self.project = nn.Conv2d(e, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.hardswish(self.bn1(self.expand(x)))
        h = F.hardswish(self.bn2(self.dw(h)))
        s = F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1)))))
        return self.bn3(self.project(h * s)) + x


class MobileNet(nn.Module):
    def __init__(self, c_in=3, c=16, e=64, r=8, blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(c_in, c, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[InvertedResidual(c, e, r) for _ in range(blocks)])
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(F.hardswish(self.stem(x))).mean((2, 3)))


# name -> (builder, input shape, points N, outputs C); C = 1 is regression.
CASES = {}
for w in (16, 64, 256, 1024, 4096):                      # width, at depth 2
    CASES[f"mlp_w{w}_d2"] = (lambda w=w: mlp(64, w, 2, 10), (64,), 512, 10)
for d in (1, 4, 8):                                       # depth, at width 64
    CASES[f"mlp_w64_d{d}"] = (lambda d=d: mlp(32, 64, d, 10), (32,), 512, 10)
for c in (1, 2, 100):                                     # outputs, at width 128
    CASES[f"mlp_w128_c{c}"] = (lambda c=c: mlp(32, 128, 2, c), (32,), 512, c)
for n in (32, 4096):                                      # batch size, at width 128
    CASES[f"mlp_w128_n{n}"] = (lambda: mlp(32, 128, 2, 10), (32,), n, 10)
for c_in, c, s, n in ((1, 8, 8, 512), (1, 4, 16, 256), (3, 16, 32, 128), (3, 32, 32, 64)):
    CASES[f"cnn_c{c}_s{s}"] = (lambda c_in=c_in, c=c, s=s: cnn(c_in, c, s), (c_in, s, s), n, 10)
CASES["resnet_c16_s16"] = (lambda: ResNet(3, 16), (3, 16, 16), 128, 10)
CASES["mobilenet_c16_s16"] = (lambda: MobileNet(3, 16), (3, 16, 16), 128, 10)


def randomize_bn_(model, gen):
    """Random BatchNorm affine parameters and running statistics (eval mode
    then computes a non-trivial affine map, as a trained network's does)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.exp(0.5 * torch.randn(m.running_var.shape, generator=gen)))


def build(name):
    """(model in eval mode, float32, seeded by name; input shape; N; C)."""
    import zlib
    builder, shape, n, c = CASES[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    model = builder().float()
    randomize_bn_(model, torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1))
    return model.eval(), shape, n, c
