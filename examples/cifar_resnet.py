"""The CIFAR ResNets of He et al. (2016), "option A", matching the checkpoints in ../shared/models/cifar10.

Use it as a sensplan model spec, e.g.::

    sensplan scan --model examples/cifar_resnet.py:resnet20 \
        --weights ../shared/models/cifar10/resnet20_jpeg.pt \
        --data ../shared/data/cifar10-jpg/test --out scan.json

Architecture: conv3x3(3->16) -> BN -> ReLU; three stages of n basic blocks (16, 32, 64 channels; the
first block of stages 2 and 3 has stride 2); global average pool -> Linear(64, 10). When a block
changes shape, its shortcut has no parameters: it takes every second pixel and zero-pads the channel
dimension by planes//4 on each side. Torch-Pruning does not model that padding, so it merges each
residual stream into one group whose pruning breaks the model; sensplan detects and skips it.
Module names match the checkpoints: conv1, bn1, layer{1,2,3}.{i}.conv1|bn1|conv2|bn2, linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LambdaLayer(nn.Module):
    def __init__(self, fn):  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pad = planes // 4
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([3, 3, 3], num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([5, 5, 5], num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([9, 9, 9], num_classes)
