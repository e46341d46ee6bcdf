"""Stored pixel values of one DICOM frame, decoded no larger than the model needs.

Why: hospital films are 2,000-3,000 px and the model sees 224 px, so a full-resolution
decode is most of a screening job's time. Where the codec can decode a smaller image
directly, it does, down to the floor `DecodeOptions.reduced` sets for its codec family on
the shorter side (rows derive the floors from the model's input side: `reduced_decode_for`,
whose figures say why each floor is where it is). The values keep their stored dtype, bit depth and sign, so
the Modality LUT, VOI and padding logic downstream see stored values as before.

Codecs, picked by measurement (bench/decode.py, CPU time, 2048 px 12-bit films):
- JPEG 2000: Pillow's OpenJPEG decoder with `reduce` (whole wavelet resolution levels;
  the LL band is an anti-aliased half-size image per level, resampled onto the box grid
  of a full decode: `onto_box_grid`): 420 ms for a lossless film in full, 106 ms at
  level 1, 30 ms at level 2. pylibjpeg-openjpeg 2.6 (pydicom's plugin)
  and imagecodecs 2026.3 `jpeg2k_decode` have no reduce argument (full: 420 / 407 ms).
  Pillow refuses a level where a side's ceil and rounded reduced sizes differ (side mod
  2^r in 1..2^(r-1)-1, e.g. 1841 at r=2); such levels are skipped ahead of time.
- JPEG baseline / 8-bit extended: Pillow `draft` (libjpeg-turbo's scaled IDCT, 1/2..1/8):
  4 ms at 1/4 against 36 ms for pydicom's default full decode (pylibjpeg-libjpeg) and
  5 ms for imagecodecs' full one. Where no scale is allowed, Pillow's full decode (2.2 ms
  for the 1024 px SIIM film against pydicom's default 10 ms; values within 1 of it).
  simplejpeg and PyTurboJPEG, not measured, wrap the same libjpeg-turbo scaling for 8-bit only. 12-bit JPEG: Pillow cannot open it, so it is a
  full decode.
- JPEG-LS, JPEG lossless, RLE, uncompressed (and anything the above refuse): pydicom's
  `pixel_array`, which keeps pydicom's corrections (unused bits, sign); for JPEG-LS
  through pyjpegls (CharLS, 70 ms) rather than pydicom's default pylibjpeg-libjpeg
  (330 ms; imagecodecs' CharLS: 63 ms). Then integer box binning of the stored values
  down towards the binning floor (by a step that divides both sides), so the float
  pipeline after it runs on a film of about 4x the model's side instead of the full size.
  OpenCV (a 50 MB wheel) was not measured.
A reduced decode that fails for any reason falls back to the full decode; the reason is
kept in `StoredPixels.decoder`, which ends up in the row.
"""

from __future__ import annotations

import io
import struct
from typing import NamedTuple

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from lungray.io.base import DecodeOptions, ReducedDecode, bin_step

J2K_SYNTAXES = (JPEG2000, JPEG2000Lossless)
JPEG_DCT_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# pydicom decoding plugins faster than its default choice (bench/decode.py), used where installed.
# 8-bit JPEG goes through Pillow's libjpeg-turbo, as the scaled decode does, so that a full and
# a scaled decode of one film come from the same IDCT.
FASTEST_PLUGIN = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls", JPEGBaseline8Bit: "pillow"}


class StoredPixels(NamedTuple):
    """A frame's stored values, how much smaller than stored they are, and what decoded them."""

    values: np.ndarray
    reduce: int  # linear factor: stored rows / decoded rows (1 = full resolution)
    decoder: str


def read_stored_pixels(ds: Dataset, frame_index: int, options: DecodeOptions) -> StoredPixels:
    """One frame's stored values, at reduced resolution where the codec and `options.reduced` allow.

    Errors of the full decode propagate (the caller turns them into error rows); errors of
    a reduced decode only send it to the full decode.
    """
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    floors = options.reduced
    reducible = (
        floors is not None
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
        and str(ds.get("PhotometricInterpretation", "")).strip().upper() in MONOCHROME
    )
    failure = ""
    if reducible:
        try:
            reduced = decode_reduced(ds, frame_index, frames, floors)
        except Exception as exc:  # noqa: BLE001 - codecs raise anything; the full decode decides
            reduced, failure = None, f" (reduced decode failed: {type(exc).__name__})"
        if reduced is not None:
            return bin_stored(*reduced, floors.binning)
    values = full_decode(ds, frame_index if frames > 1 else None)
    if not reducible:
        return StoredPixels(values, 1, "pydicom")
    binned = bin_stored(values, 1, "pydicom", floors.binning)
    return binned._replace(decoder=binned.decoder + failure)


