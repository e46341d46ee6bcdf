"""An archive of objects in and out of the default scope, for the screen and ingest tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from conftest import SAMPLES
from dicom_factory import dicom_bytes, dicom_dataset
from pydicom.data import get_testdata_file

CHEST_STUDY, LATERALS_STUDY = "1.2.826.0.1.3680043.99.2", "1.2.826.0.1.3680043.99.3"


def scope_archive(root: Path) -> Path:
    """One chest study holding a PA, a lateral, a knee film and a DX without BodyPartExamined; a CT
    slice (pydicom's reference CT_small.dcm); a study of laterals only; and a JPEG, which has no header."""
    image = (np.arange(96 * 96, dtype=np.uint32).reshape(96, 96) % 251).astype(np.uint8)
    mixed = root / "mixed"
    mixed.mkdir(parents=True)
    for name, elements in (
        ("pa", {}),
        ("lateral", {"ViewPosition": "LL"}),
        ("knee", {"Modality": "CR", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}),
        ("no-body-part", {"ViewPosition": "AP"}),
    ):
        ds = dicom_dataset(image, StudyInstanceUID=CHEST_STUDY, **elements)
        if name == "no-body-part":
            del ds.BodyPartExamined
        (mixed / f"{name}.dcm").write_bytes(dicom_bytes(ds))
    shutil.copy(get_testdata_file("CT_small.dcm"), mixed / "ct-slice.dcm")
    (root / "laterals").mkdir()
    for index in range(2):
        ds = dicom_dataset(image, StudyInstanceUID=LATERALS_STUDY, ViewPosition="LATERAL")
        (root / "laterals" / f"lat{index}.dcm").write_bytes(dicom_bytes(ds))
    (root / "plain").mkdir()
    shutil.copy(next((SAMPLES / "kermany-mini" / "NORMAL").glob("*.jpeg")), root / "plain" / "film.jpeg")
    return root
