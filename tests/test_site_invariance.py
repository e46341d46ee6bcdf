"""The invariance measure: perturbations of the decoded film, and the movement it reports on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES
from pydicom.pixels import apply_voi_lut
from pydicom.dataset import Dataset
from test_modeldir import make_model_dir
from test_site_calibrate import trained_model_dir, write_site_sample

from lungray.cli import main
from lungray.modeldir import load_model_dir, save_model_dir
from lungray.site.invariance import PERTURBATIONS, black_border, centre_crop, measure_invariance, windowed

torch.set_num_threads(1)

SIZE = 32
FIELDS = {"n", "max_abs_dprob", "median_abs_dprob", "mean_abs_dprob", "calls_flipped"}


def film_folder(root: Path, per_class: int = 3) -> Path:
    """Real Kermany films in NORMAL/ and PNEUMONIA/ folders, and one file that does not decode."""
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for path in sorted((SAMPLES / "kermany-mini" / label).glob("*.jpeg"))[:per_class]:
            shutil.copy(path, root / label / path.name)
    (root / "notes.txt").write_text("not a film\n")
    return root


def constant_model_dir(path: Path, arch: str) -> Path:
    """A model invariant by construction: its last layer ignores the features (zero weights, a bias)."""
    directory = make_model_dir(path / "random", arch=arch, size=SIZE)
    model = load_model_dir(directory)
    state = dict(model.model.state_dict())
    last = "head.4" if arch == "cnn" else "head.1"
    state[f"{last}.weight"] = torch.zeros_like(state[f"{last}.weight"])
    state[f"{last}.bias"] = torch.tensor([0.0, 0.7])
    meta = {key: model.meta[key] for key in ("architecture", "preprocess", "threshold", "decode")}
    return save_model_dir(path / "constant", state, meta)


def test_border_and_crop_change_what_they_say() -> None:
    film = np.random.default_rng(0).random((100, 80)).astype(np.float32)
    framed = black_border(film)
    assert (framed[:5] == 0).all() and (framed[95:] == 0).all() and (framed[:, :4] == 0).all() and (framed[:, 76:] == 0).all()
    np.testing.assert_array_equal(framed[5:95, 4:76], film[5:95, 4:76])
    cropped = centre_crop(np.tile(np.linspace(0, 1, 80, dtype=np.float32), (100, 1)))
    assert cropped.shape == (100, 80) and cropped[:, 0].min() > 0.04 and cropped[:, -1].max() < 0.96


def test_windows_are_pydicoms_voi_on_12_bit_values() -> None:
    film = np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64)
    np.testing.assert_allclose(windowed(film, "LINEAR"), film, atol=1 / 4095)
    # The SIGMOID window, recomputed from PS3.3 C.11.2.1.3.1: y = 4095 / (1 + exp(-4 (x - c) / w)).
    stored = np.rint(film * 4095)
    expected = 1 / (1 + np.exp(-4 * (stored - 2047.5) / 4096))
    np.testing.assert_allclose(windowed(film, "SIGMOID"), expected, atol=1e-5)
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 16, 12, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2047.5, 4096, "SIGMOID"
    np.testing.assert_allclose(windowed(film, "SIGMOID"), apply_voi_lut(stored.astype(np.uint16), ds) / 4095, atol=1e-6)


@pytest.mark.parametrize("arch", ["cnn", "cnn_lstm"])
def test_identity_and_an_invariant_model_move_nothing(tmp_path: Path, arch: str) -> None:
    films = film_folder(tmp_path / "films")
    report = measure_invariance(str(constant_model_dir(tmp_path, arch)), str(films), dataset="kermany")
    assert report["n_films"] == 6 and report["films_by_label"] == {"normal": 3, "abnormal": 3}
    assert report["files_not_decoded"] == 1 and sum(report["not_decoded_by_reason"].values()) == 1
    assert set(report["perturbations"]) == set(PERTURBATIONS)
    for name, entry in report["perturbations"].items():
        assert FIELDS <= set(entry) and set(entry["by_label"]) == {"normal", "abnormal"}
        assert entry["max_abs_dprob"] < 1e-6 and entry["calls_flipped"] == 0, name


def test_a_trained_model_moves_under_a_border_and_never_under_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    films = film_folder(tmp_path / "films")
    model_dir = trained_model_dir(tmp_path / "model", size=SIZE, steps=30)  # an untrained net barely reacts to anything
    output = tmp_path / "reports" / "invariance.json"  # a folder not made yet: made, not the finished report lost
    assert main(["invariance", str(model_dir), "--input", str(films), "--dataset", "kermany", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report == json.loads(capsys.readouterr().out)
    moves = report["perturbations"]
    assert moves["identity"]["max_abs_dprob"] == 0.0
    assert moves["border"]["max_abs_dprob"] > 1e-3 and moves["border"]["median_abs_dprob"] <= moves["border"]["max_abs_dprob"]
    for entry in moves.values():
        assert entry["by_label"]["normal"]["n"] + entry["by_label"]["abnormal"]["n"] == entry["n"] == 6
        assert max(entry["by_label"]["normal"]["max_abs_dprob"], entry["by_label"]["abnormal"]["max_abs_dprob"]) == entry["max_abs_dprob"]
    assert "person" not in output.read_text() and "IM-" not in output.read_text()  # no file names (they carry patient numbers)


def test_an_ingest_is_measured_on_its_stored_images(tmp_path: Path) -> None:
    data = write_site_sample(tmp_path / "site", n_normal=3, n_abnormal=2, labelled=True)
    report = measure_invariance(str(constant_model_dir(tmp_path, "cnn")), str(data))
    assert report["input"].startswith("ingest") and report["n_films"] == 5 and report["films_by_label"] == {"normal": 3, "abnormal": 2}
    assert all(entry["max_abs_dprob"] < 1e-6 for entry in report["perturbations"].values())
    moving = measure_invariance(str(trained_model_dir(tmp_path / "trained", size=SIZE, steps=30)), str(data))
    assert moving["perturbations"]["identity"]["max_abs_dprob"] == 0.0 and moving["perturbations"]["border"]["max_abs_dprob"] > 1e-3
    other = write_site_sample(tmp_path / "site-64", n_normal=3, n_abnormal=2, size=64)  # an ingest the model was not trained at
    with pytest.raises(ValueError, match="preprocessed with"):
        measure_invariance(str(constant_model_dir(tmp_path, "cnn")), str(other))


def test_films_are_decoded_and_preprocessed_as_screening_does(tmp_path: Path) -> None:
    """The invariance baseline is what the model scores in production (`rows.process_file`):
    a padded DICOM's padding kept out of the stretch, a full-size JPEG decoded reduced. It was
    decoded in full without the mask (a mean of 22.9 levels off for the padded film)."""
    from collections import Counter

    from film_factory import dicom_file_bytes, film_dataset, stored_as, synthetic_film

    from lungray.io.decode import DecodeOptions
    from lungray.io.rows import process_file
    from lungray.preprocess import PreprocessConfig, preprocess
    from lungray.site.invariance import folder_films

    padded = synthetic_film(side=1024, bits=12)
    padded[:123], padded[-123:], padded[:, :123], padded[:, -123:] = 0, 0, 0, 0
    dataset = film_dataset(padded)
    dataset.PixelPaddingValue = 0
    (tmp_path / "films").mkdir()
    (tmp_path / "films" / "padded.dcm").write_bytes(dicom_file_bytes(dataset))
    (tmp_path / "films" / "big.jpg").write_bytes(stored_as(synthetic_film(side=2048, bits=12, seed=1), "jpeg_file"))
    config, errors = PreprocessConfig(size=224), Counter()
    films = {}
    for (film, mask, _), name in zip(folder_films(str(tmp_path / "films"), None, None, DecodeOptions(), config.size, errors), ("big.jpg", "padded.dcm")):
        films[name] = preprocess(film, config, mask)
    assert not errors and sorted(films) == ["big.jpg", "padded.dcm"]
    for name, tensor in films.items():
        path = tmp_path / "films" / name
        _, screened = process_file(str(path), name, path.stat().st_size, config, DecodeOptions(), 1 << 30, scope=None, salt=None)
        assert np.array_equal(tensor, screened), name
    crop = PERTURBATIONS["crop"]
    assert crop.mask_change(np.ones((40, 40), bool)).all() and not crop.mask_change(np.zeros((40, 40), bool)).any()
