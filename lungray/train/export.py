"""A training checkpoint -> the model directory that screening, evaluation and the report read.

Every checkpoint carries the validated weights of the best epoch so far and of the last,
each with its validation probabilities, so the latest checkpoint alone is enough: the
selected weights (`TrainConfig.select`) become the model, and the screening threshold is
chosen on their validation probabilities (the whole val set, as gathered during training).
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.train import Checkpoint

import lungray
from lungray.metrics import THRESHOLD_RULE, binary_metrics, choose_threshold
from lungray.io.base import normalized_record
from lungray.io.listing import is_s3, join_uri, write_bytes
from lungray.modeldir import META_FILE, WEIGHTS_FILE, save_model_dir
from lungray.models import ModelConfig, build_model, count_parameters
from lungray.train.loop import last_validated_weights, read_progress, read_state


def versions() -> dict[str, str]:
    return {
        "lungray": lungray.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def operating_point(val_label: np.ndarray, val_prob: np.ndarray, min_sensitivity: float) -> dict[str, Any]:
    """model.json's threshold, how it was chosen, and the validation metrics at it."""
    threshold = choose_threshold(val_label, val_prob, min_sensitivity)
    return {
        "threshold": threshold,
        "threshold_policy": {"rule": THRESHOLD_RULE, "min_sensitivity": min_sensitivity, "chosen_on": "val"},
        "val_metrics": binary_metrics(val_label, val_prob, threshold),
    }


def export_model_dir(
    checkpoint: Checkpoint, output: str | Path, preprocess: dict[str, Any], min_sensitivity: float, select: str,
    *, decode: dict[str, Any] | None,
) -> None:
    """Write the `select`ed weights ("best" or "last") of `checkpoint`'s run to `output` (local or s3://) as a model directory.

    `preprocess` and `decode` are the ingest summary's, copied so that scoring reproduces
    the training input exactly (`decode` None or without a version: an ingest from before
    decoder versions were recorded, stamped decoder version 1, never today's). On S3 the
    directory is written locally, then uploaded weights first and model.json last, so a
    reader that finds model.json finds its weights.
    """
    if not is_s3(str(output)):
        save_model_dir(output, *model_dir_contents(checkpoint, preprocess, min_sensitivity, select, decode=decode))
        return
    with tempfile.TemporaryDirectory(prefix="lungray-export-") as staging:
        save_model_dir(staging, *model_dir_contents(checkpoint, preprocess, min_sensitivity, select, decode=decode))
        for name in (WEIGHTS_FILE, META_FILE):
            write_bytes(join_uri(str(output), name), (Path(staging) / name).read_bytes())


def model_dir_contents(
    checkpoint: Checkpoint, preprocess: dict[str, Any], min_sensitivity: float, select: str, *, decode: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(selected weights, model.json fields) of `checkpoint`'s run, the threshold chosen on their val probabilities."""
    with checkpoint.as_directory() as checkpoint_dir:
        progress = read_progress(checkpoint_dir)
        state = read_state(checkpoint_dir)
    if f"{select}_val_prob" not in state:
        raise ValueError(f"this run's checkpoints, written by an older lungray, keep no {select} epoch's validation; export it with --select best")
    selected_epoch = progress.best_epoch if select == "best" else progress.next_epoch - 1
    meta = {
        "architecture": progress.architecture,
        # The export's own settings as this export applied them (a finished run re-exported with others).
        "training": {**progress.hyperparameters, "min_sensitivity": min_sensitivity, "select": select},
        "preprocess": preprocess,
        "decode": normalized_record(decode),
        **operating_point(state[f"{select}_val_label"].numpy(), state[f"{select}_val_prob"].numpy(), min_sensitivity),
        "history": progress.history,
        "data_fingerprint": progress.data_fingerprint,
        "versions": versions(),
        # Time of the epochs that made the model, without Ray start-up or epochs lost to failures.
        "wall_time_s": sum(record["seconds"] for record in progress.history),
        "epochs_trained": progress.next_epoch,
        "best_epoch": progress.best_epoch,
        "selected_epoch": selected_epoch,
        "resumed_at_epochs": progress.resumed_at_epochs,
        "n_parameters": count_parameters(build_model(ModelConfig.from_dict(progress.architecture))),
        "peak_memory_mb": max(record["peak_rss_mb"] for record in progress.history),
        "hardware": progress.hardware,
    }
    return (state["best_model"] if select == "best" else last_validated_weights(state)), meta
