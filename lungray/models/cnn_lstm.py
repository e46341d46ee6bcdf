"""The CNN-LSTM: the shared conv trunk, its feature map read as a sequence by an LSTM.

Design choices:
- Each sequence step is the C-vector of one feature-map row (or column), averaged
  across the other axis. Averaging keeps the LSTM's input size independent of the
  input resolution (a C*w step would tie the model to one image size), and after the
  trunk each row vector already describes what that band of the chest contains; the
  LSTM adds what global pooling throws away: the order of the bands, apex to base
  for rows. Reading "both" axes recovers the left-right layout that a row average loses.
- The classifier sees the LSTM outputs averaged over all steps, not the last step:
  a finding may sit at either end of the sequence, every step gets a direct gradient
  path, and it mirrors the plain CNN's global average pooling, so the two models
  differ only in the recurrent read.
- The LSTM always runs in float32, also under bf16/fp16 autocast: it is a tiny share
  of the compute, its recurrence accumulates rounding error step after step, and
  low-precision RNN kernels are not available on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lungray.models.cnn import ConvTrunk

# Feature-map axes each sequence mode reads, one LSTM per axis.
SEQUENCE_AXES: dict[str, tuple[str, ...]] = {
    "rows": ("rows",),
    "columns": ("columns",),
    "both": ("rows", "columns"),
}


# The (N, C, h, w) dimension each axis averages away: a row step averages over w.
_AVERAGED_DIM = {"rows": 3, "columns": 2}


def feature_sequence(features: torch.Tensor, axis: str) -> torch.Tensor:
    """(N, C, h, w) feature map -> (N, steps, C): rows top to bottom or columns left to right."""
    return features.mean(dim=_AVERAGED_DIM[axis]).transpose(1, 2)


class CNNLSTM(nn.Module):
    """`ConvTrunk`, one LSTM per read axis, and a dropout + linear classifier."""

    def __init__(
        self,
        widths: Sequence[int],
        convs_per_block: int,
        dropout: float,
        lstm_hidden: int,
        lstm_layers: int,
        bidirectional: bool,
        lstm_dropout: float,
        sequence: str,
        num_classes: int,
        stem_stride: int = 2,
    ):
        super().__init__()
        self.trunk = ConvTrunk(widths, convs_per_block, stem_stride)
        # Only the LSTMs the mode reads exist, so every parameter gets a gradient (DDP-safe).
        self.readers = nn.ModuleDict(
            {
                axis: nn.LSTM(
                    input_size=self.trunk.out_channels,
                    hidden_size=lstm_hidden,
                    num_layers=lstm_layers,
                    batch_first=True,
                    bidirectional=bidirectional,
                    dropout=lstm_dropout,
                )
                for axis in SEQUENCE_AXES[sequence]
            }
        )
        summary_size = len(self.readers) * lstm_hidden * (2 if bidirectional else 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(summary_size, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) images in [0,1] -> (N, num_classes) logits."""
        features = self.trunk(images)
        summaries = []
        with torch.autocast(device_type=features.device.type, enabled=False):
            for axis, lstm in self.readers.items():
                outputs, _ = lstm(feature_sequence(features, axis).float())
                summaries.append(outputs.mean(dim=1))
        return self.head(torch.cat(summaries, dim=1))
