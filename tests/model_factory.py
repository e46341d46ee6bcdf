"""Untrained model directories for tests of everything that reads the model directory contract."""

from __future__ import annotations

from pathlib import Path

import torch

from lungray.io.base import DecodeOptions, decode_record
from lungray.modeldir import save_model_dir
from lungray.models import default_config, build_model
from lungray.preprocess import PreprocessConfig

# The decode record of today's lungray: the tests' model directories and ingests stand for ones
# it made (a directory or ingest without a record is decoder version 1's, which screen refuses).
TODAYS_DECODE = decode_record(DecodeOptions())


def untrained_model_dir(path: Path, arch: str = "cnn", size: int = 64, threshold: float = 0.5, seed: int = 0) -> Path:
    """A loadable model directory with random weights (scores are meaningless but deterministic)."""
    torch.manual_seed(seed)
    config = default_config(arch)
    meta = {"architecture": config.to_dict(), "preprocess": PreprocessConfig(size=size).to_dict(), "threshold": threshold, "decode": TODAYS_DECODE}
    return save_model_dir(path, build_model(config).state_dict(), meta)
