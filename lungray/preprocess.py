"""The one preprocessing path: a decoded [0,1] image to the compact tensor a model sees.

Ingest, screening and training all go through `preprocess` / `to_float`, driven by a
`PreprocessConfig` that is saved beside what it produced (the ingest's summary.json and
then the model directory's model.json), so a model is always scored on exactly the
input it was trained on.

Steps, each a small function with its own test (MONAI-style):
1. `fit_aspect`: the aspect policy. Default "squash": the public chest X-ray sets this
   tool trains on are already square (ChestX-ray14 1024x1024; Kermany was squashed to
   224x224 by its publisher), so squashing keeps training and screening inputs alike and
   adds no artificial borders a CNN could learn as a source shortcut. "pad" keeps the
   anatomy's proportions (cardiothoracic ratio) and pads with black to a square.
2. `resize`: anti-aliased; "area" by default: shrinking, each output pixel is the mean of
   the source area it covers, a source pixel on its edge weighted by the part it covers
   (OpenCV's INTER_AREA). Pillow's BOX filter, which "area" was up to decoder version 5,
   takes whole source pixels instead, so a 2048 px film and its 1024 px reduced decode
   reached the model differently (docs/results.md, "Reduced-resolution decode").
3. `normalize_intensity`: "percentile" (default) stretches the 0.5th..99.5th percentile to
   [0,1] per image so that the input does not depend on a scanner's exposure, bit depth
   or windowing; "none" keeps the decoder's scaling. Padding (pixels the decoder's mask marks
   False: DICOM Pixel Padding, black already) does not count in the percentiles, so a frame
   of padding neither sets the scale nor, with the image's own dark pixels, turns white.
4. `quantize`: uint8 (default; 8 bits are what the screens and most public sets carry) or
   uint16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from lungray.configs import check_known_keys

ASPECT_POLICIES = ("squash", "pad")
# Pillow's filter for each interpolation; "area" uses OpenCV's exact area average where both
# sides shrink (every film), and Pillow's BOX otherwise (enlarged, the source pixel under each
# output pixel's centre).
INTERPOLATIONS = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}
INTENSITY_POLICIES = ("percentile", "none")
DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded image becomes a stored tensor; saved with every dataset and model."""

    size: int = 224
    aspect: str = "squash"
    interpolation: str = "area"
    intensity: str = "percentile"
    percentile_low: float = 0.5
    percentile_high: float = 99.5
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if self.aspect not in ASPECT_POLICIES:
            raise ValueError(f"aspect must be one of {ASPECT_POLICIES}, got {self.aspect!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.intensity not in INTENSITY_POLICIES:
            raise ValueError(f"intensity must be one of {INTENSITY_POLICIES}, got {self.intensity!r}")
        if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        check_known_keys(cls, data, "preprocessing")
        return cls(**data)


def fit_aspect(image: np.ndarray, policy: str) -> np.ndarray:
    """Make the image square by the aspect policy ("squash" leaves it to `resize`)."""
    if policy == "squash":
        return image
    rows, cols = image.shape
    side = max(rows, cols)
    padded = np.zeros((side, side), dtype=image.dtype)
    top, left = (side - rows) // 2, (side - cols) // 2
    padded[top : top + rows, left : left + cols] = image
    return padded


def resize(image: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """Resize a float image to size x size with an anti-aliasing filter.

    "area" shrinks by the exact area average, so that a film decoded at full size and the
    same film decoded at a fraction of it (`lungray.io.codecs`) give nearly the same input.
    """
    image = image.astype(np.float32, copy=False)
    if image.shape == (size, size):
        return image
    if interpolation == "area" and min(image.shape) >= size:
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return np.asarray(Image.fromarray(image, mode="F").resize((size, size), INTERPOLATIONS[interpolation]), dtype=np.float32)


def use_one_thread() -> None:
    """OpenCV's own thread pool off, for processes that decode with one CPU each (Ray's decode workers)."""
    cv2.setNumThreads(1)


def normalize_intensity(
    image: np.ndarray, policy: str, low: float = 0.5, high: float = 99.5, counted: np.ndarray | None = None
) -> np.ndarray:
    """Per-image percentile stretch, so exposure and bit depth do not reach the model.

    `counted` (bool, the image's shape) limits the percentiles to those pixels (the image
    without its padding); None, or no pixel counted, counts every pixel.
    """
    if policy == "none":
        return np.clip(image, 0.0, 1.0)
    sample = image if counted is None or not counted.any() else image[counted]
    lo, hi = np.percentile(sample, [low, high])
    if hi - lo < 1e-6:  # a flat image has no contrast to stretch
        return np.clip(image, 0.0, 1.0)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def quantize(image: np.ndarray, dtype: str) -> np.ndarray:
    """Round a [0,1] image to the stored integer type."""
    scale = np.iinfo(DTYPES[dtype]).max
    return np.rint(np.clip(image, 0.0, 1.0) * scale).astype(DTYPES[dtype])


def preprocess(image: np.ndarray, config: PreprocessConfig, mask: np.ndarray | None = None) -> np.ndarray:
    """Decoded 2-D float image in [0,1] -> stored (size, size) integer tensor.

    `mask` is the decoder's padding mask (`Decoded.mask`: False on padding, None for none):
    output pixels made wholly of image count in the percentile stretch; padding stays black.
    """
    square = fit_aspect(image, config.aspect)
    small = resize(square, config.size, config.interpolation)
    counted = None
    if mask is not None:  # the share of padding in each output pixel; the aspect policy's borders are not padding
        padding = resize(fit_aspect((~mask).astype(np.float32), config.aspect), config.size, config.interpolation)
        counted = padding <= 1e-6
    stretched = normalize_intensity(small, config.intensity, config.percentile_low, config.percentile_high, counted)
    return quantize(stretched, config.dtype)


def to_unit(samples: np.ndarray, full_scale: int) -> np.ndarray:
    """Integer samples / full_scale, divided in float32 in one pass: for every 8- and 16-bit
    value the same number as dividing in float64 and rounding (tests/test_preprocess.py)."""
    return np.divide(samples, np.float32(full_scale), dtype=np.float32)


def to_float(stored: Any) -> Any:
    """Stored integer tensor (numpy or torch) -> float32 in [0,1], scaled by its dtype's max."""
    if isinstance(stored, np.ndarray):
        return to_unit(stored, np.iinfo(stored.dtype).max)
    import torch

    max_value = {torch.uint8: 255.0, torch.uint16: 65535.0}.get(stored.dtype)
    if max_value is None:
        raise TypeError(f"cannot scale a stored tensor of dtype {stored.dtype}")
    return stored.to(torch.float32).div_(max_value)
