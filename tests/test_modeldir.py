"""The model directory contract: round trip, versioning, integrity, and loading without pickle."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from model_factory import TODAYS_DECODE

from lungray.modeldir import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, load_model_dir, read_meta, save_model_dir, tensor_view
from lungray.models import ModelConfig, build_model
from lungray.preprocess import PreprocessConfig

torch.set_num_threads(1)

TINY = {"cnn": ModelConfig("cnn", widths=(4, 8), fc_hidden=8), "cnn_lstm": ModelConfig("cnn_lstm", widths=(4, 8), lstm_hidden=8)}


def make_model_dir(path: Path, arch: str = "cnn", size: int = 32, threshold: float = 0.5, seed: int = 0) -> Path:
    """A model directory holding a freshly initialised tiny model (shared with test_evaluate)."""
    torch.manual_seed(seed)
    model = build_model(TINY[arch])
    meta = {
        "architecture": TINY[arch].to_dict(),
        "preprocess": PreprocessConfig(size=size).to_dict(),
        "threshold": threshold,
        "decode": TODAYS_DECODE,
    }
    return save_model_dir(path, model.state_dict(), meta)


def stored_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


@pytest.mark.parametrize("arch", ["cnn", "cnn_lstm"])
def test_round_trip_keeps_weights_and_predictions(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    original = build_model(TINY[arch]).eval()
    meta = {"architecture": TINY[arch].to_dict(), "preprocess": PreprocessConfig(size=32).to_dict(), "threshold": 0.25, "note": "kept"}
    save_model_dir(tmp_path / "model", original.state_dict(), meta)

    loaded = load_model_dir(tmp_path / "model")

    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.threshold == 0.25
    assert loaded.meta["note"] == "kept"
    assert loaded.meta["classes"] == ["normal", "abnormal"]
    assert loaded.model_id.startswith(f"{arch}-")
    images = stored_images(5)
    with torch.no_grad():
        expected = torch.softmax(original(torch.from_numpy(images).float().div(255).unsqueeze(1)), dim=1)[:, 1]
    probabilities = loaded.predict_proba(images, batch_size=2)
    assert probabilities.shape == (5,)
    np.testing.assert_allclose(probabilities, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_float_input_matches_stored_input(tmp_path: Path) -> None:
    model = load_model_dir(make_model_dir(tmp_path / "model"))
    images = stored_images(4)
    np.testing.assert_allclose(model.predict_proba(images), model.predict_proba(images.astype(np.float32) / 255), rtol=1e-6)


def test_read_only_input_is_scored_in_place_and_left_as_it_was(tmp_path: Path) -> None:
    """Arrays read through Arrow are read-only; scoring shares their memory and never writes it."""
    model = load_model_dir(make_model_dir(tmp_path / "model"))
    images = stored_images(5)
    for original in (images, images.astype(np.float32) / 255):
        frozen = original.copy()
        frozen.flags.writeable = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's "not writable" warning would fail here
            scores = model.predict_proba(frozen, batch_size=2)
            assert tensor_view(frozen).data_ptr() == frozen.ctypes.data  # no copy on the CPU
        np.testing.assert_array_equal(frozen, original)
        np.testing.assert_array_equal(scores, model.predict_proba(original.copy(), batch_size=2))


def test_model_id_names_the_weights(tmp_path: Path) -> None:
    first = read_meta(make_model_dir(tmp_path / "a", seed=0))["model_id"]
    again = read_meta(make_model_dir(tmp_path / "b", seed=0))["model_id"]
    other = read_meta(make_model_dir(tmp_path / "c", seed=1))["model_id"]
    assert first == again
    assert first != other


def test_refuses_unknown_format_version(tmp_path: Path) -> None:
    path = make_model_dir(tmp_path / "model")
    meta = json.loads((path / META_FILE).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        load_model_dir(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"format_version": True}, "format_version True is not supported"),
        ({"temperature": 0}, "temperature must be a positive finite number, got 0"),
        ({"temperature": -1.0}, "temperature must be a positive finite number"),
        ({"threshold": 7}, r"threshold must be a probability in \[0, 1\], got 7"),
        ({"threshold": None}, "threshold must be a probability"),
        ({"threshold": ...}, r"lacks \['threshold'\]"),
        ({"weights_sha256": ...}, r"lacks \['weights_sha256'\]"),
    ],
)
def test_a_hand_edited_model_json_is_refused_saying_why(tmp_path: Path, edit: dict, message: str) -> None:
    """Only the format version and the weights' hash were checked on load: temperature 0 gave NaN
    probabilities, -1 inverted them, threshold 7 called every film normal, a missing key was a KeyError."""
    path = make_model_dir(tmp_path / "model")
    meta = json.loads((path / META_FILE).read_text())
    for key, value in edit.items():
        if value is ...:
            del meta[key]
        else:
            meta[key] = value
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        load_model_dir(path)


def test_loads_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_model_dir(tmp_path / "model")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading a model directory must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_model_dir(path).predict_proba(stored_images(2)).shape == (2,)


def test_refuses_weights_that_do_not_match_the_json(tmp_path: Path) -> None:
    path = make_model_dir(tmp_path / "model", seed=0)
    (path / WEIGHTS_FILE).write_bytes((make_model_dir(tmp_path / "other", seed=1) / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="weights_sha256"):
        load_model_dir(path)


def test_save_refuses_weights_of_another_architecture(tmp_path: Path) -> None:
    meta = {"architecture": TINY["cnn"].to_dict(), "preprocess": PreprocessConfig(size=32).to_dict(), "threshold": 0.5}
    with pytest.raises(RuntimeError, match="state_dict"):
        save_model_dir(tmp_path / "model", build_model(TINY["cnn_lstm"]).state_dict(), meta)
    assert not (tmp_path / "model" / META_FILE).exists()


def test_save_requires_what_readers_need(tmp_path: Path) -> None:
    meta = {"architecture": TINY["cnn"].to_dict(), "preprocess": PreprocessConfig(size=32).to_dict()}
    with pytest.raises(ValueError, match="threshold"):
        save_model_dir(tmp_path / "model", build_model(TINY["cnn"]).state_dict(), meta)


def test_save_keeps_other_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "model"
    (path / "_ray").mkdir(parents=True)
    (path / "_ray" / "run.txt").write_text("checkpoints live here")
    make_model_dir(path, seed=0)
    make_model_dir(path, seed=1)  # overwrite in place
    assert sorted(entry.name for entry in path.iterdir()) == sorted(["_ray", META_FILE, WEIGHTS_FILE])
    assert (path / "_ray" / "run.txt").read_text() == "checkpoints live here"
    assert load_model_dir(path).model_id == read_meta(make_model_dir(tmp_path / "again", seed=1))["model_id"]


def test_predict_proba_refuses_input_the_model_was_not_trained_on(tmp_path: Path) -> None:
    model = load_model_dir(make_model_dir(tmp_path / "model", size=32))
    with pytest.raises(ValueError, match="shape"):
        model.predict_proba(stored_images(2, size=64))
    with pytest.raises(ValueError, match="uint8"):
        model.predict_proba(stored_images(2).astype(np.uint16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.predict_proba(stored_images(2).astype(np.float32))
