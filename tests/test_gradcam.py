"""Grad-CAM: it points at the evidence for "abnormal", for both architectures, and nowhere else."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lungray.models import ModelConfig, build_model
from lungray.report.gradcam import gradcam, overlay_png, target_layer

SIZE = 32
BLOB = 6


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def noise_image(rng: np.random.Generator) -> np.ndarray:
    """A "normal" image: grey noise, no finding."""
    return np.clip(rng.normal(0.3, 0.05, size=(SIZE, SIZE)), 0.0, 1.0).astype(np.float32)


def image_with_blob(top: int, left: int, rng: np.random.Generator) -> np.ndarray:
    """An "abnormal" image: grey noise with a bright BLOB x BLOB square at (top, left)."""
    image = noise_image(rng)
    image[top : top + BLOB, left : left + BLOB] = 0.9
    return image


def as_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image)[None, None]


def brightness_cnn(evidence_for: int) -> nn.Module:
    """A hand-set CNN whose only feature is brightness, counted as evidence for one class.

    Identity convolutions and batch norm pass the image through the trunk unchanged, so
    every channel of the explained map is the image itself; the head adds the pooled
    brightness to class `evidence_for`'s logit only.
    """
    config = ModelConfig(arch="cnn", widths=(2,), convs_per_block=1, stem_stride=1, fc_hidden=2, dropout=0.0)
    model = build_model(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                for channel in range(module.out_channels):
                    module.weight[channel, channel % module.in_channels, 1, 1] = 1.0
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # running mean 0, variance 1, scale 1, shift 0
        hidden, output = (module for module in model.head if isinstance(module, nn.Linear))
        hidden.weight.copy_(torch.eye(2))
        hidden.bias.zero_()
        output.weight.zero_()
        output.weight[evidence_for] = 1.0
        output.bias.zero_()
    return model


def test_heat_peaks_on_the_evidence_for_abnormal() -> None:
    rng = np.random.default_rng(0)
    model = brightness_cnn(evidence_for=1)
    image = image_with_blob(top=4, left=6, rng=rng)
    heat = gradcam(model, as_input(image))

    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    peak_row, peak_col = np.unravel_index(np.argmax(heat), heat.shape)
    assert 4 <= peak_row < 4 + BLOB and 6 <= peak_col < 6 + BLOB
    blob = np.zeros_like(heat, dtype=bool)
    blob[4 : 4 + BLOB, 6 : 6 + BLOB] = True
    assert heat[blob].mean() > 2 * heat[~blob].mean()
    # the explained map is the image itself here, so the heat is the image scaled to its peak
    np.testing.assert_allclose(heat, image / image.max(), atol=1e-5)


def test_evidence_for_normal_does_not_light_up() -> None:
    model = brightness_cnn(evidence_for=0)
    heat = gradcam(model, as_input(image_with_blob(top=20, left=20, rng=np.random.default_rng(1))))
    assert heat.shape == (SIZE, SIZE) and not heat.any()


def train_blob_detector(arch: str) -> nn.Module:
    """A tiny model trained to call an image abnormal when it holds a bright square anywhere."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = ModelConfig(
        arch=arch, widths=(8, 16), convs_per_block=1, stem_stride=1, fc_hidden=16, lstm_hidden=16, dropout=0.0
    )
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        labels = rng.integers(0, 2, size=32)
        images = [
            image_with_blob(*rng.integers(0, SIZE - BLOB + 1, size=2), rng=rng) if label else noise_image(rng)
            for label in labels
        ]
        batch = torch.from_numpy(np.stack(images))[:, None]
        loss = nn.functional.cross_entropy(model(batch), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("arch", ["cnn", "cnn_lstm"])
def test_trained_model_heat_finds_the_finding(arch: str) -> None:
    model = train_blob_detector(arch)
    rng = np.random.default_rng(123)
    corners = [(2, 2), (2, 24), (24, 2), (24, 24), (13, 13), (4, 16)]
    for top, left in corners:
        image = image_with_blob(top, left, rng)
        with torch.no_grad():
            assert torch.softmax(model(as_input(image)), dim=1)[0, 1] > 0.9, "the detector did not learn the blob"
        heat = gradcam(model, as_input(image))
        peak_row, peak_col = np.unravel_index(np.argmax(heat), heat.shape)
        # within the square, give or take one cell of the 16x16 explained map
        assert top - 2 <= peak_row < top + BLOB + 2 and left - 2 <= peak_col < left + BLOB + 2, (top, left, peak_row, peak_col)


def test_gradcam_leaves_the_model_alone_and_works_in_inference_mode() -> None:
    model = build_model(ModelConfig(arch="cnn_lstm", widths=(4, 8), convs_per_block=1)).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    image = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        heat = gradcam(model, image)
    assert heat.shape == (64, 64) and 0.0 <= heat.min() and heat.max() <= 1.0
    assert all(parameter.grad is None for parameter in model.parameters())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not image.requires_grad


def test_gradcam_refuses_what_it_cannot_explain() -> None:
    model = build_model(ModelConfig(arch="cnn", widths=(4,), convs_per_block=1))
    with pytest.raises(ValueError, match="eval"):
        gradcam(model.train(), torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="one image"):
        gradcam(model.eval(), torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match="trunk"):
        target_layer(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()))


def test_overlay_keeps_the_radiograph_where_there_is_no_heat() -> None:
    image = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[:16, :16] = 1.0
    decoded = np.asarray(Image.open(io.BytesIO(overlay_png(image, heat))))

    assert decoded.shape == (64, 64, 3) and decoded.dtype == np.uint8
    cold = heat == 0
    np.testing.assert_array_equal(decoded[cold], np.repeat(image[cold][:, None], 3, axis=1))
    hot = decoded[:16, :16].astype(int)
    assert np.abs(hot - image[:16, :16, None]).max() > 50  # coloured where the heat is
    with pytest.raises(ValueError, match="shape"):
        overlay_png(image, heat[:32])
    with pytest.raises(ValueError, match="uint8"):
        overlay_png(image.astype(np.float32), heat)
