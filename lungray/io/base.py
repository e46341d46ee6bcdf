"""What every decoder shares: its options, its result, its error, and how options are recorded.

A module of its own so that `lungray.io.decode` (the dispatcher) and the format decoders
(`lungray.io.dicom`) both import it and not each other.

The decode options that change pixels are recorded beside the preprocessing, in the
ingest's summary.json and then in model.json, with `DECODER_VERSION`, so that a model is
screened and evaluated on images decoded exactly as its training images were
(`decode_record` writes the record, `options_from_record` reads it and refuses what this
lungray cannot reproduce). A file without a record, or a record without a version, was
written before versions were recorded, by the first decoder: it reads as version 1, never
as today's decoder, so an old model cannot pass as trained on today's pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

# Bumped whenever the decoder's pixels change for the same file and options.
# 1: the first released decoder (recorded no version: `normalized_record` reads a missing one as 1).
# 2: pydicom's VOI/windowing/presentation functions, Presentation LUT Shape, pixel padding.
# 3: reduced-resolution decoding (JPEG 2000 levels, JPEG DCT scaling, binning; lungray.io.codecs).
# 4: reduced decodes no smaller than 4x the model side (was 2x), binning steps that divide
#    both sides (were cropped): `reduced_decode_for`, `bin_step`.
# 5: 8-bit JPEG decoded in full by Pillow's libjpeg-turbo, as the scaled decode is (was pydicom's
#    default plugin, whose IDCT differs by up to 1 in a few percent of pixels); JPEG 2000 LL
#    bands resampled onto the box grid (`codecs.onto_box_grid`; they were half a pixel off).
# 6: "area" shrinks by the exact area average (OpenCV INTER_AREA; it was Pillow's BOX, whole
#    source pixels), box binning and the LL band's shift through OpenCV (integer means rounded
#    to nearest, ties either way), JPEG 2000 levels at OpenJPEG's size where Pillow's rounding
#    refused them (`codecs.pillow_j2k_reduced`).
# 7: JPEG 2000 of the irreversible 9/7 wavelet decoded in full (was its LL band at level 1),
#    by the wavelet the codestream's COD names, whatever the transfer syntax.
# 8: films with Pixel Padding decoded in full (their reduced samples mixed padding and tissue
#    into values that were neither), signed 8-bit JPEG in full (the scaled decode dropped the sign).
# 9: VOI LUT Sequences of 8-bit entries indexed past 255 and with a signed first mapped value read
#    as unsigned (both misread by pydicom 3.0.2's apply_voi), JPEG 2000 / JPEG-LS samples above
#    Bits Stored windowed as pydicom reads them (they were clipped), Float Pixel Data refused
#    (it decoded to a black film), 8-bit JPEG of Bits Stored < 8 decoded in full (the scaled decode kept
#    the bits above Bits Stored that pydicom masks).
# 10: JPEG 2000 of the 9/7 wavelet by a COC or a tile-part COD over a 5/3 main COD decoded in full
#    (was its level-1 band); levels the fewest any coding style segment sets (`codecs.j2k_parameters`).
DECODER_VERSION = 10
FIRST_DECODER_VERSION = 1
VERSION_KEY = "decoder_version"
# Limits that earlier decoders' DecodeOptions had and ingest summaries still carry (asdict).
RETIRED_LIMITS = ("min_side",)
FRAME_POLICIES = ("first", "middle")


# Rust codecs (pylibjpeg-rle, through pyo3) panic on some damaged streams with a
# BaseException that is no Exception. Such a file is bad input like any other, so the decoders
# catch every BaseException except the interpreter's own control flow, which they re-raise.
INTERPRETER_CONTROL = (KeyboardInterrupt, SystemExit, GeneratorExit)


class DecodeError(Exception):
    """A file that cannot be used; its message becomes the row's `error`.

    `meta` carries what the header said before decoding failed (study, series and SOP
    UIDs), so that the error row is still counted in its study.
    """

    def __init__(self, message: str, meta: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.meta = dict(meta or {})


@dataclass(frozen=True)
class ReducedDecode:
    """Shorter-side floors, in decoded pixels, of a reduced decode, one per codec family."""

    wavelet: int  # JPEG 2000 resolution levels (Pillow's OpenJPEG `reduce`)
    dct: int  # JPEG DCT scaling (libjpeg's scaled IDCT, Pillow `draft`)
    binning: int  # integer box binning of the decoded values, after any of the above or a full decode


# Floors as multiples of the model's input side: what bench/reduced_decode_probs.py measured
# (max |dprob| against the full-resolution decode, default CNN / CNN-LSTM, full-size twins of
# site-B films, 2048 px; docs/results.md, reduced-resolution decode). Decoder version 6, the
# twelfth session's models, 96 films: at 4x every family within 0.02 on both models but lossy
# JPEG 2000 on the CNN-LSTM (0.032; decoder 5 on the same models: 0.025 / 0.034, every family
# over 0.02 on one of them); at 2x every family 0.029-0.124, so the exact area resize, which
# halved the moves at 4x, does not make 2x possible.
# JPEG 2000: 4x (level 1, 1024 px) lossless 0.010 / 0.013, lossy 0.019 / 0.032; 2x (level 2)
# lossless 0.039 / 0.055, lossy 0.060 / 0.125. The lossy films' probabilities through their
# full decode stay within 0.002 / 0.004 of the film's before compression, through the level-1
# band 0.019 / 0.030 (fourteenth session), so from decoder version 7 the floor applies to the
# reversible 5/3 wavelet only and 9/7 codestreams are decoded in full (`codecs.decode_j2k_reduced`).
WAVELET_SIDE_MULTIPLE = 4
# DCT scaling: 4x (1/2) 0.010 / 0.016; 2x (1/4) 0.030 / 0.052.
DCT_SIDE_MULTIPLE = 4
# Binning: 4x (step 2) 0.009 / 0.015; 2x (step 4) 0.033 / 0.039.
BINNING_SIDE_MULTIPLE = 4


def reduced_decode_for(model_side: int) -> ReducedDecode:
    """The floors for a model that sees `model_side` px."""
    return ReducedDecode(
        wavelet=WAVELET_SIDE_MULTIPLE * model_side, dct=DCT_SIDE_MULTIPLE * model_side, binning=BINNING_SIDE_MULTIPLE * model_side
    )


@dataclass(frozen=True)
class DecodeOptions:
    """Knobs of the decoder; defaults suit chest radiographs.

    Fields change pixels, and are recorded with a model, unless marked `pixels: False`
    (safety limits that only decide whether a file is read at all).
    """

    apply_voi: bool = True
    max_pixels: int = field(default=100_000_000, metadata={"pixels": False})  # rows x cols x frames x samples
    frame: str = "first"  # which frame of a multi-frame object: "first" or "middle"
    # How small the decoder may go where the codec can decode smaller (lungray.io.codecs);
    # None = full resolution. Rows set it from the model's input side (`reduced_decode_for`),
    # so it follows from the recorded preprocessing and is not recorded itself.
    reduced: ReducedDecode | None = field(default=None, metadata={"pixels": False})

    def __post_init__(self) -> None:
        if self.frame not in FRAME_POLICIES:
            raise ValueError(f"frame must be one of {FRAME_POLICIES}, got {self.frame!r}")


@dataclass
class Decoded:
    """A decoded image (float32, 2-D, [0,1], bone white) and its metadata, or an error.

    `mask` is None when every pixel is image; otherwise a bool array of the image's shape,
    False on padding (DICOM Pixel Padding Value / Range). Padding pixels are 0 (black) in
    `image` and must not count in any intensity statistics: `lungray.preprocess.preprocess`
    takes the mask for that.
    """

    image: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    mask: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")


def without_quoted_values(message: str) -> str:
    """`message` with every quoted value a library put in it replaced by `<value>`, non-printable
    characters as `?`, at most 300 characters: decoders quote header and stream bytes, which can
    be a patient's name, in their errors."""
    message = QUOTED.sub("<value>", message)
    return "".join(char if char.isprintable() else "?" for char in message)[:300]


