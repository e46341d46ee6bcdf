"""Decode options in the model directory: recorded, read back, honoured or refused with a reason."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import dicom_bytes, dicom_dataset
from model_factory import untrained_model_dir
from test_train import write_ingested

from lungray.evaluate import evaluate
from lungray.io.base import (
    DECODER_VERSION,
    FIRST_DECODER_VERSION,
    DecodeOptions,
    decode_record,
    normalized_record,
    options_from_record,
)
from lungray.modeldir import META_FILE, load_model_dir
from lungray.report.compare import load_models
from lungray.screen import pipeline
from lungray.screen.pipeline import ScreenConfig, run_screen

NO_VOI_MIDDLE = DecodeOptions(apply_voi=False, frame="middle")


def with_decode(model_dir: Path, record: dict | None) -> Path:
    """Rewrite model.json's `decode` (None: remove it, as in directories from before it was recorded)."""
    meta_path = model_dir / META_FILE
    meta = json.loads(meta_path.read_text())
    meta.pop("decode", None)
    if record is not None:
        meta["decode"] = record
    meta_path.write_text(json.dumps(meta))
    return model_dir


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return untrained_model_dir(tmp_path / "model", size=32)


def test_record_round_trip_through_model_json(model_dir: Path) -> None:
    record = decode_record(NO_VOI_MIDDLE)
    assert record == {"apply_voi": False, "frame": "middle", "decoder_version": DECODER_VERSION}
    assert "max_pixels" not in record  # a safety limit, not pixels
    loaded = load_model_dir(with_decode(model_dir, record))
    assert loaded.decode == NO_VOI_MIDDLE


def test_ingest_summary_record_reads_back() -> None:
    """The ingest writes asdict(options) plus the version; export copies it normalized."""
    summary_record = {**asdict(DecodeOptions(apply_voi=False, max_pixels=5)), **decode_record(DecodeOptions(apply_voi=False))}
    assert options_from_record(summary_record, "ingest") == DecodeOptions(apply_voi=False)
    assert normalized_record(summary_record) == decode_record(DecodeOptions(apply_voi=False))


def test_a_record_without_a_version_is_the_first_decoder_and_refused(model_dir: Path) -> None:
    """Older runs: a model.json without `decode`, an ingest summary with the options only (as the
    first decoder wrote it). They read as decoder version 1, never as today's, and are refused."""
    legacy = {"apply_voi": True, "frame": "first", "decoder_version": FIRST_DECODER_VERSION}
    assert normalized_record(None) == legacy and FIRST_DECODER_VERSION != DECODER_VERSION
    old_summary = {"apply_voi": False, "max_pixels": 100, "frame": "first"}
    assert normalized_record(old_summary) == {**legacy, "apply_voi": False}
    loaded = load_model_dir(with_decode(model_dir, None))
    with pytest.raises(ValueError, match=rf"decoder version 1 \(it records no decoder version.*version {DECODER_VERSION} and cannot reproduce"):
        loaded.decode
    with pytest.raises(ValueError, match="records no decoder version"):
        options_from_record(old_summary, "old ingest")


def test_a_decoder_3_summary_with_its_retired_limit_reads_back() -> None:
    """Decoder 3's ingests wrote `min_side` (a limit, since replaced by `reduced`) into summary.json."""
    summary = {"apply_voi": True, "max_pixels": 5, "frame": "first", "min_side": None, "decoder_version": 3}
    assert normalized_record(summary) == {"apply_voi": True, "frame": "first", "decoder_version": 3}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"apply_voi": True, "frame": "first", "decoder_version": DECODER_VERSION + 1}, "decoder version"),
        ({"apply_voi": True, "frame": "first", "decoder_version": 1}, "cannot reproduce"),
        ({"apply_voi": True, "frame": "first", "reduce": 4, "decoder_version": DECODER_VERSION}, "does not know"),
        ({"apply_voi": True, "frame": "last", "decoder_version": DECODER_VERSION}, "cannot honour"),
    ],
)
def test_a_decode_this_lungray_cannot_honour_is_refused(model_dir: Path, record: dict, message: str) -> None:
    loaded = load_model_dir(with_decode(model_dir, record))
    with pytest.raises(ValueError, match=message):
        loaded.decode


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"apply_voi": True, "frame": "first", "decoder_version": DECODER_VERSION + 1}, f"decoder version {DECODER_VERSION + 1}"),
        (None, "decoder version 1 \\(it records no decoder version"),  # an old model directory
    ],
)
def test_screen_refuses_before_reading_anything(model_dir: Path, tmp_path: Path, record: dict | None, message: str) -> None:
    with_decode(model_dir, record)
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.dcm").write_bytes(dicom_bytes(dicom_dataset(np.zeros((8, 8), np.uint8))))
    with pytest.raises(ValueError, match=message):
        run_screen(ScreenConfig(model=str(model_dir), input=str(archive), output=str(tmp_path / "out"), date="2026-12-01"))
    assert not (tmp_path / "out" / "images").exists()


