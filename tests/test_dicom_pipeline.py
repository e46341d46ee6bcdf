"""The DICOM grayscale pipeline, corner by corner, against pydicom's own functions and files.

The oracle is always something lungray does not compute: pydicom's reference files and
`pydicom.pixels` functions applied to pydicom's own `pixel_array`, scaled by the range
the header declares (PS3.3 C.11.2.1.2: the window's output spans the modality output
range), or the same film stored another way.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import dicom_bytes, dicom_dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_presentation_lut, apply_voi, apply_windowing
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from lungray.io.decode import DecodeOptions, decode_bytes
from lungray.io.dicom import lookup
from lungray.preprocess import PreprocessConfig, preprocess

RNG = np.random.default_rng(16)


def reference(name: str) -> tuple[bytes, Dataset]:
    path = Path(get_testdata_file(name))
    return path.read_bytes(), pydicom.dcmread(path)


def film(rows: int = 96, cols: int = 80, bits: int = 12) -> np.ndarray:
    """A smooth 'film' spanning the whole stored range (both ends present) plus noise."""
    y, x = np.mgrid[0:rows, 0:cols]
    values = (np.sin(x / 9.0) * np.cos(y / 13.0) + 1.0) / 2.0 * ((1 << bits) - 1)
    values = np.clip(values + RNG.normal(0, 20, values.shape), 0, (1 << bits) - 1)
    values.flat[0], values.flat[1] = 0, (1 << bits) - 1
    return values.astype(np.uint16)


def lut_item(descriptor: list[int], data: np.ndarray) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)
    item.add_new("LUTData", "US", [int(v) for v in data])
    return item


def decode(ds: Dataset, **options: object):
    return decode_bytes(dicom_bytes(ds), "study/film.dcm", DecodeOptions(**options))


# --- VOI LUT sequence and modality LUT on pydicom's reference files ---------------------


def test_voi_lut_sequence_reference_file() -> None:
    data, ds = reference("vlut_04.dcm")
    decoded = decode_bytes(data, "vlut_04.dcm")
    assert decoded.ok, decoded.error
    assert decoded.meta["voi"] == "voi_lut_sequence"
    bits = ds.VOILUTSequence[0].LUTDescriptor[2]
    expected = apply_voi(ds.pixel_array, ds) / ((1 << bits) - 1)
    np.testing.assert_allclose(decoded.image, expected, atol=1e-6)


def test_voi_lut_sequence_indexes_integer_modality_values() -> None:
    """Rescale slope 0.5 makes half-integer modality values; the LUT is indexed by integers
    (halves up), never by pydicom's truncation of a float array."""
    stored = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    lut = RNG.permutation(np.arange(0, 4096, 2, dtype=np.uint16))  # 2048 entries, no order to hide errors
    ds = dicom_dataset(stored, bits_stored=12, RescaleSlope="0.5", RescaleIntercept="0")
    ds.VOILUTSequence = [lut_item([2048, 0, 12], lut)]
    decoded = decode(ds)
    assert decoded.ok, decoded.error
    modality = apply_modality_lut(stored, ds)
    integers = np.floor(modality + 0.5).astype(np.int64)
    expected = apply_voi(integers, ds) / 4095.0
    np.testing.assert_allclose(decoded.image, expected, atol=1e-6)
    with pytest.warns(UserWarning, match="float input"):
        truncated = apply_voi(modality, ds) / 4095.0
    assert not np.allclose(decoded.image, truncated, atol=1e-3)  # the float lookup would differ