def bin_step(rows: int, cols: int, min_side: int) -> int:
    """The largest integer box-binning step that keeps the shorter side at or above `min_side`
    and divides both sides (1: no binning).

    A step that leaves a remainder would crop it, and that slight change of the film's
    geometry moves probabilities more than the binning itself: 2800 px films binned by 3
    (a pixel cropped) moved the CNN-LSTM's by up to 0.025, 3072 px ones by 3 (none) 0.007.
    """
    return first_dividing_step(rows, cols, min_side, range(min(rows, cols) // min_side, 1, -1))


def dct_scale(rows: int, cols: int, min_side: int) -> int:
    """The largest libjpeg DCT scaling denominator (8, 4, 2) that keeps the shorter side at or
    above `min_side` and divides both sides (1: decode in full).

    libjpeg's scaled image has ceil(side / scale) samples, the last of which reaches past a
    side that the scale does not divide (as binning's remainder would be cropped), and the
    area resize after it would stretch the film by up to a scaled pixel at the far edge.
    """
    return first_dividing_step(rows, cols, min_side, (8, 4, 2))


def first_dividing_step(rows: int, cols: int, min_side: int, steps: Iterable[int]) -> int:
    """The first of `steps` that divides both sides and keeps the shorter side at or above
    `min_side` (1 where none does): one rule for binning and DCT scaling alike."""
    for step in steps:
        if min(rows, cols) // step >= min_side and rows % step == 0 and cols % step == 0:
            return step
    return 1


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the weights PIL and pydicom use."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def pixel_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(DecodeOptions) if f.metadata.get("pixels", True))


def decode_record(options: DecodeOptions) -> dict[str, Any]:
    """The options that change pixels, and the decoder version: what model.json keeps
    (summary.json keeps this and the limits)."""
    values = asdict(options)
    return {**{name: values[name] for name in pixel_fields()}, VERSION_KEY: DECODER_VERSION}


def normalized_record(record: dict[str, Any] | None) -> dict[str, Any]:
    """A recorded decode (summary.json or model.json) with defaults filled in and limits
    dropped, so that two records compare equal exactly when they mean the same pixels.

    A missing record (model directories written before decode options were recorded) and
    a record without a decoder version (ingests of that time, which wrote the options
    only) are decoder version 1's: the options they name, else its defaults (today's).
    Unknown keys are kept, so they compare unequal rather than vanish.
    """
    limits = ({f.name for f in fields(DecodeOptions)} - set(pixel_fields())) | set(RETIRED_LIMITS)
    recorded = {key: value for key, value in (record or {}).items() if key not in limits}
    return {**decode_record(DecodeOptions()), VERSION_KEY: FIRST_DECODER_VERSION, **recorded}


def options_from_record(record: dict[str, Any] | None, where: str) -> DecodeOptions:
    """DecodeOptions that reproduce `record`, or a ValueError saying why this lungray cannot.

    `where` names the record's owner (a model directory, an ingest) for the message. Limits
    (`max_pixels`) are not part of the record: the caller sets them.
    """
    unversioned = VERSION_KEY not in (record or {})
    record = normalized_record(record)
    version = record.pop(VERSION_KEY)
    if version != DECODER_VERSION:
        origin = " (it records no decoder version, so it dates from before versions were recorded)" if unversioned else ""
        raise ValueError(
            f"{where} was made with images from lungray decoder version {version}{origin}; this lungray decodes "
            f"with version {DECODER_VERSION} and cannot reproduce those pixels: use a lungray with decoder version "
            f"{version}, or re-ingest and retrain; only where a re-ingest by this lungray is shown to give the "
            f"same tensors (equal content hashes) may its decode record say version {DECODER_VERSION}"
        )
    unknown = sorted(set(record) - set(pixel_fields()))
    if unknown:
        raise ValueError(f"{where} records decode options {unknown} that this lungray does not know, so it cannot honour them")
    try:
        return DecodeOptions(**record)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} records decode options this lungray cannot honour: {exc}") from exc
