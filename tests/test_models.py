"""Shapes, config, DDP-safety and trainability of the two models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lungray.models import (
    ARCHITECTURES,
    ConvTrunk,
    ModelConfig,
    build_model,
    count_parameters,
    default_config,
)
from lungray.models.cnn_lstm import feature_sequence

torch.set_num_threads(1)

VARIANTS = [
    ModelConfig(arch="cnn"),
    ModelConfig(arch="cnn_lstm", sequence="rows"),
    ModelConfig(arch="cnn_lstm", sequence="columns"),
    ModelConfig(arch="cnn_lstm", sequence="both"),
    ModelConfig(arch="cnn_lstm", lstm_layers=2, lstm_dropout=0.2, bidirectional=False),
    ModelConfig(arch="cnn", widths=(8, 16), convs_per_block=1, stem_stride=1),
]


def _ids(config: ModelConfig) -> str:
    head = f"{config.sequence}-{config.lstm_layers}layers" if config.arch == "cnn_lstm" else "fc"
    return f"{config.arch}-{len(config.widths)}blocks-{head}"


@pytest.mark.parametrize("config", VARIANTS, ids=_ids)
def test_one_model_maps_any_size_to_two_logits(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(config).eval()
    for size in (64, 96, 224):
        logits = model(torch.rand(3, 1, size, size))
        assert logits.shape == (3, 2)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("config", VARIANTS, ids=_ids)
def test_every_parameter_gets_a_gradient(config: ModelConfig) -> None:
    """DDP (find_unused_parameters=False) fails on a parameter that gets no gradient."""
    torch.manual_seed(0)
    model = build_model(config)
    F.cross_entropy(model(torch.rand(4, 1, 64, 64)), torch.tensor([0, 1, 0, 1])).backward()
    starved = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert starved == []


def test_both_architectures_share_the_same_trunk() -> None:
    cnn, cnn_lstm = (build_model(default_config(arch)) for arch in ARCHITECTURES)
    assert isinstance(cnn.trunk, ConvTrunk) and isinstance(cnn_lstm.trunk, ConvTrunk)
    cnn_shapes = {name: tensor.shape for name, tensor in cnn.trunk.state_dict().items()}
    assert cnn_shapes == {name: tensor.shape for name, tensor in cnn_lstm.trunk.state_dict().items()}


def test_feature_map_is_read_rows_top_down_and_columns_left_right() -> None:
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    features = torch.stack([rows, 10 * cols]).expand(2, 2, 4, 5)  # channel 0: row index, 1: 10x column
    assert torch.equal(feature_sequence(features, "rows")[0, :, 0], torch.arange(4.0))
    assert torch.equal(feature_sequence(features, "columns")[0, :, 1], 10 * torch.arange(5.0))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_channels_last_and_bf16_autocast(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(default_config(arch)).to(memory_format=torch.channels_last)
    images = torch.rand(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    F.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
    assert logits.shape == (2, 2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_lstm_runs_in_float32_under_autocast() -> None:
    model = build_model(ModelConfig(arch="cnn_lstm", sequence="both"))
    lstm_dtypes = []
    for lstm in model.readers.values():
        lstm.register_forward_hook(lambda module, inputs, output: lstm_dtypes.append(output[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 1, 64, 64))
    assert lstm_dtypes == [torch.float32, torch.float32]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_overfits_a_tiny_batch(arch: str) -> None:
    """16 noise images with random labels can only be fitted by memorising them.

    The loss is measured in eval mode, with BatchNorm's running statistics, so that
    batch statistics cannot fit the batch on their own.
    """
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, dropout=0.0))
    images, labels = torch.rand(16, 1, 64, 64), torch.randperm(16) % 2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(1, 151):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                eval_loss = F.cross_entropy(model(images), labels).item()
            if eval_loss < 0.05:
                break
    assert eval_loss < 0.05


def test_config_round_trips_through_json() -> None:
    config = ModelConfig(arch="cnn_lstm", widths=(8, 16, 32), sequence="both", lstm_layers=2, lstm_dropout=0.1)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="hidden_size.*kernel"):
        ModelConfig.from_dict({"arch": "cnn", "kernel": 5, "hidden_size": 3})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"arch": "resnet"}, "unknown arch 'resnet'"),
        ({"sequence": "diagonal"}, "sequence must be one of"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"widths": ()}, "at least one conv block"),
        ({"widths": (16, 0)}, "positive integers"),
        ({"stem_stride": 4}, "stem_stride"),
        ({"lstm_dropout": 0.2}, "lstm_layers >= 2"),
        ({"lstm_hidden": 0}, "lstm_hidden must be at least 1"),
    ],
)
def test_invalid_config_is_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"arch": "cnn_lstm", **overrides})


def test_default_config_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        default_config("vit")


def test_count_parameters_skips_frozen_ones() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 2 + 1
