"""Ensembles and test-time augmentation: the network, its model directory, and its scorers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from model_factory import TODAYS_DECODE
from ray.data.extensions import ArrowTensorArray
from test_modeldir import TINY
from test_train import read_split, write_ingested

from lungray.cli import add_ensemble_arguments
from lungray.ensemble import build_ensemble_dir
from lungray.evaluate import evaluate
from lungray.metrics import binary_metrics, choose_threshold
from lungray.modeldir import load_model_dir, save_model_dir
from lungray.models import Ensemble, EnsembleConfig, build_from_architecture, build_model
from lungray.models.ensemble import TTA_VIEWS, tta_views
from lungray.preprocess import PreprocessConfig
from lungray.report.gradcam import gradcam
from lungray.screen.predictor import Predictor

torch.set_num_threads(1)

SIZE = 32


def members(seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [build_model(TINY["cnn"]).eval(), build_model(TINY["cnn_lstm"]).eval()]


def test_ensemble_is_the_mean_probability_of_its_members() -> None:
    images = torch.rand(5, 1, SIZE, SIZE)
    cnn, cnn_lstm = members()
    with torch.inference_mode():
        expected = (torch.softmax(cnn(images), 1) + torch.softmax(cnn_lstm(images), 1)) / 2
        probabilities = torch.softmax(Ensemble([cnn, cnn_lstm]).eval()(images), 1)
        alone = torch.softmax(Ensemble([cnn]).eval()(images), 1)
        single = torch.softmax(cnn(images), 1)
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, single, rtol=1e-5, atol=1e-6)


def test_tta_averages_the_views_including_the_original() -> None:
    images = torch.rand(3, 1, SIZE, SIZE)
    cnn, _ = members()
    views = tta_views(images, "zoom-shift")
    assert len(views) == 1 + len(TTA_VIEWS["zoom-shift"])
    assert views[0] is images and all(view.shape == images.shape for view in views)
    with torch.inference_mode():
        expected = torch.stack([torch.softmax(cnn(view), 1) for view in views]).mean(0)
        probabilities = torch.softmax(Ensemble([cnn], tta="zoom-shift").eval()(images), 1)
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)


def test_tta_views_move_the_content_by_the_stated_fraction() -> None:
    image = torch.zeros(1, 1, 100, 100)
    image[0, 0, 50, 50] = 1.0
    for (zoom, shift_x, shift_y), view in zip(TTA_VIEWS["zoom-shift"], tta_views(image, "zoom-shift")[1:]):
        row, col = np.unravel_index(int(view[0, 0].argmax()), (100, 100))
        # The bright pixel sits at the centre (50, 50) when not shifted; zoom keeps the centre.
        assert abs(col - (50 + 100 * shift_x)) <= 1 and abs(row - (50 + 100 * shift_y)) <= 1, (zoom, shift_x, shift_y)


def test_config_refuses_nesting_empty_and_unknown_tta() -> None:
    member = TINY["cnn"].to_dict()
    with pytest.raises(ValueError, match="at least one"):
        EnsembleConfig(members=())
    with pytest.raises(ValueError, match="nest"):
        EnsembleConfig(members=({"arch": "ensemble"},))
    with pytest.raises(ValueError, match="tta"):
        EnsembleConfig(members=(member,), tta="mirror")
    config = EnsembleConfig(members=(member, TINY["cnn_lstm"].to_dict()), tta="zoom-shift")
    assert EnsembleConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert isinstance(build_from_architecture(config.to_dict()), Ensemble)


def test_gradcam_of_an_ensemble_explains_its_first_member() -> None:
    image = torch.rand(1, 1, SIZE, SIZE)
    cnn, cnn_lstm = members()
    np.testing.assert_allclose(gradcam(Ensemble([cnn, cnn_lstm], tta="zoom-shift").eval(), image), gradcam(cnn, image), atol=1e-6)


def member_dirs(root: Path, data: Path) -> list[Path]:
    fingerprint = json.loads((data / "summary.json").read_text())["fingerprint"]
    paths = []
    for network, arch in zip(members(), ("cnn", "cnn_lstm")):
        meta = {
            "architecture": TINY[arch].to_dict(),
            "preprocess": PreprocessConfig(size=SIZE).to_dict(),
            "threshold": 0.5,
            "decode": TODAYS_DECODE,
            "data_fingerprint": fingerprint,
        }
        paths.append(save_model_dir(root / arch, network.state_dict(), meta))
    return paths


@pytest.mark.timeout(180)
def test_ensemble_model_directory_is_thresholded_on_val_and_scored_like_any_model(ray_session: None, tmp_path: Path) -> None:
    data = write_ingested(tmp_path / "data", size=SIZE)
    cnn_dir, lstm_dir = member_dirs(tmp_path / "members", data)
    output = build_ensemble_dir([cnn_dir, lstm_dir], str(data), tmp_path / "ensemble", tta="zoom-shift", min_sensitivity=0.9)

    ensemble = load_model_dir(output)
    assert ensemble.model_id.startswith("ensemble-")
    assert [member["model_id"] for member in ensemble.meta["members"]] == [load_model_dir(cnn_dir).model_id, load_model_dir(lstm_dir).model_id]
    val_images, val_labels = read_split(data, "val")
    cnn, lstm = members()
    with torch.inference_mode():
        inputs = torch.from_numpy(val_images).float().div(255).unsqueeze(1)
        expected = torch.softmax(Ensemble([cnn, lstm], tta="zoom-shift").eval()(inputs), 1)[:, 1].numpy()
    np.testing.assert_allclose(ensemble.predict_proba(val_images), expected, atol=1e-5)
    assert ensemble.threshold == choose_threshold(val_labels, ensemble.predict_proba(val_images), 0.9)
    assert ensemble.meta["val_metrics"]["recall"] >= 0.9

    test_images, test_labels = read_split(data, "test")
    result = evaluate(output, str(data), "test")
    expected_metrics = binary_metrics(test_labels, ensemble.predict_proba(test_images), ensemble.threshold)
    assert result["confusion_matrix"] == expected_metrics["confusion_matrix"]

    # The screening actor takes it as it takes a single model.
    batch = pa.table({"image": ArrowTensorArray.from_numpy(test_images), "status": ["ok"] * len(test_images)})
    scored = Predictor(str(output))(batch)
    np.testing.assert_allclose(scored["prob"].to_numpy(), ensemble.predict_proba(test_images), atol=1e-6)


@pytest.mark.timeout(120)
def test_ensemble_refuses_members_trained_on_other_data(ray_session: None, tmp_path: Path) -> None:
    data = write_ingested(tmp_path / "data", size=SIZE)
    other = write_ingested(tmp_path / "other", split_sizes={"train": 6, "val": 6, "test": 6}, size=SIZE)
    with pytest.raises(ValueError, match="other data"):
        build_ensemble_dir(member_dirs(tmp_path / "members", other), str(data), tmp_path / "ensemble")


def test_ensemble_refuses_a_calibrated_member(tmp_path: Path) -> None:
    """The ensemble averages its members' raw softmax: a member's temperature would be dropped
    without a word (T = 3: 0.472 alone, 0.417 as a one-member ensemble)."""
    data = write_ingested(tmp_path / "data", size=SIZE)
    cnn_dir, lstm_dir = member_dirs(tmp_path / "members", data)
    meta_path = Path(lstm_dir) / "model.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "temperature": 3.0}))
    assert load_model_dir(lstm_dir).meta["temperature"] == 3.0  # a model directory like calibrate writes
    with pytest.raises(ValueError, match="is calibrated .temperature 3.0.*calibrate the ensemble"):
        build_ensemble_dir([cnn_dir, lstm_dir], str(data), tmp_path / "ensemble")
    # AdaBN keeps temperature 1 and the home data's fingerprint: its lineage is what tells it apart.
    meta_path.write_text(json.dumps({**meta, "lineage": [{"step": "adapt-unlabelled", "site": "site-b"}]}))
    with pytest.raises(ValueError, match=r"is derived for a site \(adapt-unlabelled\).*adapt or calibrate the ensemble"):
        build_ensemble_dir([cnn_dir, lstm_dir], str(data), tmp_path / "ensemble")


def test_ensembles_that_score_differently_do_not_share_an_id(tmp_path: Path) -> None:
    """Same members, other TTA or threshold: other scores and calls, so another id (screening
    keyed by model id scored 0 of 8 files with the second ensemble of one pair)."""
    network = Ensemble(members(), tta="none")
    meta = {"preprocess": PreprocessConfig(size=SIZE).to_dict(), "decode": TODAYS_DECODE}

    def ensemble_id(folder: str, tta: str, threshold: float) -> str:
        architecture = EnsembleConfig(members=(TINY["cnn"].to_dict(), TINY["cnn_lstm"].to_dict()), tta=tta).to_dict()
        saved = save_model_dir(tmp_path / folder, network.state_dict(), {**meta, "architecture": architecture, "threshold": threshold})
        return load_model_dir(saved).model_id

    plain = ensemble_id("a", "none", 0.3)
    assert plain == ensemble_id("again", "none", 0.3)
    assert len({plain, ensemble_id("tta", "zoom-shift", 0.3), ensemble_id("threshold", "none", 0.4)}) == 3


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_ensemble_arguments(parser)
    args = parser.parse_args(["a", "b", "--data", "d", "--output", "o", "--tta", "zoom-shift"])
    assert (args.model_dirs, args.data, args.output, args.tta, args.min_sensitivity) == (["a", "b"], "d", "o", "zoom-shift", 0.95)
