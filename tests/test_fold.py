"""Folding BatchNorm into the convolutions: the same scores, no BatchNorm left, the original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lungray.models import Ensemble, ModelConfig, build_model
from lungray.models.fold import fold_batchnorm

torch.set_num_threads(1)


def trained_looking(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine terms, as training leaves them (fresh ones fold to an identity)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator))
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(channels, generator=generator))
            module.bias.data.copy_(torch.randn(channels, generator=generator))
    return model.eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_model(ModelConfig(arch="cnn")),
        lambda: build_model(ModelConfig(arch="cnn_lstm", sequence="both")),
        lambda: Ensemble([build_model(ModelConfig(arch="cnn")), build_model(ModelConfig(arch="cnn_lstm"))], tta="zoom-shift"),
    ],
    ids=["cnn", "cnn_lstm", "ensemble"],
)
def test_folded_model_scores_the_same_without_batchnorm(build) -> None:
    torch.manual_seed(0)
    model = trained_looking(build())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    folded = fold_batchnorm(model)
    images = torch.rand(4, 1, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(folded(images), model(images), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_folding_leaves_a_model_without_conv_batchnorm_pairs_alone() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2)).eval()
    folded = fold_batchnorm(model)
    assert [type(module) for module in folded] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]
