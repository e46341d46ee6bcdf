"""Screening, evaluation and comparison accept calibrated and adapted model directories as they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLES
from test_site_calibrate import centred_model_dir, site_arrays, trained_model_dir, write_site_sample

from lungray.evaluate import evaluate
from lungray.io.rows import process_file
from lungray.modeldir import load_model_dir
from lungray.cli import main
from lungray.screen.pipeline import ScreenConfig, run_screen
from lungray.site.adapt import AdaptConfig, adapt
from lungray.site.calibrate import CalibrateConfig, calibrate
from lungray.screen.tables import read_table

torch.set_num_threads(1)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(900)]


def test_screen_evaluate_and_compare_use_the_derived_temperature_threshold_and_statistics(tmp_path: Path) -> None:
    site = write_site_sample(tmp_path / "site-b", n_normal=24, n_abnormal=24)
    images, labels, _ = site_arrays(site)
    parent_dir = centred_model_dir(tmp_path / "parent", trained_model_dir(tmp_path / "trained"), images, scale=4.0)
    calibrate(CalibrateConfig(model_dir=str(parent_dir), data=str(site), output=str(tmp_path / "calibrated"), min_sensitivity=0.9, n_boot=20, folds=3))
    adapt(AdaptConfig(model_dir=str(parent_dir), data=str(site), output=str(tmp_path / "adapted"), labelled=False))
    parent, calibrated, adapted = (load_model_dir(tmp_path / name) for name in ("parent", "calibrated", "adapted"))
    assert calibrated.temperature != pytest.approx(1.0, abs=0.05)

    archive = tmp_path / "archive"
    for label in ("NORMAL", "PNEUMONIA"):
        (archive / label).mkdir(parents=True)
        for path in sorted((SAMPLES / "kermany-mini" / label).glob("*.jpeg"))[:4]:
            shutil.copy(path, archive / label / path.name)
    films = sorted(str(path) for path in archive.rglob("*.jpeg"))
    # Decoded as the screen's rows decode (reduced-resolution decoding included).
    stored = np.stack([
        process_file(path, path, Path(path).stat().st_size, parent.preprocess, parent.decode, 1 << 30, scope=None, salt=None)[1]
        for path in films
    ])
    for derived, name in ((calibrated, "calibrated"), (adapted, "adapted")):
        output = tmp_path / f"screen-{name}"
        run_screen(ScreenConfig(model=str(derived.path), input=str(archive), output=str(output), date="2026-12-01"))
        rows = sorted(read_table(str(output), "images").to_pylist(), key=lambda row: row["path"])
        assert [row["path"] for row in rows] == films and {row["model_id"] for row in rows} == {derived.model_id}
        screened = np.array([row["prob"] for row in rows])
        np.testing.assert_allclose(screened, derived.predict_proba(stored), rtol=1e-4, atol=1e-5)
        assert np.abs(screened - parent.predict_proba(stored)).max() > 1e-3  # the derivation changed the scores
        studies = read_table(str(output), "studies").to_pylist()
        assert {row["threshold"] for row in studies} == {derived.threshold}

    # evaluate and compare score the site's images through the same temperature (its test split here).
    test_rows = np.array([index % 3 == 0 for index in range(len(labels))])
    assert evaluate(str(calibrated.path), str(site), "test")["n"] == int(test_rows.sum())
    home = write_site_sample(tmp_path / "home", n_normal=12, n_abnormal=12, seed=5)
    models = [str(parent.path), str(calibrated.path), str(adapted.path)]
    assert main(["compare", *models, "--data", str(site), "--data", str(home), "--output", str(tmp_path / "report"), "--n-boot", "20", "--gradcam-examples", "0"]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [(row["data_set"], row["model_id"]) for row in summary["rows"]] == [(name, m) for name in ("site-b", "home") for m in (parent.model_id, calibrated.model_id, adapted.model_id)]
    assert [row["fitted_on_this_data"] for row in summary["rows"]] == [False, True, True, False, False, False]
    # Another ingest of the same films (other paths and splits, so another fingerprint): the
    # calibration's films are found by content, not missed for the fingerprint.
    again = tmp_path / "site-b-again"
    shutil.copytree(site, again)
    tested = 0
    for part in (again / "data").glob("*.parquet"):
        table = pq.read_table(part)
        flipped = ["test" if split == "train" else "train" for split in table["split"].to_pylist()]
        tested += flipped.count("test")
        table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(flipped))
        pq.write_table(table.set_column(table.schema.get_field_index("path"), "path", pa.array([f"mount2/{path}" for path in table["path"].to_pylist()])), part)
    summary_json = json.loads((again / "summary.json").read_text())
    (again / "summary.json").write_text(json.dumps({**summary_json, "fingerprint": "0" * 64}))
    assert main(["compare", str(calibrated.path), "--data", str(again), "--output", str(tmp_path / "report-again"), "--n-boot", "20", "--gradcam-examples", "0"]) == 0
    (step,) = json.loads((tmp_path / "report-again" / "metrics.json").read_text())["models"][0]["lineage"]
    assert step["fitted_on_this_data"] and step["images_fitted_on"] == tested > 0
    assert "| CNN + calibrate site-b | site-b |" in (tmp_path / "report" / "summary.md").read_text()
    metrics = json.loads((tmp_path / "report" / "site-b" / "metrics.json").read_text())
    assert (tmp_path / "report" / "home" / "report.md").exists()
    by_id = {entry["model_id"]: entry for entry in metrics["models"]}
    assert set(by_id) == {parent.model_id, calibrated.model_id, adapted.model_id}
    assert by_id[parent.model_id]["lineage"] == [] and by_id[parent.model_id]["name"] == "CNN"
    assert by_id[calibrated.model_id]["name"] == "CNN + calibrate site-b" and by_id[adapted.model_id]["name"] == "CNN + adapt-unlabelled site-b"
    (step,) = by_id[calibrated.model_id]["lineage"]
    assert step["step"] == "calibrate" and step["parent_model_id"] == parent.model_id and step["fitted_on_this_data"]
    assert step["cross_validation"]["folds"] == 3 and by_id[adapted.model_id]["lineage"][0]["labels_used"] is False
    report = (tmp_path / "report" / "site-b" / "report.md").read_text()
    assert "## Site adaptation" in report and "in-sample for this step" in report and "Cross-validated over the site's patients" in report
    # What the step warned of when it was fitted (here a sample too small for its promise) stays with its figures.
    assert step["warnings"] == calibrated.meta["lineage"][-1]["warnings"] != []
    assert all(f"Warning when fitted: {warning}" in report for warning in step["warnings"])
