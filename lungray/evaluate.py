"""Score a model directory on a labelled split of an ingested dataset.

The model's stored threshold is applied as is (it was chosen on validation), and the
metrics come from `lungray.metrics`, so the numbers match what training and the comparison
report compute. Scoring goes through `ModelDir.predict_proba`, the one scoring function.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray.data
from ray.data.expressions import col

from lungray.ingest import images_uri, ingest_rows, load_summary
from lungray.io.base import normalized_record
from lungray.io.listing import filesystem_for
from lungray.io.parquet import read_parquet
from lungray.metrics import binary_metrics
from lungray.modeldir import ModelDir, load_model_dir
from lungray.site.lineage import fitted_on, images_fitted_on
from lungray.split import SPLITS

SCORING_BATCH_SIZE = 256


def labelled_split(data: str, split: str, columns: Sequence[str] = ("image", "label")) -> ray.data.Dataset:
    """`columns` of one split's labelled rows (unlabelled rows cannot be scored)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    filesystem, path = filesystem_for(images_uri(data))
    return (
        read_parquet(path, filesystem, columns=list(dict.fromkeys([*columns, "label", "split"])))
        .filter(expr=(col("split") == split) & col("label").is_not_null())
        .select_columns(list(columns))
    )


def check_preprocessing(model: ModelDir, summary: dict[str, Any], data: str) -> None:
    """Refuse data decoded or preprocessed differently from the model's training data: its
    scores would describe inputs the model never saw. Records from before decoder versions
    were kept read as decoder version 1's (`lungray.io.base.normalized_record`)."""
    check_preprocess(model, summary, data)
    trained_on, given = normalized_record(model.meta.get("decode")), normalized_record(summary.get("decode"))
    if trained_on != given:
        raise ValueError(f"{model.path} was trained on images decoded with {trained_on}, {data} was decoded with {given}")


def check_preprocess(model: ModelDir, summary: dict[str, Any], data: str) -> None:
    """The preprocessing half of `check_preprocessing` (size, intensity, aspect), for a caller
    that compares models of different decoder versions on one ingest on purpose."""
    if summary["preprocess"] != model.meta["preprocess"]:
        raise ValueError(
            f"{model.path} was trained on images preprocessed with {model.meta['preprocess']}, "
            f"{data} was preprocessed with {summary['preprocess']}"
        )


def score_split(model: ModelDir, data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, abnormal probabilities) of `model` on the labelled images of `split`."""
    probs, labels = [], []
    for batch in labelled_split(data, split).iter_batches(batch_size=SCORING_BATCH_SIZE, batch_format="numpy"):
        probs.append(model.predict_proba(batch["image"]))
        labels.append(batch["label"].astype(np.int64))
    if not labels:
        raise ValueError(f"the {split} split of {data} has no labelled images")
    return np.concatenate(labels), np.concatenate(probs)


def evaluate(model_dir: str | os.PathLike[str], data: str, split: str = "test") -> dict[str, Any]:
    """Metrics of the model at its stored threshold on `split` of the ingest at `data`, with what
    they leave out (`not_scored`) and the site steps of the model that saw these images
    (`in_sample`: its figures here are in-sample for them)."""
    model = load_model_dir(model_dir)
    summary = load_summary(data)
    check_preprocessing(model, summary, data)
    labels, probs = score_split(model, data, split)
    rows = ingest_rows(data, ["label", "content_hash"], pads.field("split") == split)
    labelled = rows.filter(pc.is_valid(rows["label"]))
    content_hashes = labelled["content_hash"].to_pylist()
    in_sample = [
        {"step": step["step"], "site": step.get("site"), "images_fitted_on": images_fitted_on(step, content_hashes)}
        for step in model.meta.get("lineage", [])
        if fitted_on(step, content_hashes, summary["fingerprint"])
    ]
    return {
        "model_id": model.model_id,
        "split": split,
        "data_fingerprint": summary["fingerprint"],
        **binary_metrics(labels, probs, model.threshold),
        "not_scored": {
            "unlabelled_in_split": rows.num_rows - labelled.num_rows,
            # Files the ingest could not decode, or set aside by scope, are in no split (errors.parquet, skipped.parquet).
            "ingest_errors": int(summary.get("by_status", {}).get("error", 0)),
            "ingest_skipped": int(summary.get("by_status", {}).get("skipped", 0)),
        },
        "in_sample": in_sample,
    }

