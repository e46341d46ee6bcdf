"""A training checkpoint -> the model directory that screening, evaluation and the report read.

Every checkpoint carries the best weights so far and their validation probabilities, so
the latest checkpoint alone is enough: its best weights become the model, and the
screening threshold is chosen on those validation probabilities (the whole val set, as
gathered during training).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import Checkpoint

import lungray
from lungray.metrics import binary_metrics, choose_threshold
from lungray.modeldir import save_model_dir
from lungray.models import ModelConfig, build_model, count_parameters
from lungray.train.loop import read_progress, read_state


def versions() -> dict[str, str]:
    return {
        "lungray": lungray.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def export_model_dir(checkpoint: Checkpoint, output: str | Path, preprocess: dict[str, Any], min_sensitivity: float) -> Path:
    """Write the best weights of `checkpoint`'s run to `output` as a model directory.

    `preprocess` is the ingest's PreprocessConfig dict, copied so that scoring reproduces
    the training input exactly.
    """
    with checkpoint.as_directory() as checkpoint_dir:
        progress = read_progress(checkpoint_dir)
        state = read_state(checkpoint_dir)
    val_label = state["best_val_label"].numpy()
    val_prob = state["best_val_prob"].numpy()
    threshold = choose_threshold(val_label, val_prob, min_sensitivity)
    meta = {
        "architecture": progress.architecture,
        "training": progress.hyperparameters,
        "preprocess": preprocess,
        "threshold": threshold,
        "threshold_policy": {
            "rule": "highest specificity with sensitivity >= min_sensitivity",
            "min_sensitivity": min_sensitivity,
            "chosen_on": "val",
        },
        "val_metrics": binary_metrics(val_label, val_prob, threshold),
        "history": progress.history,
        "data_fingerprint": progress.data_fingerprint,
        "versions": versions(),
        # Time of the epochs that made the model, without Ray start-up or epochs lost to failures.
        "wall_time_s": sum(record["seconds"] for record in progress.history),
        "epochs_trained": progress.next_epoch,
        "best_epoch": progress.best_epoch,
        "resumed_at_epochs": progress.resumed_at_epochs,
        "n_parameters": count_parameters(build_model(ModelConfig.from_dict(progress.architecture))),
        "peak_memory_mb": max(record["peak_rss_mb"] for record in progress.history),
    }
    return save_model_dir(output, state["best_model"], meta)
