"""ResNet feature extractor whose parameter names match torchvision's ResNet, so a local
torchvision ResNet-50 state dict loads into it (nothing is ever downloaded).

The classifier (avgpool, fc) is left out: M6 uses the last feature map, whose cells become the
image tokens (224 px -> 7x7 = 49 patches).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on 3x3, as torchvision
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNetFeatures(nn.Module):
    """conv1 / bn1 / maxpool / layer1..layer4, returning the [B, C, H/32, W/32] feature map."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), bottleneck: bool = True,
                 width: int = 64):
        super().__init__()
        block = Bottleneck if bottleneck else BasicBlock
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = width
        for stage, num_blocks in enumerate(layers):
            stage_width = width * 2**stage
            blocks = []
            for b in range(num_blocks):
                blocks.append(block(in_ch, stage_width, stride=2 if (b == 0 and stage > 0) else 1))
                in_ch = stage_width * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.out_channels = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state dict, dropping its classifier (fc.*); any other
        missing or unexpected key is an error."""
        trunk = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(trunk, strict=False)
        if missing or unexpected:
            raise ValueError(f"state dict does not match this ResNet: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
