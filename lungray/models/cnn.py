"""The plain CNN and the convolutional trunk it shares with the CNN-LSTM.

Both architectures are built on the same `ConvTrunk`, so a comparison between them
measures what the head adds (global pooling vs. a recurrent read of the feature map),
not a difference in the convolutional features underneath.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class ConvTrunk(nn.Module):
    """A 3x3 stem, then one block per width: `convs_per_block` 3x3 conv+BN+ReLU and a 2x2 max-pool.

    The stem's stride (2 by default) halves the input before the first block: the largest
    cost saving available, since the first block runs at the highest resolution, and
    at 224 px a radiograph keeps its findings at 112 px. The output stride is
    `stem_stride * 2**len(widths)`, so inputs must be at least that large.
    """

    def __init__(self, widths: Sequence[int], convs_per_block: int, stem_stride: int = 2, in_channels: int = 1):
        super().__init__()
        layers = _conv_bn_relu(in_channels, widths[0], stride=stem_stride)
        channels = widths[0]
        for width in widths:
            for _ in range(convs_per_block):
                layers += _conv_bn_relu(channels, width)
                channels = width
            layers.append(nn.MaxPool2d(kernel_size=2))
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> feature map (N, out_channels, h, w)."""
        return self.layers(images)


class CNN(nn.Module):
    """`ConvTrunk`, global average pooling, and a two-layer fully connected head with dropout.

    Global average pooling (rather than flattening the feature map) keeps the head's size
    independent of the input resolution, so one model accepts any input size from 64 px up.
    """

    def __init__(
        self,
        widths: Sequence[int],
        convs_per_block: int,
        fc_hidden: int,
        dropout: float,
        num_classes: int,
        stem_stride: int = 2,
    ):
        super().__init__()
        self.trunk = ConvTrunk(widths, convs_per_block, stem_stride)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.trunk.out_channels, fc_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_hidden, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) images in [0,1] -> (N, num_classes) logits."""
        features = self.trunk(images).mean(dim=(2, 3))
        return self.head(features)
