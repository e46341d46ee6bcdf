"""DICOM to a [0,1] image in the order the standard's grayscale pipeline implies.

stored values -> Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence)
-> VOI LUT (Window Center/Width, or VOI LUT Sequence; switchable) -> MONOCHROME1
inversion -> [0,1]. Without a VOI, the scale is the full output range of the modality
transform (not the image's own min/max), so two encodings of one image agree exactly.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi

from lungray.io import codecs
from lungray.io.decode import DecodeError, DecodeOptions, patient_key, rgb_to_gray

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAddress", "AccessionNumber")

# pydicom logs header values (names included) when it meets invalid elements; errors here are values.
logging.getLogger("pydicom").setLevel(logging.ERROR)
LUT_RANGE_ENUMERATION_LIMIT = 1 << 17  # enumerate stored values up to 17 bits to find a LUT's range


def read_dataset(data: bytes) -> Dataset:
    """Parse a DICOM file, with or without preamble and file meta."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for garbage
        raise DecodeError(f"not a readable image (no PNG/JPEG signature, not DICOM: {type(exc).__name__})") from exc
    if len(ds) == 0 or not any(tag in ds for tag in ("SOPClassUID", "PixelData", "Rows", "StudyInstanceUID")):
        raise DecodeError("not a recognised image: no PNG/JPEG signature and no DICOM elements")
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        # Files without file meta (pre-Part 10) are Implicit VR Little Endian by default.
        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if ds.is_implicit_VR else pydicom.uid.ExplicitVRLittleEndian
        )
    return ds


def header_metadata(ds: Dataset, salt: str | None) -> dict[str, Any]:
    """Fields the later stages need; the patient ID only as a salted hash, never the name."""

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value) if value not in (None, "") else None

    return {
        "format": "dicom",
        "study_id": text("StudyInstanceUID"),
        "series_uid": text("SeriesInstanceUID"),
        "sop_uid": text("SOPInstanceUID"),
        "patient_key": patient_key(text("PatientID"), salt),
        "modality": text("Modality"),
        "view_position": text("ViewPosition"),
        "body_part": text("BodyPartExamined"),
        "study_date": text("StudyDate"),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
    }


def check_pixel_header(ds: Dataset, options: DecodeOptions) -> tuple[int, int, int, int]:
    """Refuse non-image objects and bombs from the header alone, before any allocation."""
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        sop_name = sop.name if isinstance(sop, pydicom.uid.UID) and sop.is_valid else "unknown SOP class"
        raise DecodeError(f"DICOM object has no pixel data ({sop_name})")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError(f"DICOM image header incomplete: {exc}") from exc
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise DecodeError(f"DICOM header declares an empty image ({rows}x{cols}, {frames} frames)")
    if rows * cols * frames * samples > options.max_pixels:
        raise DecodeError(
            f"image too large: {rows}x{cols} x {frames} frames x {samples} samples exceeds the limit of "
            f"{options.max_pixels} pixels (decompression bomb guard)"
        )
    return rows, cols, frames, samples


def stored_value_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def modality_output_range(ds: Dataset) -> tuple[float, float]:
    """The range the modality transform can produce over every storable value."""
    lo, hi = stored_value_range(ds)
    if hi - lo < LUT_RANGE_ENUMERATION_LIMIT:
        values = np.arange(lo, hi + 1)
    else:
        values = np.array([lo, hi])
    mapped = apply_modality_lut(values, ds)
    return float(np.min(mapped)), float(np.max(mapped))


def window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing straight to [0,1] (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise DecodeError(f"invalid VOI window width {width} for LINEAR")
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def first_value(value: Any) -> float:
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)


def apply_voi_to_unit(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str] | None:
    """The dataset's first VOI (LUT sequence preferred, as pydicom does), or None when it has none."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        output_bits = int(item.LUTDescriptor[2])
        out = apply_voi(values, ds, index=0)
        return np.clip(out / float((1 << output_bits) - 1), 0.0, 1.0), "voi_lut_sequence"
    if "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter not in (None, "") and ds.WindowWidth not in (None, ""):
        center, width = first_value(ds.WindowCenter), first_value(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return window(values, center, width, function), f"window {center:g}/{width:g} {function}"
    return None


def select_frame(frames: int, policy: str) -> int:
    return frames // 2 if policy == "middle" else 0


def identifying_values(ds: Dataset) -> list[str]:
    """Header values that identify the patient, to be scrubbed from any error message."""
    values = []
    for keyword in IDENTIFYING_KEYWORDS:
        value = ds.get(keyword)
        if value not in (None, ""):
            values.extend(part for part in str(value).replace("^", " ").split() if len(part) > 2)
            values.append(str(value))
    return sorted(set(values), key=len, reverse=True)


QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")


def redact(message: str, secrets: list[str]) -> str:
    """Drop the patient's identifiers and any quoted header value a library put in a message.

    A damaged header can make one element swallow its neighbours (the name among them), so
    quoted values are removed wholesale rather than trusted to be harmless.
    """
    for secret in secrets:
        message = message.replace(secret, "<redacted>")
    message = QUOTED.sub("<value>", message)
    return "".join(char if char.isprintable() else "?" for char in message)[:300]


def decode_dicom(data: bytes, options: DecodeOptions, salt: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """DICOM bytes -> ([0,1] float32 2-D image, metadata); raises DecodeError for unusable files.

    Error messages never carry the patient's name or IDs, even where pydicom quotes them.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(data)
        secrets = identifying_values(ds)
        try:
            return _decode_dataset(ds, options, salt)
        except DecodeError as exc:
            raise DecodeError(redact(str(exc), secrets)) from None
        except Exception as exc:  # noqa: BLE001 - codecs raise anything; scrub before it becomes a row
            raise DecodeError(redact(f"dicom decode failed: {type(exc).__name__}: {exc}", secrets)) from None


def _decode_dataset(ds: Dataset, options: DecodeOptions, salt: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    meta = header_metadata(ds, salt)
    rows, cols, frames, samples = check_pixel_header(ds, options)
    frame_index = select_frame(frames, options.frame)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    meta.update(rows=rows, cols=cols, frames=frames, frame_index=frame_index, photometric=photometric)

    try:
        stored, meta["decode_reduce"], meta["decoder"] = codecs.read_stored_pixels(ds, frame_index, options)
    except (NotImplementedError, RuntimeError) as exc:
        raise DecodeError(f"unsupported or undecodable transfer syntax {meta['transfer_syntax']}: {exc}") from exc
    except ValueError as exc:
        message = str(exc)
        if "length" in message or "truncat" in message or "expected" in message:
            raise DecodeError(f"truncated or malformed pixel data: {message}") from exc
        raise DecodeError(f"pixel data could not be decoded: {message}") from exc

    if photometric not in MONOCHROME:
        # pydicom returns YBR as RGB and PALETTE COLOR as indices; both become luma.
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            stored = apply_color_lut(stored, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        else:
            bits = int(ds.get("BitsStored", 8))
        if stored.ndim != 3:
            raise DecodeError(f"unexpected pixel shape {stored.shape} for {photometric}")
        full_scale = float((1 << bits) - 1)
        meta["voi"] = None
        return (rgb_to_gray(stored.astype(np.float64)) / full_scale).astype(np.float32), meta

    values = apply_modality_lut(stored, ds).astype(np.float64)
    voi = apply_voi_to_unit(values, ds) if options.apply_voi else None
    if voi is None:
        lo, hi = modality_output_range(ds)
        image = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        meta["voi"] = None
    else:
        image, meta["voi"] = voi
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0).astype(np.float32), meta
