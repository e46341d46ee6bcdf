"""A screening result as a DICOM Structured Report in the screened study, built and read with highdicom.

The SR is a TID 1500 Measurement Report (Comprehensive SR, the SR class viewers and archives
support most widely) holding one image-level TID 1501 group per screened image:

- source image: the image's SOP Class / Instance UID;
- qualitative evaluation: concept DCM 111413 "Overall Assessment", value SCT 263654008 "Abnormal" when
  probability >= threshold, else SCT 17621005 "Normal";
- measurement DCM 122157 "Probability", the model's probability, unit UCUM "1" (no units);
- measurement DCM 122411 "Threshold Value", the operating threshold, unit UCUM "1";
- finding site SCT 39607008 "Lung";
- algorithm identification (TID 4019): name "lungray", lungray's version, and the parameter
  "model_id=<id>".

The observer is a device (lungray, with the model id as model name); the SR is left
UNVERIFIED and its SeriesDescription says it is an algorithm's output, not for diagnosis.
The Series Instance UID derives from (model id, study UID), the SOP Instance UID also from
what the SR says (each image's probability, and the threshold): a rerun builds the same SOP
Instance UID and `dicomweb.store_if_absent` finds it there and stores no second copy, while a
study whose result changed (an image added on a later night) gets a new SR in the same series.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lungray import __version__

ALGORITHM_NAME = "lungray"
SERIES_DESCRIPTION = "lungray screening - algorithm output, not for diagnosis"
SERIES_NUMBER = 9901
ASSESSMENT = codes.DCM.OverallAssessment  # not DCM 121071 Finding: TID 1501 holds that for the finding type
ABNORMAL = codes.SCT.Abnormal
NORMAL = codes.SCT.Normal
PROBABILITY = codes.DCM.Probability
THRESHOLD = codes.DCM.ThresholdValue
NO_UNITS = codes.UCUM.NoUnits
LUNG = codes.SCT.Lung
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lungray:dicom-uid")
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
_MODEL_PARAMETER = "model_id="
# Type 2 attributes highdicom copies from the first source image; a header may lack them.
_PATIENT_STUDY_KEYWORDS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
)


@dataclass(frozen=True)
class ScoredImage:
    """One screened image: its header (attributes only, pixel data not needed) and the model's probability."""

    header: Dataset
    probability: float


@dataclass(frozen=True)
class ReportedImage:
    """What an SR says about one image."""

    sop_uid: str
    finding: str  # "abnormal" or "normal"
    probability: float
    threshold: float


@dataclass(frozen=True)
class ReportContent:
    """An SR read back: who made it and what it says per image."""

    study_uid: str
    sop_uid: str
    model_id: str | None
    algorithm_version: str | None
    images: tuple[ReportedImage, ...]


def report_uids(model_id: str, study_uid: str, content: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the SR for this model and study saying `content`
    (`report_content`): the same on every run for the same result."""
    return stable_uid("sr-series", model_id, study_uid), stable_uid("sr-instance", model_id, study_uid, content)


def report_content(images: Sequence[ScoredImage], threshold: float) -> str:
    """What an SR says, as text: each image's SOP Instance UID and probability, and the threshold."""
    scored = sorted((str(image.header.SOPInstanceUID), float(image.probability)) for image in images)
    return repr((scored, float(threshold)))


def stable_uid(*parts: str) -> str:
    """A UUID-derived UID (2.25.N, PS3.5 B.2) from a name-based UUID of `parts`: the same parts, the same UID."""
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, "\x1f".join(parts)).int)


def with_patient_study_module(header: Dataset) -> Dataset:
    """A copy of `header` with the Type 2 patient/study attributes highdicom copies present (empty if absent)."""
    filled = copy.copy(header)
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword not in filled:
            setattr(filled, keyword, "")
    return filled


def _image_group(image: ScoredImage, threshold: float, algorithm: hd.sr.AlgorithmIdentification, model_id: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sop_uid = str(image.header.SOPInstanceUID)
    finding = ABNORMAL if image.probability >= threshold else NORMAL
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid("sr-group", model_id, sop_uid),
            identifier=f"lungray image {sop_uid}",
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image.header)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=ASSESSMENT, value=finding)],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(image.probability), unit=NO_UNITS, algorithm_id=algorithm),
            hd.sr.Measurement(name=THRESHOLD, value=float(threshold), unit=NO_UNITS, algorithm_id=algorithm),
        ],
    )


def build_report(images: Sequence[ScoredImage], threshold: float, model_id: str, version: str = __version__) -> hd.sr.ComprehensiveSR:
    """The SR for one study's screened images (all from the same study), with patient and study copied from them."""
    if not images:
        raise ValueError("an SR needs at least one screened image")
    headers = [with_patient_study_module(image.header) for image in images]
    study_uids = {str(header.StudyInstanceUID) for header in headers}
    if len(study_uids) != 1:
        raise ValueError(f"the images of one SR must share one study, got {len(study_uids)}")
    (study_uid,) = study_uids
    series_uid, sop_uid = report_uids(model_id, study_uid, report_content(images, threshold))
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=version, parameters=[_MODEL_PARAMETER + model_id])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=stable_uid("device", model_id),
            name=ALGORITHM_NAME,
            manufacturer_name=ALGORITHM_NAME,
            model_name=model_id[:64],
        ),
    )
    groups = [
        _image_group(ScoredImage(header, image.probability), threshold, algorithm, model_id)
        for header, image in zip(headers, images)
    ]
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    return hd.sr.ComprehensiveSR(
        evidence=headers,
        content=content[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=ALGORITHM_NAME,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
    )


def _value(measurements: Sequence[hd.sr.Measurement]) -> float:
    if len(measurements) != 1:
        raise ValueError(f"expected one measurement, found {len(measurements)}")
    return float(measurements[0].value)


def read_report(dataset: Dataset) -> ReportContent:
    """What a lungray SR says (parsed with highdicom), from a stored or retrieved dataset."""
    measurement_report = hd.sr.ComprehensiveSR.from_dataset(dataset, copy=True).content
    if not isinstance(measurement_report, hd.sr.MeasurementReport):
        raise ValueError("not a TID 1500 measurement report")
    model_id = version = None
    images = []
    for group in measurement_report.get_image_measurement_groups():
        probability = _value(group.get_measurements(name=PROBABILITY))
        threshold = _value(group.get_measurements(name=THRESHOLD))
        (evaluation,) = group.get_qualitative_evaluations(name=ASSESSMENT)
        finding = {ABNORMAL.value: "abnormal", NORMAL.value: "normal"}[evaluation.value.value]
        (source,) = group.source_images
        images.append(ReportedImage(str(source.referenced_sop_instance_uid), finding, probability, threshold))
        model_id, version = _algorithm(group)
    return ReportContent(
        study_uid=str(dataset.StudyInstanceUID),
        sop_uid=str(dataset.SOPInstanceUID),
        model_id=model_id,
        algorithm_version=version,
        images=tuple(images),
    )


def _algorithm(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[str | None, str | None]:
    """(model id, version) from the group's own TID 4019 algorithm identification."""
    root = group[0]
    versions = hd.sr.utils.find_content_items(root, name=codes.DCM.AlgorithmVersion)
    parameters = hd.sr.utils.find_content_items(root, name=codes.DCM.AlgorithmParameters)
    model_ids = [str(item.TextValue)[len(_MODEL_PARAMETER) :] for item in parameters if str(item.TextValue).startswith(_MODEL_PARAMETER)]
    return (model_ids[0] if model_ids else None), (str(versions[0].TextValue) if versions else None)
