"""DICOM to a [0,1] image (bone white) by the standard's grayscale pipeline, in pydicom's functions.

stored values -> Modality LUT (`apply_modality_lut`: Rescale Slope/Intercept or Modality
LUT Sequence) -> VOI (`apply_voi` on integer modality values for a VOI LUT Sequence, else
`apply_windowing` for Window Center/Width: LINEAR, LINEAR_EXACT, SIGMOID; switchable) ->
Presentation (`apply_presentation_lut`) -> [0,1].

- Without a VOI, the scale is the full output range of the modality transform over every
  storable value (not the image's own min/max), so two encodings of one image agree and
  image content (padding included) never sets the scale.
- Invalid windows (LINEAR width < 1, LINEAR_EXACT/SIGMOID width <= 0, non-finite) are
  errors, as pydicom raises them: never NaN, never a film silently inverted.
- Polarity: a Presentation LUT Shape, when present, decides it (INVERSE inverts, IDENTITY
  does not; PS3.3 C.8.11.6.1.2 asks MONOCHROME1 films to carry INVERSE, MONOCHROME2 films
  IDENTITY, so in a conforming file it agrees with the photometric interpretation and the
  inversion happens once); a Presentation LUT Sequence maps to P-values directly; with
  neither, MONOCHROME1 is inverted.
- Pixel padding (Pixel Padding Value, with Pixel Padding Range Limit an inclusive range in
  either order; PS3.3 C.7.5.1.1.2): matched on stored values, before the modality LUT, so
  MONOCHROME1 and signed storage need nothing special. Padding pixels come out 0 (black)
  and are returned as a mask (False on padding) that `lungray.preprocess.preprocess` uses to
  keep them out of the percentile stretch.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi, apply_windowing

from lungray.io import codecs
from lungray.io.base import INTERPRETER_CONTROL, DecodeError, DecodeOptions, rgb_to_gray, without_quoted_values

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAddress", "AccessionNumber")
# Optional elements that some writers leave empty; empty means absent to the standard, not to pydicom.
EMPTY_MEANS_ABSENT = ("VOILUTFunction", "PresentationLUTShape", "PixelPaddingValue", "PixelPaddingRangeLimit")

# pydicom logs header values (names included) when it meets invalid elements; errors here are values.
logging.getLogger("pydicom").setLevel(logging.ERROR)
LUT_RANGE_ENUMERATION_LIMIT = 1 << 17  # enumerate stored values up to 17 bits to find a LUT's range
DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian
DEFLATED_HEADER_ALLOWANCE = 16 << 20  # bytes a deflated dataset may inflate to whatever its size
# Deflate reaches about 1000:1 on constant bytes; a film, even a padded one, stays far below 100:1.
DEFLATE_RATIO_LIMIT = 100

KeyPatient = Callable[[str | None], str | None]


def read_dataset(data: bytes, max_pixels: int) -> Dataset:
    """Parse a DICOM file, with or without preamble and file meta; a deflated dataset only when it
    inflates to no more than `max_pixels` 32-bit samples, nor 100 times its size, and a header."""
    try:
        check_inflated_size(data, min(max_pixels * 4, len(data) * DEFLATE_RATIO_LIMIT) + DEFLATED_HEADER_ALLOWANCE)
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except DecodeError:
        raise
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


def check_inflated_size(data: bytes, limit: int) -> None:
    """Refuse a Deflated Explicit VR file whose dataset inflates past `limit` bytes, by inflating
    it at most that far: pydicom inflates the whole dataset in memory before any element is read,
    so a 0.4 MB file could take 3.6 GB before the pixel bomb guard saw its header."""
    if DEFLATED.encode() not in data[:4096]:  # the transfer syntax, in the file meta
        return
    stream = io.BytesIO(data)
    pydicom.filereader.read_preamble(stream, True)
    meta = pydicom.filereader._read_file_meta_info(stream)  # leaves the stream at the dataset
    if meta.get("TransferSyntaxUID") != DEFLATED:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflater.decompress(data[stream.tell() :], limit)
    if inflater.unconsumed_tail:
        raise DecodeError(f"deflated dataset inflates past {limit} bytes (decompression bomb guard)")


def header_metadata(ds: Dataset, key_patient: KeyPatient) -> dict[str, Any]:
    """Fields the later stages need; the patient ID only through `key_patient`, never the name.

    Read before any pixel is touched and tolerant of damaged elements, so that a file whose
    pixels fail still reports its study.
    """

    def text(keyword: str) -> str | None:
        try:
            value = ds.get(keyword)
            return str(value) if value not in (None, "") else None
        except Exception:  # noqa: BLE001 - a damaged element is missing, not fatal
            return None

    return {
        "format": "dicom",
        "study_id": text("StudyInstanceUID"),
        "series_uid": text("SeriesInstanceUID"),
        "sop_uid": text("SOPInstanceUID"),
        "patient_key": key_patient(text("PatientID")),
        "modality": text("Modality"),
        "view_position": text("ViewPosition"),
        "body_part": text("BodyPartExamined"),
        "study_date": text("StudyDate"),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
    }


def check_pixel_header(ds: Dataset, options: DecodeOptions) -> tuple[int, int, int, int]:
    """Refuse non-image objects and bombs from the header alone, before any allocation."""
    sop = ds.get("SOPClassUID")
    sop_name = sop.name if isinstance(sop, pydicom.uid.UID) and sop.is_valid else "unknown SOP class"
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        # Parametric maps: no stored value range, no window pydicom can apply (it needs Bits Stored).
        raise DecodeError(f"DICOM object has float pixel data ({sop_name}), which no radiograph has")
    if "PixelData" not in ds:
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


def scale_to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32, copy=False)


def lut_input(values: np.ndarray) -> np.ndarray:
    """Integer input for a lookup table, which the standard indexes by integer values: a
    non-integer modality output (a fractional Rescale Slope) goes to the nearest, halves up
    (pydicom would truncate a float array)."""
    if np.issubdtype(values.dtype, np.integer):
        return values
    return np.floor(values + 0.5).astype(np.int64)


def has_voi_lut_sequence(ds: Dataset) -> bool:
    """pydicom's own test (`apply_voi_lut`): an item with both descriptor and data."""
    return bool(ds.get("VOILUTSequence")) and None not in (
        ds.VOILUTSequence[0].get("LUTDescriptor"),
        ds.VOILUTSequence[0].get("LUTData"),
    )


def apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT of `ds` on integer modality values, by pydicom's `apply_voi`, with two
    of its readings corrected (pydicom 3.0.2):
    - it computes LUT indices in the type of the LUT's entries, so with 8-bit entries an index
      past 255 wraps (a 4096-entry 8-bit LUT, 12 bits to a display's 8, gave garbage), and with
      16-bit entries one past 65535: here the input is first clipped to the mapped range, which
      the lookup maps its ends to anyway, and 8-bit entries are read into 16-bit words, the
      words they are stored in (PS3.3 C.11.2.1.1), so every index fits;
    - the descriptor's first mapped value is US or SS by the data (PS3.3 C.11.2.1.1); read as US
      from an implicit VR file it turns -1024 into 64512 and maps every pixel to the first entry.
      A value past 32767 that lies above every modality value is read as the signed one.
    """
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(value) for value in item.LUTDescriptor)
    entries = entries or 1 << 16
    if first >= 1 << 15 and first > modality_output_range(ds)[1]:
        first -= 1 << 16
    corrected = Dataset()
    corrected.file_meta = ds.file_meta
    corrected.VOILUTSequence = [copy.copy(item)]
    corrected.VOILUTSequence[0].LUTDescriptor = [entries % (1 << 16), first, 16 if bits == 8 else bits]
    return apply_voi(np.clip(values, first, first + entries - 1), corrected, index=0)


def first_window(ds: Dataset) -> tuple[float, float, str] | None:
    """(center, width, function) of the first window, as `apply_windowing` reads it, or None."""
    if ds.get("WindowCenter") in (None, "") or ds.get("WindowWidth") in (None, ""):
        return None
    center, width = (ds[k].value[0] if ds[k].VM > 1 else ds[k].value for k in ("WindowCenter", "WindowWidth"))
    return float(center), float(width), str(ds.get("VOILUTFunction", "LINEAR")).upper()


def voi_to_unit(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str] | None:
    """The dataset's first VOI on modality values, scaled to [0,1] by the VOI's own output
    range; None when it has none. A VOI LUT Sequence is preferred, as pydicom does."""
    if has_voi_lut_sequence(ds):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return scale_to_unit(apply_voi_lut_sequence(lut_input(values), ds), 0.0, float((1 << bits) - 1)), "voi_lut_sequence"
    window = first_window(ds)
    if window is None:
        return None
    center, width, function = window
    description = f"window {center:g}/{width:g} {function}"
    if not (math.isfinite(center) and math.isfinite(width)):
        raise DecodeError(f"invalid VOI window ({description}): center and width must be finite numbers")
    try:
        windowed = apply_windowing(values, ds, index=0)
        with np.errstate(over="ignore"):  # SIGMOID at +-inf: exp overflows to the range's ends
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
    except ValueError as exc:  # pydicom's checks: LINEAR width < 1, LINEAR_EXACT/SIGMOID width <= 0, unknown function
        raise DecodeError(f"invalid VOI window ({description}): {exc}") from None
    return scale_to_unit(windowed, float(lo), float(hi)), description


def to_presentation(image: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """[0,1] VOI output -> [0,1] P-values (bright = dense), by the Presentation LUT if the file has one.

    pydicom scales its input by the array's own min and max; the ends of the VOI output
    range are appended so that the scale is that range, as the standard defines it. For a
    Presentation LUT Sequence the input is given as LUT indices (the nearest entry), so that
    pydicom's scaling is exact and its truncation cannot drop an entry.
    """
    try:
        if "PresentationLUTSequence" in ds:
            entries, _, bits = (int(v) for v in ds.PresentationLUTSequence[0].LUTDescriptor)
            entries = entries or 1 << 16
            indices = np.rint(image.ravel() * (entries - 1))
            with_ends = np.concatenate([indices, np.array([0.0, entries - 1.0])])
            p_values = apply_presentation_lut(with_ends, ds)[:-2].reshape(image.shape)
            return scale_to_unit(p_values, 0.0, float((1 << bits) - 1))
        if "PresentationLUTShape" in ds:
            with_ends = np.concatenate([image.ravel(), np.array([0.0, 1.0], dtype=image.dtype)])
            return apply_presentation_lut(with_ends, ds)[:-2].reshape(image.shape)
    except NotImplementedError as exc:
        raise DecodeError(f"unsupported Presentation LUT: {exc}") from None
    return 1.0 - image if photometric == "MONOCHROME1" else image


def stored_padding_value(value: Any, ds: Dataset) -> int:
    """A padding value in stored-value space; a negative value written as US is read back signed."""
    value = int(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
    bits = int(ds.get("BitsAllocated", 16))
    if int(ds.get("PixelRepresentation", 0)) == 1 and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


def padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """False where a stored value is padding (PS3.3 C.7.5.1.1.2); None when no pixel is."""
    if "PixelPaddingValue" not in ds:
        return None
    value = stored_padding_value(ds.PixelPaddingValue, ds)
    limit = stored_padding_value(ds.PixelPaddingRangeLimit, ds) if "PixelPaddingRangeLimit" in ds else value
    lo, hi = min(value, limit), max(value, limit)
    padding = (stored >= lo) & (stored <= hi)
    return ~padding if padding.any() else None


def grayscale_to_unit(stored: np.ndarray, ds: Dataset, photometric: str, apply_voi_lut: bool) -> tuple[np.ndarray, str | None]:
    """Stored grayscale values -> ([0,1] P-values, the VOI applied or None).

    Every step is a function of the stored value alone, so for integer storage up to 17
    bits the pipeline runs once over every storable value and the image is a lookup in
    that table: the same values as running it on the pixels, without pydicom's
    per-pixel masking passes over a 2,000 px film (about 3x faster when a window applies).
    """
    lo, hi = stored_value_range(ds)
    if np.issubdtype(stored.dtype, np.integer) and stored.size:
        # pydicom leaves JPEG 2000 and JPEG-LS values at the codestream's precision, which can
        # exceed Bits Stored: the table covers the values there are, as pydicom's pipeline would.
        lo, hi = min(lo, int(stored.min())), max(hi, int(stored.max()))
    if np.issubdtype(stored.dtype, np.integer) and hi - lo < LUT_RANGE_ENUMERATION_LIMIT:
        table, description = grayscale_pipeline(np.arange(lo, hi + 1), ds, photometric, apply_voi_lut)
        indices = stored if lo == 0 else stored.astype(np.int32) - lo
        return lookup(table.astype(np.float32, copy=False), indices), description
    return grayscale_pipeline(stored, ds, photometric, apply_voi_lut)


def lookup(table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """`table[indices]`, an index past the table reading its last entry (numpy's take, mode "clip").

    8-bit samples (JPEG baseline films, the commonest lossy storage) go through OpenCV's
    LUT: 0.27 ms for a 1024 px film against numpy's 0.70.
    """
    if indices.dtype == np.uint8 and indices.ndim == 2:
        return cv2.LUT(indices, np.pad(table[:256], (0, max(0, 256 - table.size)), mode="edge"))
    return np.take(table, indices, mode="clip")


def grayscale_pipeline(stored: np.ndarray, ds: Dataset, photometric: str, apply_voi_lut: bool) -> tuple[np.ndarray, str | None]:
    values = apply_modality_lut(stored, ds)
    voi = voi_to_unit(values, ds) if apply_voi_lut else None
    if voi is None:
        image, description = scale_to_unit(values, *modality_output_range(ds)), None
    else:
        image, description = voi
    return to_presentation(np.clip(image, 0.0, 1.0), ds, photometric), description


def select_frame(frames: int, policy: str) -> int:
    return frames // 2 if policy == "middle" else 0


def element_text(ds: Dataset, keyword: str) -> str | None:
    """An element's value as text; where pydicom cannot convert it (a damaged VR or length),
    its raw bytes read as Latin-1, which is how pydicom's own error message would quote them."""
    try:
        value = ds.get(keyword)
        return str(value) if value not in (None, "") else None
    except Exception:  # noqa: BLE001 - the element is damaged; its bytes are still the patient's
        raw = ds.get_item(keyword, keep_deferred=True)
        value = getattr(raw, "value", None)
        return value.decode("latin-1") if isinstance(value, bytes) and value else None


def identifying_values(ds: Dataset) -> list[str]:
    """Header values that identify the patient, to be scrubbed from any error message; never
    raises, so that a damaged identifying element is scrubbed like any other."""
    values = []
    for keyword in IDENTIFYING_KEYWORDS:
        value = element_text(ds, keyword)
        if value is not None:
            values.extend(part for part in value.replace("^", " ").split() if len(part) > 2)
            values.append(value)
    return sorted(set(values), key=len, reverse=True)


def redact(message: str, secrets: list[str]) -> str:
    """Drop the patient's identifiers and any quoted header value a library put in a message.

    A damaged header can make one element swallow its neighbours (the name among them), so
    quoted values are removed wholesale rather than trusted to be harmless.
    """
    for secret in secrets:
        message = message.replace(secret, "<redacted>")
    return without_quoted_values(message)


def read_stored_pixels(ds: Dataset, frame_index: int, options: DecodeOptions) -> codecs.StoredPixels:
    """The stored values of one frame, reduced where `lungray.io.codecs` can (any size:
    padding and LUTs work element-wise), with decode errors as DecodeErrors."""
    try:
        return codecs.read_stored_pixels(ds, frame_index, options)
    except (NotImplementedError, RuntimeError) as exc:
        raise DecodeError(f"unsupported or undecodable transfer syntax {ds.file_meta.get('TransferSyntaxUID')}: {exc}") from exc
    except ValueError as exc:
        message = str(exc)
        if "length" in message or "truncat" in message or "expected" in message:
            raise DecodeError(f"truncated or malformed pixel data: {message}") from exc
        raise DecodeError(f"pixel data could not be decoded: {message}") from exc


def decode_dicom(
    data: bytes, options: DecodeOptions, key_patient: KeyPatient, ds: Dataset | None = None
) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
    """DICOM bytes -> ([0,1] float32 2-D image, metadata, padding mask or None).

    `ds` is `data` already parsed by `read_dataset` (not parsed again), or None.

    Raises DecodeError for unusable files, carrying the header's metadata (UIDs) when the
    header could be read. Error messages never carry the patient's name or IDs, even where
    pydicom quotes them. `key_patient` turns the patient ID into the stored key.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(data, options.max_pixels) if ds is None else ds
        secrets = identifying_values(ds)
        meta = header_metadata(ds, key_patient)
        try:
            image, mask = _decode_pixels(ds, options, meta)
        except DecodeError as exc:
            raise DecodeError(redact(str(exc), secrets), meta) from None
        except INTERPRETER_CONTROL:
            raise
        except BaseException as exc:  # noqa: BLE001 - codecs raise (and panic) anything; scrub before it becomes a row
            raise DecodeError(redact(f"dicom decode failed: {type(exc).__name__}: {exc}", secrets), meta) from None
        return image, meta, mask


def _decode_pixels(ds: Dataset, options: DecodeOptions, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The image and its padding mask; fills `meta` with the pixel header as it goes."""
    rows, cols, frames, samples = check_pixel_header(ds, options)
    frame_index = select_frame(frames, options.frame)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    meta.update(rows=rows, cols=cols, frames=frames, frame_index=frame_index, photometric=photometric, voi=None)
    for keyword in EMPTY_MEANS_ABSENT:
        if keyword in ds and ds[keyword].value in (None, ""):
            del ds[keyword]

    stored, meta["decode_reduce"], meta["decoder"] = read_stored_pixels(ds, frame_index, options)

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
        return (rgb_to_gray(stored.astype(np.float64)) / full_scale).astype(np.float32), None

    mask = padding_mask(stored, ds)
    image, meta["voi"] = grayscale_to_unit(stored, ds, photometric, options.apply_voi)
    image = image.astype(np.float32, copy=not image.flags.writeable)
    if mask is not None:
        image *= mask  # padding to 0
    return image, mask
