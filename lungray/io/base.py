"""What every decoder shares: its options, its result, its error, and how options are recorded.

A module of its own so that `lungray.io.decode` (the dispatcher) and the format decoders
(`lungray.io.dicom`) both import it and not each other.

The decode options that change pixels are recorded beside the preprocessing, in the
ingest's summary.json and then in model.json, with `DECODER_VERSION`, so that a model is
screened and evaluated on images decoded exactly as its training images were
(`decode_record` writes the record, `options_from_record` reads it and refuses what this
lungray cannot reproduce).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

# Bumped whenever the decoder's pixels change for the same file and options.
# 2: pydicom's VOI/windowing/presentation functions, Presentation LUT Shape, pixel padding.
# 3: reduced-resolution decoding (JPEG 2000 levels, JPEG DCT scaling, binning; lungray.io.codecs).
DECODER_VERSION = 3
VERSION_KEY = "decoder_version"
FRAME_POLICIES = ("first", "middle")


class DecodeError(Exception):
    """A file that cannot be used; its message becomes the row's `error`.

    `meta` carries what the header said before decoding failed (study, series and SOP
    UIDs), so that the error row is still counted in its study.
    """

    def __init__(self, message: str, meta: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.meta = dict(meta or {})


@dataclass(frozen=True)
class DecodeOptions:
    """Knobs of the decoder; defaults suit chest radiographs.

    Fields change pixels, and are recorded with a model, unless marked `pixels: False`
    (safety limits that only decide whether a file is read at all).
    """

    apply_voi: bool = True
    max_pixels: int = field(default=100_000_000, metadata={"pixels": False})  # rows x cols x frames x samples
    frame: str = "first"  # which frame of a multi-frame object: "first" or "middle"
    # Decode no smaller than this on the shorter side where the codec can decode smaller
    # (JPEG 2000 levels, JPEG DCT scaling, box binning after a full decode; lungray.io.codecs).
    # None = full resolution. Rows set it to twice the model's input side (lungray.io.rows),
    # so it follows from the recorded preprocessing and is not recorded itself.
    min_side: int | None = field(default=None, metadata={"pixels": False})

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


def bin_step(shorter_side: int, min_side: int) -> int:
    """The integer box-binning step that keeps the shorter side at or above `min_side` (1: no binning)."""
    step = shorter_side // min_side
    return step if step >= 2 else 1


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

    A missing record (model directories and ingests written before decode options were
    recorded) and a record without a decoder version are read as this decoder's defaults:
    such files cannot tell which decoder made them. Unknown keys are kept, so they compare
    unequal rather than vanish.
    """
    limits = {f.name for f in fields(DecodeOptions)} - set(pixel_fields())
    recorded = {key: value for key, value in (record or {}).items() if key not in limits}
    return {**decode_record(DecodeOptions()), **recorded}


def options_from_record(record: dict[str, Any] | None, where: str) -> DecodeOptions:
    """DecodeOptions that reproduce `record`, or a ValueError saying why this lungray cannot.

    `where` names the record's owner (a model directory, an ingest) for the message. Limits
    (`max_pixels`) are not part of the record: the caller sets them.
    """
    record = normalized_record(record)
    version = record.pop(VERSION_KEY)
    if version != DECODER_VERSION:
        raise ValueError(
            f"{where} was made with images from lungray decoder version {version}; this lungray decodes with "
            f"version {DECODER_VERSION} and cannot reproduce those pixels: use a lungray with decoder version "
            f"{version}, or re-ingest and retrain"
        )
    unknown = sorted(set(record) - set(pixel_fields()))
    if unknown:
        raise ValueError(f"{where} records decode options {unknown} that this lungray does not know, so it cannot honour them")
    try:
        return DecodeOptions(**record)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} records decode options this lungray cannot honour: {exc}") from exc