def full_decode(ds: Dataset, index: int | None) -> np.ndarray:
    """pydicom's `pixel_array`, through the fastest of its installed plugins for the syntax."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    plugin = FASTEST_PLUGIN.get(syntax)
    if plugin is not None and plugin in get_decoder(syntax).available_plugins:
        return pixel_array(ds, index=index, decoding_plugin=plugin)
    return pixel_array(ds, index=index)


def decode_reduced(ds: Dataset, frame_index: int, frames: int, floors: ReducedDecode) -> tuple[np.ndarray, int, str] | None:
    """(values, linear factor, decoder) from a codec's own reduced decode, or None where it has none."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if syntax in J2K_SYNTAXES:
        return decode_j2k_reduced(frame_bytes(ds, frame_index, frames), ds, rows, cols, floors.wavelet)
    if syntax in JPEG_DCT_SYNTAXES and int(ds.get("BitsStored", 8)) <= 8:
        return decode_jpeg_draft(frame_bytes(ds, frame_index, frames), rows, cols, floors.dct)
    return None


def frame_bytes(ds: Dataset, frame_index: int, frames: int) -> bytes:
    """The encapsulated codestream of one frame (offset tables used where present)."""
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return get_frame(ds.PixelData, frame_index if frames > 1 else 0, extended_offsets=extended, number_of_frames=frames)


