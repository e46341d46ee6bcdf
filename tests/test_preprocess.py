"""Each preprocessing step on its own, then the composed path and its config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungray.preprocess import (
    PreprocessConfig,
    fit_aspect,
    normalize_intensity,
    preprocess,
    quantize,
    resize,
    to_float,
    to_unit,
)


def test_fit_aspect_squash_keeps_the_image_and_pad_centres_it() -> None:
    image = np.ones((4, 8), np.float32)
    assert fit_aspect(image, "squash") is image
    padded = fit_aspect(image, "pad")
    assert padded.shape == (8, 8)
    assert padded[:2].sum() == 0 and padded[6:].sum() == 0 and padded[2:6].min() == 1


def test_resize_area_averages_blocks() -> None:
    image = np.kron(np.array([[0.0, 1.0], [1.0, 0.0]], np.float32), np.ones((4, 4), np.float32))
    np.testing.assert_allclose(resize(image, 2, "area"), [[0, 1], [1, 0]], atol=1e-6)
    stripes = np.tile(np.array([0.0, 1.0], np.float32), (64, 32))  # 1-px stripes alias without a filter
    np.testing.assert_allclose(resize(stripes, 16, "area"), 0.5, atol=1e-6)


@pytest.mark.parametrize(("rows", "cols", "size"), [(37, 23, 8), (64, 45, 14), (2048 // 16, 1841 // 16, 14)])
def test_resize_area_shrinks_by_the_exact_area_each_output_pixel_covers(rows: int, cols: int, size: int) -> None:
    """Oracle: every source pixel repeated size x size times, then the mean of each (rows x cols)
    block: the exact area average, edge pixels weighted by the part they cover. (Pillow's BOX
    filter, whole pixels only, misses it by up to a quarter of the range here.)"""
    image = np.random.default_rng(rows).random((rows, cols)).astype(np.float32)
    fine = np.repeat(np.repeat(image.astype(np.float64), size, axis=0), size, axis=1)
    oracle = fine.reshape(size, rows, size, cols).mean(axis=(1, 3))
    np.testing.assert_allclose(resize(image, size, "area"), oracle, atol=1e-5)


def test_resize_area_enlarges_with_the_source_pixel_under_each_centre() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(resize(image, 8, "area"), np.repeat(np.repeat(image, 2, axis=0), 2, axis=1))


def test_resize_is_identity_at_target_size() -> None:
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    np.testing.assert_array_equal(resize(image, 32), image)


def test_percentile_normalisation_removes_exposure_and_gain() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    dim = 0.2 + 0.3 * image  # the same anatomy, another exposure and window
    np.testing.assert_allclose(normalize_intensity(dim, "percentile"), normalize_intensity(image, "percentile"), atol=1e-5)
    assert normalize_intensity(dim, "none").max() <= 0.5 + 1e-6


def test_flat_image_is_not_stretched() -> None:
    flat = np.full((8, 8), 0.3, np.float32)
    np.testing.assert_allclose(normalize_intensity(flat, "percentile"), flat)


@pytest.mark.parametrize("dtype,scale", [("uint8", 255), ("uint16", 65535)])
def test_quantize_and_to_float_round_trip(dtype: str, scale: int) -> None:
    image = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, -1)
    stored = quantize(image, dtype)
    assert stored.dtype == np.dtype(dtype) and stored.max() == scale
    np.testing.assert_allclose(to_float(stored), image, atol=0.5 / scale + 1e-7)
    np.testing.assert_allclose(to_float(torch.from_numpy(stored)).numpy(), to_float(stored))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_float32_division_gives_every_sample_value_the_float64_quotient(dtype: type) -> None:
    full_scale = np.iinfo(dtype).max
    every_value = np.arange(full_scale + 1, dtype=dtype)
    np.testing.assert_array_equal(to_unit(every_value, full_scale), (every_value / float(full_scale)).astype(np.float32))


def test_preprocess_output_shape_dtype_and_range() -> None:
    image = np.random.default_rng(1).random((300, 200)).astype(np.float32)
    for aspect in ("squash", "pad"):
        stored = preprocess(image, PreprocessConfig(size=64, aspect=aspect))
        assert stored.shape == (64, 64) and stored.dtype == np.uint8
        assert stored.min() == 0 and stored.max() == 255


def test_config_round_trip_and_validation() -> None:
    config = PreprocessConfig(size=96, aspect="pad", dtype="uint16")
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessConfig.from_dict({**config.to_dict(), "gamma": 2})
    with pytest.raises(ValueError, match="aspect"):
        PreprocessConfig(aspect="crop")
    with pytest.raises(ValueError, match="size"):
        PreprocessConfig(size=4)
