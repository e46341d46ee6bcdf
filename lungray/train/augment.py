"""Training-time augmentation of a whole batch at once on the training worker.

Geometry (rotation, zoom, shift, a random resized crop, optional mirror) is one affine
warp of the batch: a single `affine_grid` + `grid_sample` with a per-image matrix.
The rest is aimed at what changes between acquisition sites, measured on a second
site's films (docs/results.md): a collimation or detector frame (a black or white
border of random width on each side), a display curve (gamma, and a sigmoid window
like a SIGMOID VOI LUT), contrast, brightness, blur, noise, and random erasing of a
rectangle (so that no single region, such as a marker or a text label, decides).
Every random draw comes from the caller's `torch.Generator`, so a seed reproduces a
batch exactly.

Choices:
- hflip is off by default: chest films have a laterality (heart on the patient's
  left, aortic knob, gastric bubble), and a mirrored film is not a plausible input;
  a model could also learn dextrocardia as normal.
- The warp fills uncovered pixels with the image's border (padding_mode="border"),
  not zeros: zero fill draws hard black wedges and edges that never occur at
  screening time and that a CNN can pick up as an "augmented" cue, while replicated
  border pixels continue the film's own edge intensity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from lungray.configs import check_known_keys

# The settings added after the first release, at the values that reproduce the runs made
# before they existed (all off), so that a stored run is read as what it was.
ADDED_SINCE_FIRST_RELEASE = {"crop_area": 0.0, "crop_aspect": 0.0, "border_prob": 0.0, "window_prob": 0.0, "erase_prob": 0.0}
# Range of the blur sigma in pixels of a 224 px image; it scales with the image width so
# that the same physical softening is drawn at any resolution. The lower end keeps a
# drawn blur visible (a sigma near 0 would leave the image as it was).
BLUR_SIGMA_AT_224 = (0.25, 1.0)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; each range is drawn independently per image."""

    rotation_deg: float = 10.0  # angle in [-rotation_deg, rotation_deg]
    zoom: float = 0.1  # scale in [1-zoom, 1+zoom]
    shift: float = 0.08  # translation in [-shift, shift] as a fraction of the image size
    hflip: bool = False  # mirror with probability 0.5; off because laterality matters (module docstring)
    brightness: float = 0.1  # additive offset in [-brightness, brightness]
    contrast: float = 0.15  # factor in [1-contrast, 1+contrast] around the image mean
    gamma: float = 0.4  # log-uniform gamma in [1/(1+gamma), 1+gamma]
    blur_prob: float = 0.2  # probability of a Gaussian blur, sigma 0.25..1 px at 224 px
    noise_std: float = 0.02  # Gaussian noise with std uniform in [0, noise_std]
    crop_area: float = 0.4  # random resized crop: area fraction in [1-crop_area, 1] of the image
    crop_aspect: float = 0.25  # ...with aspect ratio log-uniform in [1/(1+crop_aspect), 1+crop_aspect]
    border_prob: float = 0.3  # probability of a black or white frame (collimation, detector edge)
    border_max: float = 0.1  # each side's frame width uniform in [0, border_max] of the size
    window_prob: float = 0.3  # probability of a sigmoid display curve (as a SIGMOID VOI window)
    erase_prob: float = 0.25  # probability of erasing one rectangle of 2-15% of the area
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "shift", "brightness", "gamma", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("zoom", "contrast", "crop_area", "border_max"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.crop_aspect < 0:
            raise ValueError(f"crop_aspect must be non-negative, got {self.crop_aspect}")
        for name in ("blur_prob", "border_prob", "window_prob", "erase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        check_known_keys(cls, data, "augmentation")
        return cls(**data)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _affine_matrices(n: int, height: int, width: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates in `affine_grid`'s [-1, 1] frame."""
    angle = torch.deg2rad(_uniform(n, -cfg.rotation_deg, cfg.rotation_deg, generator))
    scale = _uniform(n, 1.0 - cfg.zoom, 1.0 + cfg.zoom, generator)
    # A shift of a fraction f of the size is 2f in the [-1, 1] frame.
    shift = _uniform(2 * n, -2.0 * cfg.shift, 2.0 * cfg.shift, generator).view(n, 2)
    mirror = torch.ones(n, device=generator.device)
    if cfg.hflip:
        mirror = torch.where(torch.rand(n, generator=generator, device=generator.device) < 0.5, -1.0, 1.0)
    # The crop: the fraction of the width and height the output covers, placed anywhere inside.
    area = _uniform(n, 1.0 - cfg.crop_area, 1.0, generator)
    log_aspect = math.log1p(cfg.crop_aspect)
    crop_aspect = torch.exp(_uniform(n, -log_aspect, log_aspect, generator))
    crop_x = torch.sqrt(area * crop_aspect).clamp(max=1.0)
    crop_y = torch.sqrt(area / crop_aspect).clamp(max=1.0)
    place = _uniform(2 * n, -1.0, 1.0, generator).view(n, 2)
    offset_x, offset_y = shift[:, 0] + place[:, 0] * (1.0 - crop_x), shift[:, 1] + place[:, 1] * (1.0 - crop_y)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Rotating in pixels, not in the normalised frame, keeps non-square images unsheared.
    aspect = height / width
    return torch.stack(
        [
            torch.stack([cos * crop_x * mirror, -sin * aspect * crop_y, offset_x], dim=1),
            torch.stack([sin / aspect * crop_x * mirror, cos * crop_y, offset_y], dim=1),
        ],
        dim=1,
    )


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each image of (N, 1, H, W) with its own sigma (0 leaves it unchanged), as one grouped conv."""
    radius = max(1, math.ceil(3 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-6)[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    n = x.shape[0]
    # Images become channels of one sample so that groups=n gives each its own kernel.
    padded = F.pad(x.reshape(1, n, *x.shape[2:]), (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernels.view(n, 1, -1, 1), groups=n)
    return F.conv2d(rows, kernels.view(n, 1, 1, -1), groups=n).reshape(x.shape)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a (N, 1, H, W) batch in [0,1]; same shape, dtype and device, still in [0,1].

    `generator` may live on the CPU or on `x`'s device; parameters are drawn there and
    moved to `x`, so the result depends only on the generator's state.
    """
    if not cfg.enabled:
        return x
    n, _, height, width = x.shape
    per_image = (n, 1, 1, 1)
    out = x.float()

    def draw(low: float, high: float) -> torch.Tensor:
        return _uniform(n, low, high, generator).to(x.device).view(per_image)

    if cfg.rotation_deg or cfg.zoom or cfg.shift or cfg.hflip or cfg.crop_area or cfg.crop_aspect:
        theta = _affine_matrices(n, height, width, cfg, generator).to(x.device)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)

    log_gamma_max = math.log1p(cfg.gamma)
    out = out.clamp(0.0, 1.0) ** torch.exp(draw(-log_gamma_max, log_gamma_max))
    if cfg.window_prob > 0:
        out = torch.where(draw(0.0, 1.0) < cfg.window_prob, _sigmoid_window(out, draw(0.4, 0.6), draw(4.0, 10.0)), out)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * draw(1.0 - cfg.contrast, 1.0 + cfg.contrast) + mean
    out = out + draw(-cfg.brightness, cfg.brightness)

    if cfg.blur_prob > 0:
        min_sigma, max_sigma = (bound * width / 224 for bound in BLUR_SIGMA_AT_224)
        blurred = draw(0.0, 1.0) < cfg.blur_prob
        sigma = torch.where(blurred, draw(min_sigma, max_sigma), 0.0).view(n)
        out = _gaussian_blur(out, sigma, max_sigma)

    if cfg.noise_std > 0:
        noise = torch.randn(out.shape, generator=generator, device=generator.device).to(x.device)
        out = out + noise * draw(0.0, cfg.noise_std)
    out = out.clamp(0.0, 1.0)
    if cfg.border_prob > 0:
        out = _add_borders(out, cfg, generator)
    if cfg.erase_prob > 0:
        out = _erase_rectangles(out, cfg.erase_prob, generator)
    return out.to(x.dtype)


def _sigmoid_window(x: torch.Tensor, center: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """A sigmoid display curve through (0, 0) and (1, 1): the shape a SIGMOID VOI window gives a film."""
    low, high = torch.sigmoid(-slope * center), torch.sigmoid(slope * (1.0 - center))
    return (torch.sigmoid(slope * (x - center)) - low) / (high - low)


def _add_borders(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """A frame of random width per side, black or white, on a random `border_prob` of the images."""
    n, _, height, width = x.shape
    draws = torch.rand(n, 6, generator=generator, device=generator.device).to(x.device)
    framed = draws[:, 0] < cfg.border_prob
    value = (draws[:, 1] < 0.5).to(x.dtype)  # half black (electronic shutter), half white (collimator)
    top, bottom = (draws[:, 2] * cfg.border_max * height).long(), (draws[:, 3] * cfg.border_max * height).long()
    left, right = (draws[:, 4] * cfg.border_max * width).long(), (draws[:, 5] * cfg.border_max * width).long()
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    inside = (
        (rows >= top.view(n, 1, 1)) & (rows < (height - bottom).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1)) & (cols < (width - right).view(n, 1, 1))
    )
    frame = (~inside & framed.view(n, 1, 1)).unsqueeze(1)
    return torch.where(frame, value.view(n, 1, 1, 1), x)


def _erase_rectangles(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's erase of one rectangle (2-15% of the area, aspect 1/3..3) filled with noise."""
    n, _, height, width = x.shape
    draws = torch.rand(n, 5, generator=generator, device=generator.device)
    images = []
    for image, (chosen, area, log_ratio, top, left) in zip(x, draws.tolist()):
        if chosen >= prob:
            images.append(image)
            continue
        target = (0.02 + 0.13 * area) * height * width
        ratio = math.exp(math.log(1 / 3) + log_ratio * (math.log(3) - math.log(1 / 3)))
        h = min(height, max(1, round(math.sqrt(target * ratio))))
        w = min(width, max(1, round(math.sqrt(target / ratio))))
        fill = torch.rand((1, h, w), generator=generator, device=generator.device).to(x.device, x.dtype)
        images.append(TF.erase(image, int(top * (height - h + 1)), int(left * (width - w + 1)), h, w, fill))
    return torch.stack(images)
