"""ResNets from torchvision's blocks that return their four stage outputs, embedding and logits.

Stems: `imagenet` (7x7/2 conv + max-pool, torchvision's) and `cifar` (3x3/1 conv, no max-pool, as
in the original work's CIFAR models). `width` multiplies every stage's channel count (for small CPU
runs); at width 1 the parameter names and shapes equal torchvision's, so its weights load as they are.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


class NetOutput(NamedTuple):
    """The four stage outputs (layer1..layer4), the pooled embedding and the logits."""

    feats: list[Tensor]
    embed: Tensor
    logits: Tensor


class FeatureResNet(ResNet):
    """torchvision's ResNet, built at any width and with either stem, returning `NetOutput`."""

    def __init__(self, arch: str, num_classes: int = 1000, stem: str = "imagenet", width: float = 1.0) -> None:
        nn.Module.__init__(self)
        block, layers = ARCHS[arch]
        planes = [max(1, round(p * width)) for p in (64, 128, 256, 512)]
        # Attributes torchvision's _make_layer reads.
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = planes[0], 1, 1, 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
        self.stage_channels = [p * block.expansion for p in planes]
        self.arch, self.stem, self.width = arch, stem, width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> NetOutput:  # type: ignore[override]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        embed = torch.flatten(self.avgpool(x), 1)
        return NetOutput(feats, embed, self.fc(embed))


def build_resnet(arch: str, num_classes: int = 1000, stem: str = "imagenet", width: float = 1.0) -> FeatureResNet:
    """A `FeatureResNet` (see the module docstring)."""
    return FeatureResNet(arch, num_classes=num_classes, stem=stem, width=width)
