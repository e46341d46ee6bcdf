"""Evaluation: a known tiny model scored on a split, checked against lungray.metrics."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from test_modeldir import make_model_dir
from test_train import read_split, write_ingested

from lungray.cli import add_evaluate_arguments
from lungray.evaluate import evaluate
from lungray.metrics import binary_metrics
from lungray.modeldir import load_model_dir

torch.set_num_threads(1)

SIZE = 32


@pytest.mark.timeout(120)
@pytest.mark.parametrize("split", ["val", "test"])
def test_metrics_at_the_stored_threshold(ray_session: None, tmp_path: Path, split: str) -> None:
    data = write_ingested(tmp_path / "data", size=SIZE)
    images, labels = read_split(data, split)
    probabilities = load_model_dir(make_model_dir(tmp_path / "probe", size=SIZE)).predict_proba(images)
    # A threshold at which this untrained model calls some cases each way: its median score.
    threshold = float(sorted(probabilities)[len(probabilities) // 2])
    model = load_model_dir(make_model_dir(tmp_path / "model", size=SIZE, threshold=threshold))

    result = evaluate(model.path, str(data), split)

    expected = binary_metrics(labels, probabilities, threshold)
    assert result["split"] == split
    assert result["model_id"] == model.model_id
    assert result["data_fingerprint"] == json.loads((data / "summary.json").read_text())["fingerprint"]
    assert result["n"] == len(labels)  # the unlabelled image is skipped
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    for name in ("accuracy", "precision", "recall", "specificity", "f1", "auroc", "threshold"):
        assert math.isfinite(result[name])
        assert result[name] == pytest.approx(expected[name], abs=1e-9), name
    assert json.loads(json.dumps(result)) == result
    assert result["not_scored"] == {"unlabelled_in_split": 1, "ingest_errors": 0, "ingest_skipped": 0} and result["in_sample"] == []


def test_evaluate_says_what_it_left_out_and_which_site_step_saw_these_images(ray_session: None, tmp_path: Path) -> None:
    """Two films the ingest could not decode, and a calibrated model scored on the films it was
    calibrated on: evaluate printed recall and specificity over the rest, with no word of either."""
    from test_site_calibrate import write_site_sample

    from lungray.site.calibrate import CalibrateConfig, calibrate

    site = write_site_sample(tmp_path / "site", n_normal=12, n_abnormal=12)
    summary = json.loads((site / "summary.json").read_text())
    (site / "summary.json").write_text(json.dumps({**summary, "by_status": {"ok": 24, "error": 2}}))
    calibrate(CalibrateConfig(model_dir=str(make_model_dir(tmp_path / "parent", size=32)), data=str(site), output=str(tmp_path / "calibrated"), n_boot=20, folds=2))
    result = evaluate(tmp_path / "calibrated", str(site), "test")
    tested = sum(1 for index in range(24) if index % 3 == 0)  # write_site_sample's test split
    assert result["n"] == tested and result["not_scored"] == {"unlabelled_in_split": 0, "ingest_errors": 2, "ingest_skipped": 0}
    assert result["in_sample"] == [{"step": "calibrate", "site": "site", "images_fitted_on": tested}]


@pytest.mark.timeout(120)
def test_refuses_data_preprocessed_otherwise(ray_session: None, tmp_path: Path) -> None:
    data = write_ingested(tmp_path / "data", size=SIZE)
    model_dir = make_model_dir(tmp_path / "model", size=2 * SIZE)
    with pytest.raises(ValueError, match="preprocessed"):
        evaluate(model_dir, str(data), "test")


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(["model", "data", "--split", "val"])
    assert (args.model_dir, args.data, args.split) == ("model", "data", "val")
    assert parser.parse_args(["model", "data"]).split == "test"
    with pytest.raises(SystemExit):
        parser.parse_args(["model", "data", "--split", "everything"])
