"""Each property of the training-time augmentation, one test at a time."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lungray.train.augment import AugmentConfig, augment_batch

torch.set_num_threads(1)


def _only(**strengths: float) -> AugmentConfig:
    """Every transform off except those named, so a test sees one transform alone."""
    nothing = AugmentConfig(
        rotation_deg=0.0, zoom=0.0, shift=0.0, brightness=0.0, contrast=0.0, gamma=0.0, blur_prob=0.0, noise_std=0.0,
        crop_area=0.0, crop_aspect=0.0, border_prob=0.0, window_prob=0.0, erase_prob=0.0,
    )
    return replace(nothing, **strengths)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _films(n: int, size: int = 64) -> torch.Tensor:
    """Smooth random images in [0,1] with pixels at both ends of the range."""
    base = torch.rand(n, 1, size // 8, size // 8, generator=_generator(1))
    films = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    films[:, :, 0, 0], films[:, :, -1, -1] = 0.0, 1.0
    return films


def _blob(n: int, size: int = 64) -> torch.Tensor:
    """A bright square on black, centred, in every image."""
    images = torch.zeros(n, 1, size, size)
    images[:, :, size // 2 - 4 : size // 2 + 4, size // 2 - 4 : size // 2 + 4] = 1.0
    return images


def _centroids(images: torch.Tensor) -> torch.Tensor:
    """(N, 2) intensity-weighted (x, y) centre of each image, in pixels."""
    size = images.shape[-1]
    coords = torch.arange(size, dtype=images.dtype)
    mass = images.sum(dim=(1, 2, 3))
    x = (images.sum(dim=(1, 2)) * coords).sum(dim=1) / mass
    y = (images.sum(dim=(1, 3)) * coords).sum(dim=1) / mass
    return torch.stack([x, y], dim=1)


def test_disabled_is_identity() -> None:
    films = _films(4)
    assert torch.equal(augment_batch(films, AugmentConfig(enabled=False), _generator()), films)


def test_same_seed_same_output_other_seed_other_output() -> None:
    films = _films(8)
    first = augment_batch(films, AugmentConfig(), _generator(7))
    assert torch.equal(first, augment_batch(films, AugmentConfig(), _generator(7)))
    assert not torch.allclose(first, augment_batch(films, AugmentConfig(), _generator(8)))


def test_output_stays_in_range_with_shape_and_dtype() -> None:
    strong = AugmentConfig(brightness=0.5, contrast=0.9, gamma=1.0, blur_prob=1.0, noise_std=0.3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        films = _films(16).to(dtype)
        out = augment_batch(films, strong, _generator())
        assert out.shape == films.shape and out.dtype == dtype
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert out.min() == 0.0 and out.max() == 1.0  # strong settings do reach the clamp


@pytest.mark.parametrize("hflip, expect_mirrored", [(False, False), (True, True)])
def test_mirrors_only_when_hflip_is_on(hflip: bool, expect_mirrored: bool) -> None:
    """Left half bright, right half dark: only a mirror can make the right side brighter."""
    films = torch.zeros(64, 1, 64, 64)
    films[..., :32] = 0.8
    out = augment_batch(films, AugmentConfig(hflip=hflip), _generator())
    mirrored = out[..., 32:].mean(dim=(1, 2, 3)) > out[..., :32].mean(dim=(1, 2, 3))
    assert bool(mirrored.any()) == expect_mirrored


def test_rotation_tilts_content_within_range() -> None:
    """The orientation of a horizontal bar, from its second moments, is the rotation angle."""
    bars = torch.zeros(64, 1, 64, 64)
    bars[:, :, 30:34, 12:52] = 1.0
    out = augment_batch(bars, _only(rotation_deg=20.0), _generator())
    x, y = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="xy")
    centre = _centroids(out)
    dx, dy = x - centre[:, 0, None, None], y - centre[:, 1, None, None]
    weights = out[:, 0]
    mu20, mu02, mu11 = ((weights * d).sum(dim=(1, 2)) for d in (dx * dx, dy * dy, dx * dy))
    tilt = torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02)).abs()
    assert tilt.max() <= 20.5
    assert tilt.max() > 10.0


def test_shift_moves_content_within_range() -> None:
    blobs = _blob(64)
    out = augment_batch(blobs, _only(shift=0.1), _generator())
    moved = (_centroids(out) - _centroids(blobs)).abs()
    assert moved.max() <= 0.1 * 64 + 0.5
    assert moved.max() > 3.0


def test_zoom_scales_content_within_range() -> None:
    blobs = _blob(64)
    out = augment_batch(blobs, _only(zoom=0.2), _generator())
    area_ratio = out.sum(dim=(1, 2, 3)) / blobs.sum(dim=(1, 2, 3))
    assert area_ratio.min() >= 0.8**2 - 0.05 and area_ratio.max() <= 1.2**2 + 0.05
    assert area_ratio.max() - area_ratio.min() > 0.3


def test_gamma_is_a_per_image_power_in_range() -> None:
    films = torch.full((64, 1, 8, 8), 0.5)
    out = augment_batch(films, _only(gamma=0.25), _generator())
    gammas = torch.log(out[:, 0, 0, 0]) / math.log(0.5)
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))
    assert gammas.min() >= 1 / 1.25 - 1e-4 and gammas.max() <= 1.25 + 1e-4
    assert gammas.max() - gammas.min() > 0.2


def test_contrast_scales_around_the_mean() -> None:
    films = 0.3 + 0.4 * _films(64)  # away from 0 and 1, so nothing is clamped
    out = augment_batch(films, _only(contrast=0.15), _generator())
    factor = out.std(dim=(1, 2, 3)) / films.std(dim=(1, 2, 3))
    assert torch.allclose(out.mean(dim=(1, 2, 3)), films.mean(dim=(1, 2, 3)), atol=1e-5)
    assert factor.min() >= 0.85 - 1e-4 and factor.max() <= 1.15 + 1e-4
    assert factor.max() - factor.min() > 0.1


def test_brightness_shifts_every_pixel_alike() -> None:
    films = 0.3 + 0.4 * _films(64)
    out = augment_batch(films, _only(brightness=0.1), _generator())
    offsets = out - films
    assert torch.allclose(offsets, offsets[:, :, :1, :1].expand_as(offsets), atol=1e-6)
    assert offsets.abs().max() <= 0.1 + 1e-6 and offsets.abs().max() > 0.05


def test_blur_smooths_about_blur_prob_of_the_images() -> None:
    checkers = ((torch.arange(224)[:, None] + torch.arange(224)[None, :]) % 2).float().expand(64, 1, 224, 224)
    out = augment_batch(checkers, _only(blur_prob=0.5), _generator())
    changed = (out != checkers).flatten(1).any(dim=1)
    assert 16 <= int(changed.sum()) <= 48  # Binomial(64, 0.5) within 4 standard deviations

    def variation(images: torch.Tensor) -> torch.Tensor:
        return images.diff(dim=-1).abs().sum(dim=(1, 2, 3))

    assert (variation(out[changed]) < variation(checkers[changed])).all()


def test_noise_is_zero_mean_and_bounded_by_noise_std() -> None:
    flat = torch.full((64, 1, 64, 64), 0.5)
    out = augment_batch(flat, _only(noise_std=0.02), _generator())
    stds = (out - flat).std(dim=(1, 2, 3))
    assert stds.max() <= 0.02 * 1.1 and stds.max() > 0.01
    assert (out - flat).mean().abs() < 1e-3


@pytest.mark.parametrize("n", [1, 64])
def test_each_image_of_a_batch_gets_its_own_draw(n: int) -> None:
    copies = _films(1).expand(n, -1, -1, -1)
    out = augment_batch(copies, AugmentConfig(), _generator())
    assert out.shape == copies.shape
    if n > 1:
        distinct = {tuple(image.flatten().tolist()) for image in out}
        assert len(distinct) == n


def test_crop_covers_the_drawn_fraction_of_the_image() -> None:
    """A crop of area a shows the film magnified by 1/sqrt(a): a centred blob grows in area by 1/a."""
    blob = _blob(64)
    out = augment_batch(blob, _only(crop_area=0.5), _generator())
    growth = out.sum(dim=(1, 2, 3)) / blob.sum(dim=(1, 2, 3))
    visible = growth > 0.5  # the crop may also leave the blob partly outside
    assert growth[visible].max() <= 2.0 * 1.15 and growth[visible].max() > 1.5
    assert growth.min() >= 0.0


def test_borders_frame_about_border_prob_of_the_images_in_black_or_white() -> None:
    flat = torch.full((200, 1, 64, 64), 0.5)
    out = augment_batch(flat, _only(border_prob=0.5, border_max=0.2), _generator())
    changed = (out != 0.5).flatten(1).any(dim=1)
    assert 70 <= int(changed.sum()) <= 130  # Binomial(200, 0.5) within 4 standard deviations
    assert set(out[out != 0.5].unique().tolist()) <= {0.0, 1.0}
    # The frame sits at the edge: the centre is never covered, and no side is wider than 20%.
    assert (out[:, :, 13:51, 13:51] == 0.5).all()


def test_sigmoid_window_keeps_ends_and_order_and_raises_contrast_in_the_middle() -> None:
    ramp = torch.linspace(0, 1, 64).expand(32, 1, 64, 64).contiguous()
    out = augment_batch(ramp, _only(window_prob=1.0), _generator())
    assert torch.allclose(out[..., 0], torch.zeros(32, 1, 64), atol=1e-5)
    assert torch.allclose(out[..., -1], torch.ones(32, 1, 64), atol=1e-5)
    assert (out.diff(dim=-1) >= -1e-6).all()  # monotone: a window never inverts a film
    middle_slope = (out[..., 36] - out[..., 27]) / (ramp[..., 36] - ramp[..., 27])
    assert (middle_slope > 1.0).all()


def test_erasing_replaces_one_rectangle_in_about_erase_prob_of_the_images() -> None:
    flat = torch.full((200, 1, 64, 64), 0.5)
    out = augment_batch(flat, _only(erase_prob=0.5), _generator())
    erased = (out != 0.5).flatten(1).sum(dim=1)
    assert 70 <= int((erased > 0).sum()) <= 130
    fractions = erased[erased > 0].float() / (64 * 64)
    assert fractions.max() <= 0.16 and fractions.min() >= 0.01


def test_config_round_trip_and_validation() -> None:
    config = AugmentConfig(rotation_deg=5.0, hflip=True, enabled=False)
    assert AugmentConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown augmentation keys: \\['sharpen'\\]"):
        AugmentConfig.from_dict({"sharpen": 1.0})
    with pytest.raises(ValueError, match="zoom"):
        AugmentConfig(zoom=1.0)
    with pytest.raises(ValueError, match="blur_prob"):
        AugmentConfig(blur_prob=1.5)
