"""The model directory: the one contract between training and everything that scores images.

Layout:
- `model.safetensors`: the weights. safetensors holds raw tensors only, so opening a model
  directory from anywhere never runs code (a pickled state_dict could).
- `model.json`: everything needed to rebuild and use the weights: `architecture`
  (a ModelConfig, or an EnsembleConfig of several), `preprocess` (PreprocessConfig, so scoring reproduces the training input
  exactly), `decode` (the decode options that change pixels and the decoder version, from
  the ingest: `lungray.io.base.decode_record`; a model.json without it, written before it was
  recorded, is read as decoder version 1's defaults, which a later decoder refuses to
  reproduce), `classes`, `threshold`, plus
  the training record that export adds (metrics,
  history, data fingerprint, versions). `format_version` guards readers against layouts
  they do not know; `weights_sha256` ties the JSON to its weights.
  A directory derived for a site (`lungray calibrate` / `lungray adapt`, lungray.site) adds
  `temperature` (the logits are divided by it before the softmax: every scorer goes through
  `predict_proba`, so screen, evaluate and compare all see it) and `lineage`, one record per
  derivation step (parent model id, site, data, image count, whether labels were used).

Both files are written through a temporary folder and renamed into place, weights first and
`model.json` last: a reader never sees a half-written file, and a crash between the two
renames leaves weights whose hash no longer matches the JSON, which `load_model_dir` refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from lungray.configs import is_number
from lungray.io.base import DecodeOptions, options_from_record
from lungray.models import build_from_architecture
from lungray.models.fold import fold_batchnorm
from lungray.preprocess import DTYPES, PreprocessConfig, to_float

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
CLASSES = ("normal", "abnormal")
# What a reader needs to score images; the rest of model.json is the training record.
REQUIRED_KEYS = ("architecture", "preprocess", "threshold")
# Keys that the format itself owns and sets.
FORMAT_KEYS = ("format_version", "model_id", "weights_sha256", "classes")


@dataclass(frozen=True)
class ModelDir:
    """A loaded model directory: the model in eval mode and its model.json."""

    path: Path
    model: nn.Module
    meta: dict[str, Any]

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def temperature(self) -> float:
        """The site calibration's temperature; 1 (the logits as trained) when none was fitted."""
        return float(self.meta.get("temperature", 1.0))

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta["preprocess"])

    @property
    def decode(self) -> DecodeOptions:
        """The decode options its training images were made with; ValueError if this lungray cannot honour them."""
        return options_from_record(self.meta.get("decode"), f"model {self.path}")

    def with_folded_batchnorm(self) -> ModelDir:
        """The same model directory scoring through `fold_batchnorm`: faster, for scoring only."""
        return replace(self, model=fold_batchnorm(self.model))

    def predict_proba(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probability of "abnormal" for each image of (N, size, size), as float64 of shape (N,).

        `images` are stored tensors, of the integer dtype the model's preprocessing wrote
        (scaled to [0,1] with `lungray.preprocess.to_float`, as in training), or floats
        already in [0,1]. The model runs in float32 on the device it was loaded to; the
        logits are divided by the directory's `temperature` before the softmax.
        """
        return proba_from_logits(self.predict_logits(images, batch_size), self.temperature)

    @torch.inference_mode()
    def predict_logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The network's logits (N, classes) as float32, before any temperature (what calibration fits)."""
        self._check_input(images)
        device = next(self.model.parameters()).device
        logits = []
        for start in range(0, len(images), batch_size):
            output = self.model(model_input(images[start : start + batch_size], device))
            logits.append(output.float().cpu().numpy())
        if not logits:
            return np.zeros((0, len(CLASSES)), dtype=np.float32)
        return np.concatenate(logits)

    def _check_input(self, images: np.ndarray) -> None:
        """Refuse input the model was not trained on, rather than score it silently."""
        preprocess = self.preprocess
        expected_shape = (preprocess.size, preprocess.size)
        if images.ndim != 3 or images.shape[1:] != expected_shape:
            raise ValueError(f"expected images of shape (N, {preprocess.size}, {preprocess.size}), got {images.shape}")
        if np.issubdtype(images.dtype, np.floating):
            if images.size and (images.min() < 0.0 or images.max() > 1.0):
                raise ValueError("float images must lie in [0, 1]")
        elif images.dtype != DTYPES[preprocess.dtype]:
            raise ValueError(f"this model was trained on {preprocess.dtype} tensors, got {images.dtype}")


def model_input(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """Stored images (N, size, size), integer or float in [0,1] -> the (N, 1, size, size) float32 batch a model takes."""
    batch = tensor_view(images).to(device)
    inputs = to_float(batch) if not batch.is_floating_point() else batch.float()
    return inputs.unsqueeze(1).contiguous(memory_format=torch.channels_last)


def proba_from_logits(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probability of "abnormal" from (N, classes) logits at `temperature`, as `predict_proba` computes it.

    Site calibration chooses its threshold on these exact values (float32 softmax), so
    the directory it writes makes the calls the calibration measured.
    """
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float32)) / temperature
    return torch.softmax(scaled, dim=1)[:, 1].numpy().astype(np.float64)


def save_model_dir(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write weights and model.json to `path` (created if needed; other files there are kept).

    `meta` must hold `REQUIRED_KEYS`; the format adds `FORMAT_KEYS`. The weights are loaded
    into the architecture first, so a directory that cannot be loaded is never written.
    """
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(f"model meta lacks {missing}")
    reserved = [key for key in FORMAT_KEYS if key in meta]
    if reserved:
        raise ValueError(f"model meta must not set {reserved}: the model directory format sets them")
    PreprocessConfig.from_dict(meta["preprocess"])
    check_scoring(meta, "model meta")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    build_from_architecture(meta["architecture"]).load_state_dict(tensors, strict=True)

    weights = save_safetensors(tensors)
    digest = hashlib.sha256(weights).hexdigest()
    full_meta = {
        "format_version": FORMAT_VERSION,
        "model_id": f"{meta['architecture']['arch']}-{model_digest(digest, meta)[:12]}",
        "weights_sha256": digest,
        "classes": list(CLASSES),
        **meta,
    }
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".writing-") as staging:
        (Path(staging) / WEIGHTS_FILE).write_bytes(weights)
        (Path(staging) / META_FILE).write_text(json.dumps(full_meta, indent=2) + "\n")
        os.replace(Path(staging) / WEIGHTS_FILE, target / WEIGHTS_FILE)
        os.replace(Path(staging) / META_FILE, target / META_FILE)
    return target


def model_digest(weights_digest: str, meta: Mapping[str, Any]) -> str:
    """What the model id names: the weights, and where the weights alone do not fix the scores,
    also what does.

    `lungray calibrate` keeps its parent's weights but changes the probabilities
    (temperature) and the calls (threshold); two ensembles of the same members differ only in
    their test-time augmentation and threshold. Neither may share an id with its twin, since
    compare refuses one id twice and screening keys its history by model id: a site-derived
    directory also hashes its lineage, temperature and threshold, an ensemble its architecture
    (members, TTA) and threshold. Trained directories keep the id they always had.
    """
    scoring: dict[str, Any] = {}
    if "lineage" in meta:
        scoring |= {"lineage": meta["lineage"], "temperature": meta.get("temperature", 1.0), "threshold": meta["threshold"]}
    if meta["architecture"]["arch"] == "ensemble":
        scoring |= {"architecture": meta["architecture"], "threshold": meta["threshold"]}
    if not scoring:
        return weights_digest
    return hashlib.sha256(f"{weights_digest}\n{json.dumps(scoring, sort_keys=True)}".encode()).hexdigest()


def check_scoring(meta: Mapping[str, Any], where: str) -> None:
    """What turns logits into calls: a threshold on probabilities in [0, 1] and a positive
    finite temperature (0 gave NaN probabilities, a negative one inverted them)."""
    threshold, temperature = meta["threshold"], meta.get("temperature", 1.0)
    if not (is_number(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"{where}: threshold must be a probability in [0, 1], got {threshold!r}")
    if not (is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature must be a positive finite number, got {temperature!r}")


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """model.json of a model directory, after checking that this version can read it and that
    what the format and the scoring need is there (a hand-edited file fails here, saying why)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a lungray model directory (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    version = meta.get("format_version")
    if not is_number(version) or version != FORMAT_VERSION:
        raise ValueError(f"{path}: model directory format_version {version!r} is not supported (this lungray reads {FORMAT_VERSION})")
    missing = [key for key in (*REQUIRED_KEYS, *FORMAT_KEYS) if key not in meta]
    if missing:
        raise ValueError(f"{path}: {META_FILE} lacks {missing}")
    check_scoring(meta, f"{path}: {META_FILE}")
    return meta


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array`'s memory, without a copy (a batch of 512 images is 25 MB).

    Arrays read through Arrow are read-only, and torch warns when it shares one since writing
    to it would be undefined; scoring never writes to its input (scaling makes a new tensor).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def load_model_dir(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ModelDir:
    """Load a model directory for inference (eval mode, on `device`); never unpickles."""
    meta = read_meta(path)
    weights = (Path(path) / WEIGHTS_FILE).read_bytes()
    if hashlib.sha256(weights).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{path}: {WEIGHTS_FILE} does not match the weights_sha256 in {META_FILE}")
    model = build_from_architecture(meta["architecture"])
    model.load_state_dict(load_safetensors(weights), strict=True)
    # channels_last, as in training: convolutions run 1.3-1.5x faster on CPU here, and on GPU.
    model = model.to(device=device, memory_format=torch.channels_last).eval()
    return ModelDir(path=Path(path), model=model, meta=meta)
