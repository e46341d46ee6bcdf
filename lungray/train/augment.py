"""Training-time augmentation of a whole batch at once on the training worker.

Geometry (rotation, zoom, shift, optional mirror) is one affine warp of the batch:
a single `affine_grid` + `grid_sample` with a per-image matrix. Photometry (gamma,
contrast, brightness, blur, noise) is there to make the models robust to the
intensity differences between scanners and sites, since they are scored on an
independent set from other acquisitions. Every random draw comes from the caller's
`torch.Generator`, so a seed reproduces a batch exactly.

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

from lungray.configs import check_known_keys

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
    gamma: float = 0.25  # log-uniform gamma in [1/(1+gamma), 1+gamma]
    blur_prob: float = 0.2  # probability of a Gaussian blur, sigma 0.25..1 px at 224 px
    noise_std: float = 0.02  # Gaussian noise with std uniform in [0, noise_std]
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "shift", "brightness", "gamma", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("zoom", "contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.blur_prob <= 1.0:
            raise ValueError(f"blur_prob must be in [0, 1], got {self.blur_prob}")

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
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Rotating in pixels, not in the normalised frame, keeps non-square images unsheared.
    aspect = height / width
    return torch.stack(
        [
            torch.stack([cos * mirror, -sin * aspect, shift[:, 0]], dim=1),
            torch.stack([sin / aspect * mirror, cos, shift[:, 1]], dim=1),
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

    if cfg.rotation_deg or cfg.zoom or cfg.shift or cfg.hflip:
        theta = _affine_matrices(n, height, width, cfg, generator).to(x.device)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)

    log_gamma_max = math.log1p(cfg.gamma)
    out = out.clamp(0.0, 1.0) ** torch.exp(draw(-log_gamma_max, log_gamma_max))
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
    return out.clamp(0.0, 1.0).to(x.dtype)
