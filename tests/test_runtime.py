"""CPU scoring through ONNX Runtime: the probabilities torch gives, or torch itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from model_factory import untrained_model_dir
from ray.data.extensions import ArrowTensorArray
from torch import nn

from lungray.modeldir import load_model_dir
from lungray.screen import runtime
from lungray.screen.predictor import Predictor
from lungray.screen.runtime import onnx_scorer

SIZE = 64


def stored_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE), dtype=np.uint8)


@pytest.mark.parametrize("arch", ["cnn", "cnn_lstm"])
@pytest.mark.parametrize("threads", [1, 2])
def test_onnx_runtime_gives_torchs_probabilities(tmp_path: Path, arch: str, threads: int) -> None:
    model = load_model_dir(untrained_model_dir(tmp_path / arch, arch, size=SIZE))
    images = stored_images(37)  # a batch size the export's example (2) did not have
    scorer = onnx_scorer(model, threads)
    assert scorer is not None
    np.testing.assert_allclose(scorer(images), model.predict_proba(images), atol=1e-6)


def test_the_directorys_temperature_applies(tmp_path: Path) -> None:
    loaded = load_model_dir(untrained_model_dir(tmp_path / "cnn", size=SIZE))
    calibrated = dataclasses.replace(loaded, meta={**loaded.meta, "temperature": 3.5})
    images = stored_images(16)
    scorer = onnx_scorer(calibrated, 1)
    assert scorer is not None
    np.testing.assert_allclose(scorer(images), calibrated.predict_proba(images), atol=1e-6)
    assert np.abs(scorer(images) - loaded.predict_proba(images)).max() > 1e-4  # the temperature changed them


def test_input_the_model_was_not_trained_on_is_refused(tmp_path: Path) -> None:
    scorer = onnx_scorer(load_model_dir(untrained_model_dir(tmp_path / "cnn", size=SIZE)), 1)
    assert scorer is not None
    with pytest.raises(ValueError, match="uint8"):
        scorer(stored_images(4).astype(np.uint16))
    with pytest.raises(ValueError, match="shape"):
        scorer(np.zeros((4, SIZE, SIZE + 1), np.uint8))


def test_the_actor_scores_through_onnx_runtime_on_cpu(tmp_path: Path) -> None:
    model_dir = untrained_model_dir(tmp_path / "cnn", size=SIZE)
    images = stored_images(9)
    status = ["ok", "error", *["ok"] * 7]
    predictor = Predictor(str(model_dir))
    assert predictor.runtime is not None
    scored = predictor(pa.table({"image": ArrowTensorArray.from_numpy(images), "status": status}))
    prob = scored["prob"].to_numpy(zero_copy_only=False)
    assert np.isnan(prob[1])
    ok = np.array(status) == "ok"
    np.testing.assert_allclose(prob[ok], load_model_dir(model_dir).predict_proba(images[ok]), atol=1e-6)


def test_a_network_onnx_cannot_take_is_scored_by_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_model: object) -> bytes:
        raise RuntimeError("no ONNX form for this operator")

    monkeypatch.setattr(runtime, "export_onnx", refuse)
    model_dir = untrained_model_dir(tmp_path / "cnn", size=SIZE)
    assert onnx_scorer(load_model_dir(model_dir), 1) is None
    predictor = Predictor(str(model_dir))
    assert predictor.runtime is None
    images = stored_images(5)
    scored = predictor(pa.table({"image": ArrowTensorArray.from_numpy(images), "status": ["ok"] * 5}))
    np.testing.assert_allclose(scored["prob"].to_numpy(), load_model_dir(model_dir).predict_proba(images), atol=1e-6)


class BatchFrozenByTrace(nn.Module):
    """Reads the batch size as a Python int, which a trace turns into the example's constant."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :2] * self.scale + torch.zeros(len(images), 2)


def test_an_export_that_differs_from_torch_is_not_used(tmp_path: Path) -> None:
    loaded = load_model_dir(untrained_model_dir(tmp_path / "cnn", size=SIZE))
    assert onnx_scorer(dataclasses.replace(loaded, model=BatchFrozenByTrace()), 1) is None