def test_screen_decodes_with_the_model_options(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the defaults, the decode tasks get the model's options (and the CLI's bomb limit)."""
    with_decode(model_dir, decode_record(NO_VOI_MIDDLE))
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.dcm").write_bytes(dicom_bytes(dicom_dataset(np.zeros((8, 8), np.uint8))))
    seen = {}

    class Stop(Exception):
        pass

    def fake_score_window(run, window):  # noqa: ANN001, ANN202 - stands in for Ray
        seen["decode"] = run.decode
        raise Stop

    monkeypatch.setattr(pipeline, "score_window", fake_score_window)
    with pytest.raises(Stop):
        run_screen(ScreenConfig(model=str(model_dir), input=str(archive), output=str(tmp_path / "out"), date="2026-12-01", max_pixels=1234))
    assert seen["decode"] == DecodeOptions(apply_voi=False, frame="middle", max_pixels=1234)


def ingest_with_decode(root: Path, record: dict | None) -> Path:
    data = write_ingested(root, size=32)
    summary = json.loads((data / "summary.json").read_text())
    summary.pop("decode", None)
    if record is not None:
        summary["decode"] = record
    (data / "summary.json").write_text(json.dumps(summary))
    return data


def test_evaluate_and_compare_refuse_data_decoded_otherwise(model_dir: Path, tmp_path: Path) -> None:
    with_decode(model_dir, decode_record(NO_VOI_MIDDLE))
    data = ingest_with_decode(tmp_path / "data", {**asdict(DecodeOptions()), **decode_record(DecodeOptions())})
    with pytest.raises(ValueError, match="decoded with"):
        evaluate(model_dir, str(data))
    summary = json.loads((data / "summary.json").read_text())
    with pytest.raises(ValueError, match="decoded with"):
        load_models([str(model_dir)], str(data), summary, "cpu")


def test_compare_accepts_matching_and_old_records(model_dir: Path, tmp_path: Path) -> None:
    with_decode(model_dir, decode_record(NO_VOI_MIDDLE))
    data = ingest_with_decode(tmp_path / "data", {**asdict(NO_VOI_MIDDLE), **decode_record(NO_VOI_MIDDLE)})
    summary = json.loads((data / "summary.json").read_text())
    assert load_models([str(model_dir)], str(data), summary, "cpu")[0].decode == NO_VOI_MIDDLE
    # neither side recorded (both from before the field): both decoder 1, accepted (no decode happens)
    old_model = with_decode(untrained_model_dir(tmp_path / "old", size=32), None)
    old_data = ingest_with_decode(tmp_path / "old-data", None)
    load_models([str(old_model)], str(old_data), json.loads((old_data / "summary.json").read_text()), "cpu")
    # an old model on today's data, or today's model on old data: decoded by different decoders
    with pytest.raises(ValueError, match="'decoder_version': 1"):
        evaluate(old_model, str(data))
    with pytest.raises(ValueError, match="'decoder_version': 1"):
        evaluate(model_dir, str(ingest_with_decode(tmp_path / "old-data-2", {"apply_voi": False, "frame": "middle"})))
