"""Models of the built-in problems, written from scratch (no torchvision).

- :func:`digits_logistic`, :func:`digits_mlp`, :class:`DigitsCNN`: for the 8 x 8 digits;
- :class:`ResNet18`: the CIFAR variant of He et al.'s ResNet-18 (3 x 3 stem, stride 1, no max-pool;
  four stages of two basic blocks with 64, 128, 256, 512 channels, strides 1, 2, 2, 2; global
  average pool; one linear layer), 11.17 M parameters for 10 classes.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

DIGITS_FEATURES = 64  # 8 x 8 images, flattened
DIGITS_CLASSES = 10


def digits_logistic() -> nn.Module:
    """Multinomial logistic regression: one linear layer, 64 -> 10."""
    return nn.Linear(DIGITS_FEATURES, DIGITS_CLASSES)


def digits_mlp(hidden: int = 64) -> nn.Module:
    """64 -> hidden -> 10 with ReLU."""
    return nn.Sequential(nn.Linear(DIGITS_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, DIGITS_CLASSES))


class DigitsCNN(nn.Module):
    """Two 3 x 3 convolutions (16, 32 channels, ReLU), a 2 x 2 max-pool, one linear layer.

    Input: flattened 64-vectors (as the other digits models) or (N, 1, 8, 8) images.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32)):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, DIGITS_CLASSES)

    def forward(self, x):
        x = x.reshape(-1, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (a 1 x 1 conv + BN when the shape changes), ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32 x 32 images (the CIFAR variant: 3 x 3 stem, no max-pool)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_channels, width, stride), BasicBlock(width, width, 1)))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)
