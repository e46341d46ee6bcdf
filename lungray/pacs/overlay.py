"""The Grad-CAM overlay of a flagged image as a DICOM Secondary Capture in the image's study (highdicom).

Marked as what it is: Image Type DERIVED\\SECONDARY, a Source Image Sequence pointing at the
screened image, a Derivation Description, and "not for diagnosis" in the Series Description
and Image Comments. UIDs derive from (model id, source SOP Instance UID), so a rerun builds
the same instance and `dicomweb.store_if_absent` stores no second copy.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from lungray.pacs.report import ALGORITHM_NAME, stable_uid, with_patient_study_module

SERIES_DESCRIPTION = "lungray Grad-CAM overlay - not for diagnosis"
SERIES_NUMBER = 9902


def overlay_uids(model_id: str, source_sop_uid: str, study_uid: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the overlay: one series per model and study."""
    return stable_uid("sc-series", model_id, study_uid), stable_uid("sc-instance", model_id, source_sop_uid)


def build_overlay(source: Dataset, overlay_png: bytes, model_id: str) -> hd.sc.SCImage:
    """A Secondary Capture holding the overlay PNG (RGB) in the study of `source` (its header suffices)."""
    pixels = np.asarray(Image.open(io.BytesIO(overlay_png)).convert("RGB"))
    series_uid, sop_uid = overlay_uids(model_id, str(source.SOPInstanceUID), str(source.StudyInstanceUID))
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=with_patient_study_module(source),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=ALGORITHM_NAME,
        patient_orientation=("L", "F"),  # highdicom wants one; replaced just below
        series_description=SERIES_DESCRIPTION,
    )
    # The overlay is the model's resized view, not the acquired matrix: orientation unknown (Type 2, empty).
    image.PatientOrientation = None
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "NO"
    image.ImageComments = f"Grad-CAM heat map of model {model_id} over the source image; not for diagnosis"[:10240]
    image.DerivationDescription = f"lungray Grad-CAM of model {model_id}; algorithm output, not for diagnosis"[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    image.SourceImageSequence = [reference]
    return image