def levels_for(shortest: int, min_side: int) -> int:
    """Most halvings (ceil) of `shortest` that stay at or above `min_side`."""
    levels = 0
    while -(-shortest // (2 << levels)) >= min_side:
        levels += 1
    return levels


def pillow_can_reduce(side: int, level: int) -> bool:
    """Pillow's JPEG 2000 decoder refuses a level whose ceil and rounded reduced sizes differ."""
    return (side + (1 << level) - 1) >> level == (side + (1 << (level - 1))) >> level


def j2k_parameters(codestream: bytes) -> tuple[int, bool, int]:
    """(precision, signed, decomposition levels) of a J2K codestream's first component (SIZ, COD)."""
    start = codestream.find(b"\xff\x4f\xff\x51")  # SOC + SIZ, after a JP2 wrapper if any
    if start < 0:
        raise ValueError("no JPEG 2000 codestream header")
    ssiz = codestream[start + 2 + 40]
    cod = codestream.find(b"\xff\x52", start)
    if cod < 0:
        raise ValueError("no JPEG 2000 COD marker")
    (length,) = struct.unpack(">H", codestream[cod + 2 : cod + 4])
    levels = codestream[cod + 9] if length >= 10 else 0
    return (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels


def decode_j2k_reduced(codestream: bytes, ds: Dataset, rows: int, cols: int, min_side: int) -> tuple[np.ndarray, int, str] | None:
    """A J2K frame at the deepest resolution level still >= min_side, in its stored dtype."""
    precision, signed, available = j2k_parameters(codestream)
    bits_stored = int(ds.get("BitsStored", precision))
    if precision > 16 or precision != bits_stored or signed != bool(int(ds.get("PixelRepresentation", 0))):
        return None  # header and codestream disagree: pydicom's decoder knows the corrections
    level = min(levels_for(min(rows, cols), min_side), available)
    while level > 0 and not (pillow_can_reduce(rows, level) and pillow_can_reduce(cols, level)):
        level -= 1
    if level == 0:
        return None
    image = Image.open(io.BytesIO(codestream), formats=["JPEG2000"])
    image.reduce = level
    image.load()
    decoded = np.asarray(image)
    expected = (-(-rows // (1 << level)), -(-cols // (1 << level)))
    if decoded.shape != expected:
        raise ValueError(f"reduced J2K decode gave {decoded.shape}, expected {expected}")
    # Pillow scales samples to the full 8 or 16 bits and offsets signed ones to unsigned.
    shift = decoded.dtype.itemsize * 8 - precision
    values = ((decoded.astype(np.int32) >> shift) - (1 << (precision - 1))) if signed else decoded >> shift
    values = onto_box_grid(values, level)
    itemsize = {8: 1, 16: 2, 32: 4}.get(int(ds.get("BitsAllocated", 16)), 2)  # pydicom's dtype for the frame
    dtype = np.dtype(f"{'i' if signed else 'u'}{itemsize}")
    return values.astype(dtype), 1 << level, f"pillow-openjpeg reduce={level}"


def onto_box_grid(values: np.ndarray, level: int) -> np.ndarray:
    """A J2K LL band resampled to where a box average of the full image puts its samples.

    The LL sample i of level r is a low-pass centred on full-resolution pixel 2^r i, which is
    (1 - 2^-r) / 2 of a reduced pixel before the centre of the block that a box average (and
    the area filter after it) assigns to sample i. Linear interpolation by that fraction
    (edges held, as scipy.ndimage.shift's order=1 "nearest" does) moves it there. Without it
    the film reaches the model shifted (0.056 of an input pixel at 2048 -> 224 px, level 1),
    and on 8 full-size twins of site-B films its largest difference to a full decode at
    224 px was 17.0 levels of 255 against binning's 10.6; with it, 10.6. In place on one
    float32 copy: 2 ms for a 1024 px band, where padding and temporaries took 6.
    """
    fraction = (1 - 2.0**-level) / 2
    shifted = values.astype(np.float32)
    for along in (shifted, shifted.T):  # rows, then columns: the last one of each is held
        ahead = along[1:] * np.float32(fraction)
        along[:-1] *= np.float32(1 - fraction)
        along[:-1] += ahead
    return np.rint(shifted, out=shifted).astype(values.dtype)


def decode_jpeg_draft(codestream: bytes, rows: int, cols: int, min_side: int) -> tuple[np.ndarray, int, str] | None:
    """An 8-bit JPEG frame through libjpeg-turbo's scaled IDCT (1/2, 1/4, 1/8), shorter side >= min_side;
    in full through the same library where no scale keeps that side (a 1024 px film for a
    224 px model), 4x faster than pydicom's default plugin."""
    image = Image.open(io.BytesIO(codestream), formats=["JPEG"])
    if image.mode != "L" or image.size != (cols, rows):
        return None
    image.draft("L", (min_side, min_side))
    values = np.asarray(image)
    factor = round(rows / values.shape[0])
    return values, factor, f"pillow-libjpeg draft=1/{factor}" if factor > 1 else "pillow-libjpeg"


def bin_stored(values: np.ndarray, factor: int, decoder: str, min_side: int) -> StoredPixels:
    """Box-average stored values by the integer step that keeps the shorter side >= min_side."""
    step = bin_step(values.shape[0], values.shape[1], min_side)
    if values.ndim != 2 or step == 1:
        return StoredPixels(values, factor, decoder)
    return StoredPixels(box_mean(values, step), factor * step, f"{decoder}+bin{step}")


def box_mean(values: np.ndarray, step: int) -> np.ndarray:
    """Mean of each step x step block, rounded, in the input's dtype (partial blocks dropped; `bin_step` leaves none).

    Strided sums: one pass per row and column offset, about 2 ms for 2048 px at any step,
    where a 4-axis reshape sum takes 15 ms and Pillow's `reduce` needs an int32 copy first.
    The rounding divides by a shift where the block's area is a power of two (floor
    semantics for signed values too, as `//` has).
    """
    rows, cols = values.shape[0] - values.shape[0] % step, values.shape[1] - values.shape[1] % step
    floating = values.dtype.kind == "f"
    rows_summed = values[0:rows:step].astype(np.float64 if floating else np.int64 if values.dtype.itemsize > 2 else np.int32)
    for offset in range(1, step):
        rows_summed += values[offset:rows:step]
    total = rows_summed[:, 0:cols:step] + rows_summed[:, 1:cols:step]
    for offset in range(2, step):
        total += rows_summed[:, offset:cols:step]
    area = step * step
    if floating:
        return (total / area).astype(values.dtype)
    total += area // 2
    mean = total >> (area.bit_length() - 1) if area & (area - 1) == 0 else total // area
    return mean.astype(values.dtype)
