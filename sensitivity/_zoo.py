"""Small real models in sensplan's registry: the demo's digits CNN and tiny nets for fast tests.

They run the same code paths as any user model (spec ``sensplan:<name>``).
"""

from __future__ import annotations

import torch
from torch import nn

from sensplan.sensitivity._models import register_model


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class _BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class DigitsNet(nn.Module):
    """A small residual CNN for 1-channel images: stem, one residual block, a strided conv, a head.

    The residual block couples the stem's and the block's second conv's channels into one group,
    so the demo shows group-wise scanning, not only single layers.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, width)
        self.block = _BasicBlock(width)
        self.down = _conv_bn(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.block(x)
        x = torch.relu(self.down(x))
        out: torch.Tensor = self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return out


@register_model
def digits_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """The offline demo's model: a residual CNN sized for 8x8 digits (about 60k parameters)."""
    return DigitsNet(in_channels, num_classes, width)


@register_model
def tiny_convnet(in_channels: int = 3, num_classes: int = 4, width: int = 8) -> nn.Module:
    """A plain conv-BN-ReLU stack with a flatten + linear head, for unit tests."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * 4, 16), nn.ReLU(),
        nn.Linear(16, num_classes),
    )


@register_model
def tiny_resnet(in_channels: int = 3, num_classes: int = 4, width: int = 8) -> nn.Module:
    """``DigitsNet`` at test size: one residual group, two single-conv groups, a linear head."""
    return DigitsNet(in_channels, num_classes, width)