def test_an_8_bit_voi_lut_of_more_than_256_entries_is_read_whole() -> None:
    """A 12-bit film to a display's 8 bits: 4096 entries of 8 bits. pydicom 3.0.2's apply_voi
    computes indices in the entries' uint8, so index i read entry i % 256 (a garbage film). The
    oracle is the standard's lookup (PS3.3 C.11.2.1.2): entry clip(value - first, 0, n - 1)."""
    stored = film(bits=12)
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 255).astype(np.uint16)
    ds = dicom_dataset(stored, bits_stored=12)
    ds.VOILUTSequence = [lut_item([4096, 0, 8], lut)]
    decoded = decode(ds)
    assert decoded.ok, decoded.error
    np.testing.assert_allclose(decoded.image, lut[stored] / 255.0, atol=1e-6)
    assert np.abs(apply_voi(stored, ds) / 255.0 - lut[stored] / 255.0).max() > 0.5  # pydicom's own reading


def test_a_negative_first_mapped_value_read_as_unsigned_is_read_signed() -> None:
    """PS3.3 C.11.2.1.1: the descriptor's first mapped value is SS where modality values can be
    negative. An implicit VR file gives pydicom no VR, so it reads -1024 as US 64512, above every
    modality value: each pixel took the first entry, a black film and no error."""
    stored = film(bits=12)
    lut = np.arange(4096, dtype=np.uint16) * 16
    ds = dicom_dataset(stored, bits_stored=12, RescaleIntercept="-1024", RescaleSlope="1")
    ds.VOILUTSequence = [lut_item([4096, 64512, 16], lut)]  # -1024 as the US a reader sees
    decoded = decode(ds)
    assert decoded.ok, decoded.error
    np.testing.assert_allclose(decoded.image, lut[np.clip(stored.astype(int) - 1024 + 1024, 0, 4095)] / 65535.0, atol=1e-6)


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpegls"])
def test_codestream_values_above_bits_stored_are_windowed_as_pydicom_reads_them(syntax: str) -> None:
    """pydicom leaves JPEG 2000 and JPEG-LS samples at the codestream's precision (here 14 bits)
    where the header says fewer (12): a window set on those values was cut flat at 4095."""
    import imagecodecs

    stored = film(bits=14)
    if syntax == "jpeg2000":
        codestream, uid = imagecodecs.jpeg2k_encode(stored, level=0, codecformat="J2K", reversible=True, bitspersample=14), JPEG2000Lossless
    else:
        codestream, uid = imagecodecs.jpegls_encode(stored, level=0), JPEGLSLossless
    ds = dicom_dataset(stored, bits_stored=12, WindowCenter="8192", WindowWidth="16384")
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    data = dicom_bytes(ds)
    read = pydicom.dcmread(io.BytesIO(data))
    assert read.pixel_array.max() > 4095  # the case: pydicom's values exceed Bits Stored
    lo, hi = apply_windowing(np.array([-np.inf, np.inf]), read)
    expected = (apply_windowing(apply_modality_lut(read.pixel_array, read), read) - lo) / (hi - lo)
    decoded = decode_bytes(data, "x.dcm")
    assert decoded.ok, decoded.error
    np.testing.assert_allclose(decoded.image, expected, atol=1e-6)


def test_float_pixel_data_is_an_error_row_not_a_black_film() -> None:
    """A parametric map has no stored value range (its scale came out 2^32 - 1: a black film) and
    no window pydicom applies (it needs Bits Stored)."""
    ds = dicom_dataset(np.zeros((16, 16), np.uint16))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.linspace(0, 1000, 256, dtype=np.float32).tobytes()
    assert pydicom.dcmread(io.BytesIO(dicom_bytes(ds))).pixel_array.max() == 1000  # pydicom reads it
    decoded = decode(ds)
    assert not decoded.ok and "float pixel data" in decoded.error


def test_a_single_frame_with_excess_pixel_data_is_its_first_frame() -> None:
    """Without Number of Frames, pydicom infers frames from the data's length: asked for no frame
    in particular it returned (2, 64, 64) and the film was an error row."""
    stored = film(64, 64)
    ds = dicom_dataset(stored, bits_stored=12)
    ds.PixelData = stored.tobytes() * 2
    decoded = decode(ds)
    assert decoded.ok, decoded.error
    np.testing.assert_allclose(decoded.image, decode(dicom_dataset(stored, bits_stored=12)).image, atol=0)


