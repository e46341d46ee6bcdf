"""Build small DICOM and PNG files in memory for decoder tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def dicom_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    patient_id: str = "PAT-0001",
    patient_name: str = "Doe^Jane",
    **elements: object,
) -> Dataset:
    """A minimal valid single-frame grayscale DICOM dataset holding `pixels` uncompressed."""
    bits_allocated = 8 if pixels.dtype == np.uint8 else 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.StudyDate = "20260101"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def dicom_bytes(ds: Dataset, preamble: bool = True) -> bytes:
    buffer = io.BytesIO()
    if preamble:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    else:
        # A bare dataset (no preamble, no file meta), as some old archives hold.
        ds = ds.copy()
        del ds.file_meta
        pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def with_patient_id_as_ul(data: bytes) -> bytes:
    """The PatientID element's VR made UL (explicit VR files): a value whose length is no multiple
    of 4 is then no whole number of values, and pydicom, asked for it, raises an error that
    quotes the raw bytes."""
    tag = b"\x10\x00\x20\x00LO"
    assert data.count(tag) == 1
    return data.replace(tag, tag[:4] + b"UL")


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
