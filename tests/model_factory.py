"""Untrained model directories for tests of everything that reads the model directory contract."""

from __future__ import annotations

from pathlib import Path

import torch

from lungray.modeldir import save_model_dir
from lungray.models import default_config, build_model
from lungray.preprocess import PreprocessConfig


def untrained_model_dir(path: Path, arch: str = "cnn", size: int = 64, threshold: float = 0.5, seed: int = 0) -> Path:
    """A loadable model directory with random weights (scores are meaningless but deterministic)."""
    torch.manual_seed(seed)
    config = default_config(arch)
    meta = {"architecture": config.to_dict(), "preprocess": PreprocessConfig(size=size).to_dict(), "threshold": threshold}
    return save_model_dir(path, build_model(config).state_dict(), meta)
