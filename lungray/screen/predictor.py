"""The model actor of the screening pipeline: loaded once per actor, scores decoded batches."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lungray.io.listing import is_s3, join_uri, read_bytes
from lungray.modeldir import META_FILE, WEIGHTS_FILE, ModelDir, load_model_dir


def local_model_dir(uri: str) -> Path:
    """A model directory on local disk: as given, or fetched once from s3:// into a temp folder."""
    if not is_s3(uri):
        return Path(uri)
    target = Path(tempfile.mkdtemp(prefix="lungray-model-"))
    for name in (WEIGHTS_FILE, META_FILE):
        (target / name).write_bytes(read_bytes(join_uri(uri, name)))
    return target


class Predictor:
    """Ray Data callable class: `map_batches(Predictor, compute=ActorPoolStrategy(...))`.

    Receives decoded rows with their `image` tensors and returns the same rows with `prob`
    (the abnormal probability; null for rows that failed to decode) and without the image,
    so only small rows travel on from here. Arrow in and out: no per-column conversions.
    The model scores with its BatchNorm folded into the convolutions (the same function,
    fewer passes over each activation).
    """

    def __init__(self, model_uri: str, threads: int = 1) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.model: ModelDir = load_model_dir(local_model_dir(model_uri), device=device).with_folded_batchnorm()

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.asarray(pc.equal(batch["status"], "ok").to_numpy(zero_copy_only=False), dtype=bool)
        prob = np.full(len(ok), np.nan, dtype=np.float64)
        if ok.any():
            # Views of the batch's buffer where possible: each copy of a 512-image batch is 25 MB.
            column = batch["image"]
            images = (column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()).to_numpy(zero_copy_only=False)
            images = images if ok.all() else images[ok]
            prob[ok] = self.model.predict_proba(images, batch_size=len(images))
        return batch.drop_columns(["image"]).append_column("prob", pa.array(prob, pa.float64(), from_pandas=True))
