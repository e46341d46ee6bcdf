"""Full-size (2048 px, 12-bit) twins of a real chest film in every storage a hospital uses.

A 224 px Kermany film is upsampled to the full size and given what a detector adds at that
size (a slow exposure gradient, fine periodic structure, quantum noise), so that a reduced-
resolution decode has real high-frequency content to get wrong. Shared by tests/test_codecs.py
and bench/decode.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

KERMANY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kermany-224" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
# storage name -> file suffix; the DICOM ones hold 12-bit values except JPEG baseline (8-bit).
STORAGES = {
    "uncompressed": ".dcm",
    "rle": ".dcm",
    "j2k_lossless": ".dcm",
    "j2k_lossy": ".dcm",
    "jpegls": ".dcm",
    "jpeg_baseline": ".dcm",
    "png16": ".png",
    "jpeg_file": ".jpg",
}


def synthetic_film(side: int = 2048, bits: int = 12, seed: int = 0, source: Path = KERMANY) -> np.ndarray:
    """A `side` x `side` film of `bits`-bit stored values (uint16), bright = dense."""
    rng = np.random.default_rng(seed)
    base = Image.open(source).convert("F").resize((side, side), Image.Resampling.BICUBIC)
    film = np.asarray(base, dtype=np.float64) / 255.0
    yy, xx = np.mgrid[0:side, 0:side] / side
    film = 0.85 * film + 0.1 * (1 - yy) + 0.03 * np.sin(2 * np.pi * xx * side / 23.0) * np.cos(2 * np.pi * yy * side / 37.0)
    top = (1 << bits) - 1
    film = np.clip(film, 0, 1) * (0.9 * top) + 0.05 * top + rng.normal(0, 0.002 * top, (side, side))
    return np.clip(np.rint(film), 0, top).astype(np.uint16)


def film_dataset(pixels: np.ndarray, bits: int = 12) -> Dataset:
    """A CR dataset (MONOCHROME2, a typical window) holding `pixels` uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", "PA", "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    top = (1 << bits) - 1
    ds.WindowCenter, ds.WindowWidth = round(0.5 * top), round(0.85 * top)
    ds.PixelData = pixels.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    return ds


def dicom_file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def stored_as(pixels: np.ndarray, storage: str, bits: int = 12) -> bytes:
    """The film's file bytes in one of STORAGES (pydicom's encoders where it has one)."""
    to8 = np.rint(pixels / ((1 << bits) - 1) * 255).astype(np.uint8)
    if storage == "png16":
        buffer = io.BytesIO()
        Image.fromarray((pixels.astype(np.uint32) << (16 - bits)).astype(np.uint16)).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
    if storage == "jpeg_file":
        buffer = io.BytesIO()
        Image.fromarray(to8).save(buffer, format="JPEG", quality=92)
        return buffer.getvalue()
    if storage == "jpeg_baseline":
        # pydicom has no JPEG baseline encoder; Pillow's (libjpeg-turbo) output is encapsulated.
        ds = film_dataset(to8, bits=8)
        buffer = io.BytesIO()
        Image.fromarray(to8).save(buffer, format="JPEG", quality=92)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        return dicom_file_bytes(ds)
    ds = film_dataset(pixels, bits)
    if storage == "rle":
        ds.compress(RLELossless, pixels)
    elif storage == "j2k_lossless":
        ds.compress(JPEG2000Lossless, pixels)
    elif storage == "j2k_lossy":
        ds.compress(JPEG2000, pixels, j2k_cr=[20])
    elif storage == "jpegls":
        ds.compress(JPEGLSLossless, pixels)
    elif storage != "uncompressed":
        raise ValueError(f"unknown storage {storage!r}")
    return dicom_file_bytes(ds)
