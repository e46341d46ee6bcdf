"""A site's sample: every row of an ingest, whatever its split, grouped by patient.

A site's local sample is not split by the ingest (`lungray ingest` assigns splits for
training), so every row is read; the cross-validation and the bootstrap group by
`patient_key`. A few hundred films fit in memory, and pyarrow reads them without
starting Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from lungray.evaluate import check_preprocessing
from lungray.ingest import ingest_rows, load_summary
from lungray.modeldir import ModelDir
from lungray.site.lineage import film_keys
from lungray.split import NO_PATIENT_PREFIX, patient_array


@dataclass(frozen=True)
class SiteSample:
    """The site's images in path order, their labels (None when not read), patients and provenance."""

    data: str
    fingerprint: str
    images: np.ndarray  # (N, size, size), the stored dtype
    labels: np.ndarray | None  # int64 0/1; None for an unlabelled read
    patients: np.ndarray  # patient_key; an image without one is its own patient
    content_hashes: list[str]  # each image's content_hash (of its stored tensor)

    def describe(self) -> dict[str, Any]:
        """The lineage's record of what data was used: counts, and which images by their content
        (`film_keys`), so that a report on another ingest of the same films still finds them
        (no path, no patient key)."""
        record: dict[str, Any] = {
            "data": self.data,
            "data_fingerprint": self.fingerprint,
            "film_keys": film_keys(self.content_hashes),
            "n_images": int(len(self.images)),
            "n_patients": int(np.unique(self.patients).size),
            "labels_used": self.labels is not None,
        }
        if self.labels is not None:
            record.update(n_abnormal=int(self.labels.sum()), n_normal=int(self.labels.size - self.labels.sum()))
        return record

    def patient_warnings(self) -> list[str]:
        """A warning when images have no patient id: each is then its own patient, so one
        patient's films can fall in different folds and the intervals come out too narrow."""
        missing = sum(str(patient).startswith(NO_PATIENT_PREFIX) for patient in self.patients)
        if not missing:
            return []
        return [
            f"{missing} of the {len(self.patients)} images have no patient id, so each counts as its own patient: one "
            "patient's films may fall in different folds and the intervals are too narrow; ingest with an adapter that "
            "reads patients (e.g. --dataset kermany) or a labels CSV with a patient column"
        ]


def read_ingest_rows(data: str, columns: list[str], labelled_only: bool = False) -> pa.Table:
    """`columns` of every row of the ingest at `data`, whatever its split, in path order."""
    table = ingest_rows(data, list(dict.fromkeys([*columns, "path"])), pads.field("label").is_valid() if labelled_only else None)
    return table.take(np.argsort(np.asarray(table["path"].to_pylist(), dtype=object), kind="stable"))


def read_site_sample(data: str, model: ModelDir, labelled: bool) -> SiteSample:
    """All rows of the ingest at `data` (all splits), checked against the model's preprocessing.

    `labelled=True` reads the labelled rows only and requires both classes: a threshold or
    a temperature cannot be chosen from one class. `labelled=False` reads the images and
    never the label column, so unsupervised adaptation cannot use labels by accident.
    """
    summary = load_summary(data)
    check_preprocessing(model, summary, data)
    table = read_ingest_rows(data, ["image", "patient_key", "path", "content_hash"] + (["label"] if labelled else []), labelled_only=labelled)
    if table.num_rows == 0:
        raise ValueError(f"{data} holds no {'labelled ' if labelled else ''}images")
    images = table["image"].combine_chunks().to_numpy()
    patients = patient_array(table["patient_key"].to_pylist(), table["path"].to_pylist())
    labels = None
    if labelled:
        labels = table["label"].to_numpy().astype(np.int64)
        n_abnormal = int(labels.sum())
        if n_abnormal in (0, labels.size):
            only = "abnormal" if n_abnormal else "normal"
            raise ValueError(f"{data} holds {labels.size} labelled images, all {only}: a site sample needs both classes")
    return SiteSample(
        data=data, fingerprint=summary["fingerprint"], images=images, labels=labels, patients=patients,
        content_hashes=table["content_hash"].to_pylist(),
    )
