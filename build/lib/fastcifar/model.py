"""ResNetV2-20: the pre-activation ResNet of He et al. 2016 ("Identity Mappings in Deep Residual
Networks"), in the benchmark's widths: stem 3->64, then 16/16/16, 32/32/32, 64/64/64."""

from __future__ import annotations

import torch
from torch import nn

# (in channels, out channels, stride) of the nine residual blocks.
BLOCKS = [(64, 16, 1), (16, 16, 1), (16, 16, 1),
          (16, 32, 2), (32, 32, 1), (32, 32, 1),
          (32, 64, 2), (64, 64, 1), (64, 64, 1)]


class PreActBlock(nn.Module):
    """BN -> ReLU -> conv(stride) -> BN -> ReLU -> conv, plus the shortcut.

    When the shape changes the shortcut is a 1x1 conv on the *pre-activated* input, as in the paper.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride, cin) != (1, cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class ResNetV2(nn.Module):
    """Stem conv, nine pre-activation blocks, BN -> ReLU -> global average pool -> Linear. Returns logits."""

    def __init__(self, num_classes: int = 10, blocks: list[tuple[int, int, int]] = BLOCKS):
        super().__init__()
        self.stem = nn.Conv2d(3, blocks[0][0], 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(*(PreActBlock(*b) for b in blocks))
        self.bn = nn.BatchNorm2d(blocks[-1][1])
        self.fc = nn.Linear(blocks[-1][1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnetv2_20(num_classes: int = 10) -> ResNetV2:
    return ResNetV2(num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
