"""Fold eval-mode BatchNorm into the preceding convolution (for the frozen teacher).

In eval mode a BatchNorm is an affine map per channel, so `bn(conv(x))` equals one convolution with
rescaled weights and a bias: the teacher's forward then skips every BatchNorm kernel.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fastcd.errors import FastcdError
from fastcd.models.resnet import FeatureResNet

PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # torchvision's stem and block names


def _fold_sequential(seq: nn.Sequential) -> None:
    """conv -> bn pairs inside a Sequential (the downsample branches)."""
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        conv, bn = seq._modules[a], seq._modules[b]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            seq._modules[a] = fuse_conv_bn_eval(conv, bn)
            seq._modules[b] = nn.Identity()


def fold_batchnorm(net: FeatureResNet) -> FeatureResNet:
    """Replace each BatchNorm of `net` (in eval mode) by folding it into its convolution; in place."""
    if net.training:
        raise FastcdError("fold_batchnorm needs the network in eval mode (teacher.bn_mode: eval)")
    for module in list(net.modules()):
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
        for conv_name, bn_name in PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    left = [name for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise FastcdError(f"fold_batchnorm found no convolution before BatchNorm {left[0]!r}")
    return net
