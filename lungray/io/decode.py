"""The one decode path: file bytes to a float32 [0,1] image (bright = dense) plus metadata.

Every stage (ingest, screening, evaluation) decodes through `decode_bytes`, which never
raises: a file that cannot be used comes back as a `Decoded` with `error` set, so a data
pipeline can keep one row per input file and say why a file was not used. A DICOM image
with pixel padding comes with `Decoded.mask` (False on padding), which
`lungray.preprocess.preprocess` takes to keep the padding out of the intensity stretch.
"""

from __future__ import annotations

import functools
import io
import posixpath
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

# DecodeError, Decoded and DecodeOptions live in lungray.io.base and are imported from here too.
from lungray.io.base import (
    INTERPRETER_CONTROL,
    DecodeError,
    Decoded,
    DecodeOptions,
    bin_step,
    dct_scale,
    rgb_to_gray,
    without_quoted_values,
)
from lungray.preprocess import to_unit
from lungray.privacy import keyed

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"

# PIL's own bomb check would raise or warn inconsistently; lungray applies its own limit.
Image.MAX_IMAGE_PIXELS = None


def patient_key(patient_id: str | None, salt: str | None) -> str | None:
    """HMAC-SHA256 of a patient identifier under the site's salt: stable within a site, useless
    outside it. Without a salt there is no key (None): never one under a public default."""
    if patient_id is None or str(patient_id).strip() == "" or not salt:
        return None
    return keyed("patient", str(patient_id).strip(), salt)


def study_from_relpath(relpath: str) -> str:
    """For files without a study UID, the study is the folder the file sits in."""
    return posixpath.dirname(relpath) or "."


def sniff_format(data: bytes) -> str:
    """'png', 'jpeg', 'dicom' (Part 10 preamble) or 'unknown' (tried as DICOM without preamble)."""
    if data[128:132] == b"DICM":  # first: a DICOM preamble may hold anything, a PNG or JPEG signature too
        return "dicom"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return "unknown"


def _raster_to_unit(image: Image.Image) -> np.ndarray:
    """A PIL image in any mode -> gray float32, 1.0 at the full scale of its samples."""
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
    if image.mode.startswith("I"):  # 16-bit grayscale PNG ("I;16", or "I" after binning)
        return to_unit(np.asarray(image), 65535)
    if image.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        return (rgb_to_gray(rgb) / 255.0).astype(np.float32)
    if image.mode in ("L", "1"):
        return to_unit(np.asarray(image.convert("L")), 255)
    raise DecodeError(f"unsupported image mode {image.mode}")


def shrink_raster(image: Image.Image, min_side: int | None) -> tuple[Image.Image, int]:
    """A PNG/JPEG PIL image box-averaged to >= min_side on the shorter side (no-op when None)."""
    if min_side is None:
        return image, 1
    step = bin_step(image.size[1], image.size[0], min_side)
    if step == 1:
        return image, 1
    if image.mode in ("I;16", "I;16B", "I;16L"):
        image = image.convert("I")
    if image.mode not in ("L", "RGB", "RGBA", "LA", "I", "F"):
        return image, 1
    return image.reduce(step), step


def decode_raster(data: bytes, fmt: str, options: DecodeOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """PNG / JPEG (8 or 16 bit, gray, palette, RGB(A)) -> [0,1] gray, checked against the bomb limit.

    With `options.reduced`, a JPEG is decoded through libjpeg's DCT scaling (`draft`) and
    any raster is then box-averaged, never below the floors on the shorter side.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        cols, rows = image.size
        if rows * cols > options.max_pixels:
            raise DecodeError(
                f"image too large: {rows}x{cols} pixels exceeds the limit of {options.max_pixels} "
                "(decompression bomb guard)"
            )
        floors = options.reduced
        if fmt == "jpeg" and floors is not None:
            scale = dct_scale(rows, cols, floors.dct)
            image.draft(image.mode, (cols // scale, rows // scale))
        drafted = round(cols / image.size[0])
        mode = image.mode
        image, binned = shrink_raster(ImageOps.exif_transpose(image), None if floors is None else floors.binning)
        gray = _raster_to_unit(image)
    decoder = "pillow" + (f" draft=1/{drafted}" if drafted > 1 else "") + (f"+bin{binned}" if binned > 1 else "")
    meta = {
        "format": fmt, "rows": rows, "cols": cols, "frames": 1, "frame_index": 0, "photometric": mode,
        "decode_reduce": drafted * binned, "decoder": decoder,
    }
    return gray, meta


def decode_bytes(
    data: bytes,
    relpath: str,
    options: DecodeOptions | None = None,
    salt: str | None = None,
    dataset: Dataset | None = None,
) -> Decoded:
    """Decode one file; never raises. `relpath` is the path relative to the archive root.

    `dataset`: the file's DICOM dataset where a caller has parsed it already (the scope
    check), so that it is not parsed twice; it may be modified.

    A DICOM file that fails to decode keeps what its header said (study/series/SOP UIDs)
    in `meta`, so its error row is counted in its study.
    """
    from lungray.io import dicom  # local import keeps PNG-only users free of pydicom start-up

    options = options or DecodeOptions()
    base_meta: dict[str, Any] = {"study_id": study_from_relpath(relpath)}
    if len(data) == 0:
        return Decoded(None, base_meta, "empty file")
    fmt = sniff_format(data)
    mask = None
    try:
        if fmt in ("dicom", "unknown"):
            image, meta, mask = dicom.decode_dicom(data, options, functools.partial(patient_key, salt=salt), dataset)
        else:
            image, meta = decode_raster(data, fmt, options)
    except DecodeError as exc:
        return Decoded(None, merge_meta(base_meta, {"format": fmt, **exc.meta}), str(exc))
    except MemoryError:
        return Decoded(None, {**base_meta, "format": fmt}, "out of memory while decoding")
    except INTERPRETER_CONTROL:
        raise
    except BaseException as exc:  # noqa: BLE001 - third-party decoders raise (and panic) anything; the file becomes an error row
        return Decoded(None, {**base_meta, "format": fmt}, without_quoted_values(f"{fmt} decode failed: {type(exc).__name__}: {exc}"))
    meta = merge_meta(base_meta, meta)
    if image.ndim != 2 or image.size == 0:
        return Decoded(None, meta, f"decoded to an unusable shape {image.shape}")
    if not np.isfinite(image).all():
        return Decoded(None, meta, "decoded image contains NaN or infinity")
    image = image.astype(np.float32, copy=not image.flags.writeable)  # decoders return fresh arrays: clip in place
    return Decoded(np.clip(image, 0.0, 1.0, out=image), meta, mask=mask)


def merge_meta(base_meta: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The decoder's metadata over the path-derived defaults, except where the decoder found nothing."""
    return {**base_meta, **{k: v for k, v in meta.items() if v is not None or k not in base_meta}}