def test_a_deflate_bomb_is_refused_before_it_inflates() -> None:
    """pydicom inflates a Deflated Explicit VR dataset whole before any element is read: 0.4 MB of
    zeros in a 400 MB element took 3.6 GB. The reference deflated file still decodes."""
    import resource

    ds = dicom_dataset(np.zeros((8, 8), np.uint16), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.add_new(0x00091010, "OB", bytes(400 << 20))  # a private element: no pixel header guard sees it
    data = dicom_bytes(ds)
    assert len(data) < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    decoded = decode_bytes(data, "bomb.dcm")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert not decoded.ok and "decompression bomb" in decoded.error and grown < 200 << 20
    reference_data, reference_ds = reference("image_dfl.dcm")
    assert reference_ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert decode_bytes(reference_data, "image_dfl.dcm").ok


def test_modality_lut_sequence_reference_file_signed() -> None:
    """mlut_18: signed storage through a Modality LUT Sequence; without VOI the image is a
    positive affine map of pydicom's modality output (the full-range scale)."""
    data, ds = reference("mlut_18.dcm")
    decoded = decode_bytes(data, "mlut_18.dcm")
    assert decoded.ok, decoded.error
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float64).ravel()
    slope, intercept = np.polyfit(modality, decoded.image.ravel().astype(np.float64), 1)
    assert slope > 0
    np.testing.assert_allclose(decoded.image.ravel(), slope * modality + intercept, atol=1e-5)


@pytest.mark.parametrize("name", ["MR2_UNCR.dcm", "RG1_UNCR.dcm"])
def test_window_on_reference_files(name: str) -> None:
    """MR2: non-integer rescale slope then a LINEAR window; RG1: 15-bit MONOCHROME1."""
    data, ds = reference(name)
    decoded = decode_bytes(data, name)
    assert decoded.ok, decoded.error
    arr = ds.pixel_array
    windowed = apply_windowing(apply_modality_lut(arr, ds), ds)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    y_min, y_max = intercept, ((1 << ds.BitsStored) - 1) * slope + intercept  # unsigned storage
    expected = (windowed - y_min) / (y_max - y_min)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(decoded.image, expected, atol=1e-5)


# --- windows: valid ones match pydicom, invalid ones are error rows ----------------------


