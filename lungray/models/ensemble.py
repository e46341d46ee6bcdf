"""An ensemble of trained models, with optional test-time augmentation, as one model.

A screening model trained on one archive is scored on others, where the intensity,
framing and patient mix differ; averaging models that learned different features (the
CNN pools its map, the CNN-LSTM reads it row by row) and views of the same film that
differ by a few percent of zoom and shift smooths out the decisions that hang on one
model's quirk or one exact framing.

The ensemble returns log-probabilities, which are valid logits for softmax
(softmax(log p) = p). A model directory can therefore hold an ensemble like any single
model, and evaluation, the comparison report and screening score it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lungray.configs import check_known_keys

ARCH = "ensemble"

# (zoom, shift x, shift y) per extra view, shifts as fractions of the image size: within
# the training augmentation's ranges (zoom 0.1, shift 0.08), so every view is an input the
# models learned from. No mirror: laterality matters on chest films.
TTA_VIEWS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "none": (),
    "zoom-shift": (
        (0.92, 0.0, 0.0),
        (1.08, 0.0, 0.0),
        (1.0, 0.05, 0.0),
        (1.0, -0.05, 0.0),
        (1.0, 0.0, 0.05),
        (1.0, 0.0, -0.05),
    ),
}


@dataclass(frozen=True)
class EnsembleConfig:
    """The members' architectures (model.json `architecture` dicts) and the TTA policy."""

    members: tuple[dict[str, Any], ...]
    tta: str = "none"
    arch: str = ARCH

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        if self.arch != ARCH:
            raise ValueError(f"an ensemble's arch is {ARCH!r}, got {self.arch!r}")
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        if any(member.get("arch") == ARCH for member in self.members):
            raise ValueError("ensembles do not nest: list the single models instead")
        if self.tta not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {tuple(TTA_VIEWS)}, got {self.tta!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "members": list(self.members), "tta": self.tta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleConfig:
        check_known_keys(cls, data, "ensemble config")
        return cls(**data)


def tta_views(images: torch.Tensor, policy: str) -> list[torch.Tensor]:
    """The input batch (N, C, H, W) and its `policy` views, each the same shape.

    Each view is one affine warp with the border replicated, as in training augmentation.
    """
    views = [images]
    for zoom, shift_x, shift_y in TTA_VIEWS[policy]:
        # affine_grid maps output to input coordinates in [-1, 1]: zooming in by `zoom`
        # samples 1/zoom of the frame, and a shift of a fraction f of the size is 2f there.
        theta = torch.tensor(
            [[1.0 / zoom, 0.0, -2.0 * shift_x], [0.0, 1.0 / zoom, -2.0 * shift_y]], dtype=images.dtype, device=images.device
        )
        grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views.append(warped.contiguous(memory_format=torch.channels_last))
    return views


class Ensemble(nn.Module):
    """Mean probability of every member over every view; forward returns its logarithm."""

    def __init__(self, members: Sequence[nn.Module], tta: str = "none") -> None:
        super().__init__()
        if tta not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {tuple(TTA_VIEWS)}, got {tta!r}")
        self.members = nn.ModuleList(members)
        self.tta = tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] -> (N, classes) log mean probabilities."""
        probabilities = [
            torch.softmax(member(view).float(), dim=1) for view in tta_views(images, self.tta) for member in self.members
        ]
        return torch.log(torch.stack(probabilities).mean(dim=0).clamp_min(torch.finfo(torch.float32).tiny))

    @property
    def explained(self) -> nn.Module:
        """The member whose Grad-CAM stands for the ensemble's: the first, on the unwarped image."""
        return self.members[0]