@pytest.mark.parametrize(
    ("function", "center", "width"),
    [("LINEAR", 2000, 1), ("LINEAR", 1800, 700), ("LINEAR_EXACT", 2000, 0.5), ("SIGMOID", 2100, 900)],
)
def test_valid_windows_match_pydicom(function: str, center: float, width: float) -> None:
    stored = film()
    ds = dicom_dataset(stored, bits_stored=12, WindowCenter=str(center), WindowWidth=str(width), VOILUTFunction=function)
    decoded = decode(ds)
    assert decoded.ok, decoded.error
    expected = apply_windowing(stored, ds) / 4095.0  # unsigned 12 bit, no rescale: output range 0..4095
    np.testing.assert_allclose(decoded.image, expected, atol=1e-6)
    assert decoded.meta["voi"].endswith(function)


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("function", ["LINEAR", "SIGMOID"])
def test_8_bit_windows_match_pydicom(bits: int, function: str) -> None:
    """8-bit storage takes OpenCV's lookup (`lookup`), 6 of 8 bits a table shorter than its 256 entries."""
    stored = film(bits=bits).astype(np.uint8)
    top = (1 << bits) - 1
    ds = dicom_dataset(stored, bits_stored=bits, WindowCenter=str(top * 0.45), WindowWidth=str(top * 0.6), VOILUTFunction=function)
    decoded = decode(ds)
    assert decoded.ok, decoded.error
    np.testing.assert_allclose(decoded.image, apply_windowing(stored, ds) / top, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
@pytest.mark.parametrize("entries", [40, 256, 4096])
def test_lookup_reads_past_the_table_as_its_last_entry(dtype: type, entries: int) -> None:
    table = RNG.random(entries).astype(np.float32)
    indices = RNG.integers(0, 256, (37, 53)).astype(dtype)
    np.testing.assert_array_equal(lookup(table, indices), np.take(table, indices, mode="clip"))


@pytest.mark.parametrize(
    ("function", "width"),
    [("LINEAR", "0.5"), ("LINEAR", "0"), ("LINEAR_EXACT", "0"), ("SIGMOID", "0"), ("SIGMOID", "-400"), ("LINEAR", "NaN"), ("SIGMOID", "NaN")],
)
def test_invalid_windows_are_error_rows(function: str, width: str) -> None:
    ds = dicom_dataset(film(), bits_stored=12, WindowCenter="2000", WindowWidth=width, VOILUTFunction=function)
    decoded = decode(ds)
    assert not decoded.ok and decoded.image is None
    assert "invalid VOI window" in decoded.error and function in decoded.error, decoded.error
    assert decoded.meta["study_id"] == ds.StudyInstanceUID  # still counted in its study


def test_invalid_window_is_ignored_without_voi() -> None:
    ds = dicom_dataset(film(), bits_stored=12, WindowCenter="2000", WindowWidth="-400", VOILUTFunction="SIGMOID")
    assert decode(ds, apply_voi=False).ok


# --- presentation LUT ---------------------------------------------------------------


def test_presentation_lut_shape_inverse_comes_out_like_the_plain_film() -> None:
    plain = film()
    reference_image = decode(dicom_dataset(plain, bits_stored=12)).image
    stored_inverted = (4095 - plain).astype(np.uint16)
    cases = {
        "MONOCHROME2 + INVERSE": dicom_dataset(stored_inverted, bits_stored=12, PresentationLUTShape="INVERSE"),
        # PS3.3 C.8.11.6.1.2: a MONOCHROME1 film carries INVERSE; the two are one inversion.
        "MONOCHROME1 + INVERSE": dicom_dataset(stored_inverted, "MONOCHROME1", bits_stored=12, PresentationLUTShape="INVERSE"),
        "MONOCHROME1": dicom_dataset(stored_inverted, "MONOCHROME1", bits_stored=12),
        "MONOCHROME2 + IDENTITY": dicom_dataset(plain, bits_stored=12, PresentationLUTShape="IDENTITY"),
    }
    for name, ds in cases.items():
        decoded = decode(ds)
        assert decoded.ok, (name, decoded.error)
        np.testing.assert_allclose(decoded.image, reference_image, atol=1e-6, err_msg=name)
    # and the oracle for the shape itself: pydicom's INVERSE on the full-range values
    inverse = cases["MONOCHROME2 + INVERSE"]
    expected = apply_presentation_lut(stored_inverted.astype(np.float64), inverse) / 4095.0
    np.testing.assert_allclose(decode(inverse).image, expected, atol=1e-6)


def test_presentation_lut_sequence_matches_pydicom() -> None:
    stored = film()  # holds 0 and 4095, so pydicom's min/max scaling is the full 12-bit range
    lut = (np.linspace(0, 1, 4096) ** 0.5 * 1023).astype(np.uint16)  # one entry per stored value: no rounding
    ds = dicom_dataset(stored, bits_stored=12, PresentationLUTSequence=[lut_item([4096, 0, 10], lut)])
    decoded = decode(ds)
    assert decoded.ok, decoded.error
    expected = apply_presentation_lut(stored.astype(np.float64), ds) / 1023.0
    np.testing.assert_allclose(decoded.image, expected, atol=1e-6)


def test_unknown_presentation_lut_shape_is_an_error_row() -> None:
    decoded = decode(dicom_dataset(film(), bits_stored=12, PresentationLUTShape="LOG"))
    assert not decoded.ok and "Presentation LUT" in decoded.error


# --- pixel padding ------------------------------------------------------------------


def test_pixel_padding_reference_file_signed() -> None:
    """693_UNCR (pydicom-data): signed CT, Pixel Padding Value -2000 in stored values, a window."""
    data, ds = reference("693_UNCR.dcm")
    decoded = decode_bytes(data, "693_UNCR.dcm")
    assert decoded.ok, decoded.error
    arr = ds.pixel_array
    padding = arr == ds.PixelPaddingValue
    assert padding.sum() > 10_000
    np.testing.assert_array_equal(decoded.mask, ~padding)
    assert (decoded.image[padding] == 0.0).all()
    windowed = apply_windowing(apply_modality_lut(arr, ds), ds)
    y_min = -(1 << (ds.BitsStored - 1)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    y_max = ((1 << (ds.BitsStored - 1)) - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(decoded.image[~padding], ((windowed - y_min) / (y_max - y_min))[~padding], atol=1e-6)


def test_lossless_j2k_twin_of_the_padded_reference_agrees() -> None:
    plain = decode_bytes(*[reference("693_UNCR.dcm")[0], "a.dcm"])
    j2k = decode_bytes(reference("693_J2KR.dcm")[0], "b.dcm")
    assert j2k.ok, j2k.error
    np.testing.assert_array_equal(j2k.mask, plain.mask)
    np.testing.assert_allclose(j2k.image, plain.image, atol=1e-6)


def padded(interior: np.ndarray, border: int, value: int) -> np.ndarray:
    out = np.full((interior.shape[0] + 2 * border, interior.shape[1] + 2 * border), value, dtype=interior.dtype)
    out[border:-border, border:-border] = interior
    return out


def test_monochrome1_padded_with_zero_is_black_like_the_film_with_a_black_border() -> None:
    """The issue's case: a MONOCHROME1 film padded with 0 came out with a white frame."""
    interior = np.clip(film(), 1, 4094)  # a MONOCHROME1 pixel stored as 0 would be padding too
    plain = padded(interior, 8, 0)  # MONOCHROME2, black border as image content
    mono1 = padded((4095 - interior).astype(np.uint16), 8, 0)
    reference_image = decode(dicom_dataset(plain, bits_stored=12)).image
    decoded = decode(dicom_dataset(mono1, "MONOCHROME1", bits_stored=12, PixelPaddingValue=0))
    assert decoded.ok, decoded.error
    np.testing.assert_allclose(decoded.image, reference_image, atol=1e-6)
    np.testing.assert_array_equal(decoded.mask, mono1 != 0)


def test_padding_range_limit_either_order_and_signed() -> None:
    interior = (film().astype(np.int32) - 2048).astype(np.int16)  # signed 12-bit: -2048..2047
    stored = padded(interior, 6, -2048)
    stored[:6, :] = RNG.integers(-2048, -1999, size=(6, stored.shape[1]))  # a noisy padding band
    stored[-6:, :] = -2000
    for value, limit in ((-2048, -2000), (-2000, -2048)):
        ds = dicom_dataset(stored, bits_stored=12, PixelPaddingValue=value, PixelPaddingRangeLimit=limit)
        ds["PixelPaddingValue"].VR = ds["PixelPaddingRangeLimit"].VR = "SS"
        decoded = decode(ds)
        assert decoded.ok, decoded.error
        expected_padding = (stored >= -2048) & (stored <= -2000)
        np.testing.assert_array_equal(decoded.mask, ~expected_padding)
        assert (decoded.image[expected_padding] == 0).all()
        # the rest: full signed 12-bit range (no VOI) -> [0,1]
        np.testing.assert_allclose(decoded.image[~expected_padding], ((stored + 2048) / 4095.0)[~expected_padding], atol=1e-6)


def test_padding_is_kept_out_of_the_percentile_stretch() -> None:
    """Oracle: np.percentile over the output pixels that are wholly image."""
    interior = np.clip(film(192, 192), 1, 4095)  # no image pixel equals the padding value
    stored = padded(interior, 16, 0)  # 224 -> 112: the border is 8 output pixels exactly
    decoded = decode(dicom_dataset(stored, bits_stored=12, PixelPaddingValue=0))
    config = PreprocessConfig(size=112, dtype="uint16")
    tensor = preprocess(decoded.image, config, decoded.mask)
    small = decoded.image.reshape(112, 2, 112, 2).mean(axis=(1, 3))  # the area filter at 2x
    lo, hi = np.percentile(small[8:-8, 8:-8], [0.5, 99.5])
    expected = np.clip((small - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(tensor / 65535.0, expected, atol=2e-4)
    assert (tensor[:8] == 0).all() and (tensor[:, -8:] == 0).all()
    # without the mask the black frame would set the low percentile
    assert not np.allclose(preprocess(decoded.image, config) / 65535.0, expected, atol=2e-3)


@pytest.mark.parametrize("aspect", ["squash", "pad"])
def test_a_mask_without_padding_changes_nothing(aspect: str) -> None:
    """Only padding leaves the stretch: the aspect policy's own black borders count as before."""
    image = decode(dicom_dataset(film(96, 64), bits_stored=12)).image
    config = PreprocessConfig(size=32, aspect=aspect)
    np.testing.assert_array_equal(preprocess(image, config, np.ones(image.shape, bool)), preprocess(image, config))


def test_no_padding_value_means_no_mask() -> None:
    decoded = decode(dicom_dataset(film(), bits_stored=12))
    assert decoded.ok and decoded.mask is None


# --- signed storage -----------------------------------------------------------------


def test_signed_storage_decodes_like_its_unsigned_twin() -> None:
    unsigned = film()
    signed = (unsigned.astype(np.int32) - 2048).astype(np.int16)
    a = decode(dicom_dataset(unsigned, bits_stored=12))
    b = decode(dicom_dataset(signed, bits_stored=12))
    assert a.ok and b.ok, (a.error, b.error)
    np.testing.assert_allclose(b.image, a.image, atol=1e-6)
    np.testing.assert_allclose(b.image, unsigned / 4095.0, atol=1e-6)


# --- colour: palette and YBR become luma ---------------------------------------------


def bt601(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_expb.dcm"])
def test_palette_reference_files_become_the_luma_of_pydicom_colour_lut(name: str) -> None:
    data, ds = reference(name)
    decoded = decode_bytes(data, name)
    assert decoded.ok, decoded.error
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    expected = bt601(rgb) / ((1 << ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
    np.testing.assert_allclose(decoded.image, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_ybr_reference_files_agree_with_their_rgb_twin(name: str) -> None:
    """pydicom ships one image as RGB and as YBR; YBR -> RGB conversion rounds by a level or two."""
    rgb = decode_bytes(reference("SC_rgb.dcm")[0], "rgb.dcm")
    ybr = decode_bytes(reference(name)[0], name)
    assert ybr.ok, ybr.error
    assert np.abs(ybr.image - rgb.image).max() <= 3 / 255


# --- failures keep the header's study ------------------------------------------------


def test_failed_decode_keeps_header_uids() -> None:
    ds = dicom_dataset(film(), bits_stored=12)
    decoded = decode_bytes(dicom_bytes(ds)[:-3000], "folder/x.dcm")
    assert not decoded.ok and "truncated" in decoded.error
    assert decoded.meta["study_id"] == ds.StudyInstanceUID
    assert decoded.meta["series_uid"] == ds.SeriesInstanceUID
    assert decoded.meta["sop_uid"] == ds.SOPInstanceUID
    assert "PAT-0001" not in repr(decoded.meta) and "Doe" not in repr(decoded.meta)


def test_failed_decode_row_is_counted_in_its_study(tmp_path: Path) -> None:
    from lungray.io.rows import process_file

    ds = dicom_dataset(film(), bits_stored=12)
    path = tmp_path / "broken.dcm"
    path.write_bytes(dicom_bytes(ds)[:-3000])
    row, tensor = process_file(str(path), "broken.dcm", path.stat().st_size, PreprocessConfig(), DecodeOptions(), 1 << 30, scope=None, salt=None)
    assert tensor is None and row["status"] == "error"
    assert (row["study_id"], row["sop_uid"]) == (ds.StudyInstanceUID, ds.SOPInstanceUID)


def test_a_codec_panic_is_an_error_row(tmp_path: Path) -> None:
    """pylibjpeg-rle (Rust) panics on some damaged streams with a BaseException that is no
    Exception: pydicom's RLE MR with one byte of its stream changed, and with its Columns."""
    from pydicom.encaps import encapsulate, generate_frames

    from lungray.io.rows import process_file

    damaged_stream = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    frame = bytearray(next(generate_frames(damaged_stream.PixelData, number_of_frames=1)))
    frame[5913] = 0x7F
    damaged_stream.PixelData = encapsulate([bytes(frame)])
    wrong_columns = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    wrong_columns.Columns = 7
    for name, ds in (("stream.dcm", damaged_stream), ("columns.dcm", wrong_columns)):
        ds.save_as(tmp_path / name)
        row, tensor = process_file(str(tmp_path / name), name, None, PreprocessConfig(), DecodeOptions(), 1 << 30, scope=None, salt=None)
        assert tensor is None and row["status"] == "error" and "PanicException" in row["error"], row
        assert row["study_id"] == ds.StudyInstanceUID


def test_files_never_read_are_counted_in_their_folders_study(tmp_path: Path) -> None:
    """Over the size limit, or unreadable: no header to say the study, so the folder does
    (a row without a study would be missing from every study's n_errors)."""
    from lungray.io.rows import process_file

    (tmp_path / "P1").mkdir()
    path = tmp_path / "P1" / "big.dcm"
    path.write_bytes(dicom_bytes(dicom_dataset(film(), bits_stored=12)))
    size = path.stat().st_size
    too_large, _ = process_file(str(path), "P1/big.dcm", size, PreprocessConfig(), DecodeOptions(), size - 1, scope=None, salt=None)
    vanished, _ = process_file(str(tmp_path / "P1" / "gone.dcm"), "P1/gone.dcm", 10, PreprocessConfig(), DecodeOptions(), 1 << 30, scope=None, salt=None)
    assert too_large["error"].startswith("file too large") and vanished["error"].startswith("could not read file")
    assert too_large["study_id"] == vanished["study_id"] == "P1"


def test_a_file_whose_size_is_known_only_once_read_is_held_to_the_limit(tmp_path: Path) -> None:
    """A PACS instance has no size before it is retrieved (size None): it was read whole and
    scored whatever its size; the limit now applies to what was read."""
    from lungray.io.rows import process_file

    path = tmp_path / "big.dcm"
    path.write_bytes(dicom_bytes(dicom_dataset(film(), bits_stored=12)))
    size = path.stat().st_size
    row, tensor = process_file(str(path), "big.dcm", None, PreprocessConfig(), DecodeOptions(), size - 1, scope=None, salt=None)
    assert tensor is None and row["error"] == f"file too large: {size} bytes exceeds the limit of {size - 1}"
    row, tensor = process_file(str(path), "big.dcm", None, PreprocessConfig(), DecodeOptions(), size, scope=None, salt=None)
    assert row["status"] == "ok" and tensor is not None


# --- module structure ----------------------------------------------------------------


def test_dicom_decoder_does_not_import_the_dispatcher() -> None:
    """No import cycle: io.dicom and io.decode share io.base, and dicom needs nothing else."""
    code = "import sys, lungray.io.dicom; assert 'lungray.io.decode' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
