"""Reduced-resolution decoding (lungray.io.codecs): what the model sees changes by interpolation noise only.

The oracle for every storage is the full-resolution path (pydicom's `pixel_array` or
Pillow's full decode, then the same preprocessing); for stored values, pydicom's full
decode box-averaged by numpy; for which JPEG 2000 levels Pillow refuses, Pillow itself; for the LL band's shift onto the box grid,
scipy.ndimage.shift.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from film_factory import STORAGES, film_dataset, stored_as, synthetic_film
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000, JPEG2000Lossless
from scipy import ndimage

from lungray.io import codecs
from lungray.io.base import ReducedDecode, bin_step, dct_scale
from lungray.io.decode import DecodeOptions, decode_bytes
from lungray.io.rows import process_file
from lungray.preprocess import PreprocessConfig, preprocess

CONFIG = PreprocessConfig(size=224)
# Tensor differences against the full-resolution path, in levels of 255. The area resize is
# exact, so a binned or DCT-scaled film differs from its full decode only where a block's mean
# was rounded to an integer; a J2K LL band is another low-pass than a box. (Pillow's BOX filter,
# decoder version 5's, gave a mean of 0.6-0.7 and a 99th percentile of 2-3 on these films.)
# The bar is model probabilities within 0.02, which needs trained models
# (bench/reduced_decode_probs.py; the untrained one of tests/model_factory.py gives
# 0.5084 +- 0.00003 for a black, a white and a noise image).
MEAN_LEVELS, P99_LEVELS = 0.5, 2.0
EXPECTED_DECODER = {
    "j2k_lossless": "pillow-openjpeg reduce=1",
    "jpeg_baseline": "pillow-libjpeg draft=1/2",
    "jpeg_file": "pillow draft=1/2",
    "png16": "pillow+bin2",
}


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, bytes]]:
    """One 2048 px 12-bit film in every storage, written once for the module."""
    root = tmp_path_factory.mktemp("films")
    pixels = synthetic_film(2048)
    out = {}
    for storage, suffix in STORAGES.items():
        data = stored_as(pixels, storage)
        path = root / f"{storage}{suffix}"
        path.write_bytes(data)
        out[storage] = (str(path), data)
    return out


def full_resolution(data: bytes) -> np.ndarray:
    decoded = decode_bytes(data, "film", DecodeOptions())  # reduced None: the full resolution
    assert decoded.ok, decoded.error
    assert decoded.meta["decode_reduce"] == 1
    return preprocess(decoded.image, CONFIG)


def reduced_row(path: str, data: bytes) -> tuple[dict, np.ndarray]:
    row, tensor = process_file(path, path.rsplit("/", 1)[-1], len(data), CONFIG, DecodeOptions(), 1 << 30, scope=None, salt=None)
    assert row["status"] == "ok", row["error"]
    return row, tensor


def assert_interpolation_noise(reduced: np.ndarray, full: np.ndarray) -> None:
    difference = np.abs(reduced.astype(np.int32) - full.astype(np.int32))
    assert difference.mean() <= MEAN_LEVELS and np.percentile(difference, 99) <= P99_LEVELS, (
        difference.mean(),
        np.percentile(difference, 99),
    )


@pytest.mark.parametrize("storage", list(STORAGES))
def test_reduced_decode_matches_full_resolution(films, storage: str) -> None:
    path, data = films[storage]
    row, reduced = reduced_row(path, data)
    assert (row["rows"], row["cols"]) == (2048, 2048)  # the original size, not the decoded one
    assert row["decode_reduce"] == 2  # 2048 -> 1024, the largest power of two down to >= 4 x 224
    assert row["decoder"] == EXPECTED_DECODER.get(storage, "pydicom+bin2")
    full = full_resolution(data)
    assert_interpolation_noise(reduced, full)


@pytest.mark.parametrize("storage", ["uncompressed", "j2k_lossless", "jpeg_baseline"])
def test_a_film_with_pixel_padding_is_decoded_in_full(films, storage: str, tmp_path) -> None:
    """Padding is matched on stored values, pixel by pixel; a reduced sample at the padding's
    edge (a bin, a J2K band sample, a scaled DCT block) would mix padding and tissue into a value
    that is neither. The oracle: the full-resolution decode, tensor for tensor."""
    ds = pydicom.dcmread(io.BytesIO(films[storage][1]))
    pixels = pixel_array(ds)
    ds.add_new("PixelPaddingValue", "US", int(pixels.min()))  # the darkest stored value, as a collimator edge would be
    ds.save_as(tmp_path / "padded.dcm")
    padded = (tmp_path / "padded.dcm").read_bytes()
    row, reduced = reduced_row(str(tmp_path / "padded.dcm"), padded)
    assert (row["decoder"], row["decode_reduce"]) == ("pydicom", 1)
    decoded = decode_bytes(padded, "film", DecodeOptions())
    assert decoded.mask is not None and not decoded.mask.all()
    np.testing.assert_array_equal(reduced, preprocess(decoded.image, CONFIG, decoded.mask))


@pytest.mark.parametrize(("header", "dtype"), [({"PixelRepresentation": 1}, np.int8), ({"BitsStored": 6, "HighBit": 5}, np.uint8)])
def test_an_8_bit_jpeg_that_pydicom_corrects_is_decoded_in_full(films, header: dict, dtype: type) -> None:
    """Pillow's scaled decode returns unsigned samples of all 8 bits; pydicom's full decode of a
    signed film gives signed ones, and of a film of Bits Stored 6 masks the two bits above (the
    scaled decode's samples then differed by up to 0.85 at 64 px). So pydicom's full decode is
    taken and binned (the oracle: that full decode, box-averaged)."""
    ds = pydicom.dcmread(io.BytesIO(films["jpeg_baseline"][1]))
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    pixels = codecs.read_stored_pixels(ds, 0, DecodeOptions(reduced=ReducedDecode(wavelet=896, dct=896, binning=896)))
    full = codecs.full_decode(ds, 0)
    assert pixels.decoder == "pydicom+bin2" and pixels.values.dtype == full.dtype == dtype
    assert np.abs(pixels.values - box_mean(full, 2)).max() <= 0.5


def box_mean(values: np.ndarray, factor: int) -> np.ndarray:
    rows, cols = values.shape
    trimmed = values[: rows - rows % factor, : cols - cols % factor].astype(np.float64)
    return trimmed.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int32, np.uint32])
@pytest.mark.parametrize("step", [2, 3, 4])
def test_binning_rounds_the_block_mean_of_stored_values(dtype: type, step: int) -> None:
    """codecs.box_mean against numpy's float mean of the blocks: in the stored dtype, rounded to a
    nearest integer (either one at a tie)."""
    info = np.iinfo(dtype)
    values = np.random.default_rng(step).integers(max(info.min, -2048), min(info.max, 4095), (61, 47)).astype(dtype)
    binned = codecs.box_mean(values, step)
    assert binned.dtype == dtype and binned.shape == (61 // step, 47 // step)
    assert np.abs(binned - box_mean(values, step)).max() <= 0.5


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int32])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_ll_band_is_shifted_as_scipy_shifts_it(dtype: type, level: int) -> None:
    """codecs.onto_box_grid against scipy.ndimage.shift (linear, edges held) by (1 - 2^-level) / 2,
    rounded to a nearest integer."""
    info = np.iinfo(dtype)
    values = np.random.default_rng(level).integers(max(info.min, -2048), min(info.max, 4095), (37, 53)).astype(dtype)
    fraction = (1 - 2.0**-level) / 2
    expected = ndimage.shift(values.astype(np.float64), (-fraction, -fraction), order=1, mode="nearest")
    shifted = codecs.onto_box_grid(values, level, (37 << level, 53 << level))
    assert shifted.dtype == dtype and np.abs(shifted - expected).max() <= 0.5


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32])
@pytest.mark.parametrize(("film_shape", "level"), [((145, 211), 1), ((293, 423), 2), ((585, 843), 3)])
def test_ll_band_of_a_side_the_level_does_not_divide_tiles_the_film(dtype: type, film_shape: tuple, level: int) -> None:
    """codecs.onto_box_grid against scipy.ndimage.map_coordinates (linear, edges held) at the
    positions its docstring gives: grid sample i of n over a side s is read from the band at
    ((i + 1/2) s / n - 1/2) / 2^level; rounded to a nearest integer."""
    info = np.iinfo(dtype)
    band_shape = tuple(-(-side // (1 << level)) for side in film_shape)
    values = np.random.default_rng(level).integers(max(info.min, -2048), min(info.max, 4095), band_shape).astype(dtype)
    axes = [((np.arange(n) + 0.5) * side / n - 0.5) / (1 << level) for side, n in zip(film_shape, band_shape)]
    positions = np.meshgrid(*axes, indexing="ij")
    expected = ndimage.map_coordinates(values.astype(np.float64), positions, order=1, mode="nearest")
    resampled = codecs.onto_box_grid(values, level, film_shape)
    assert resampled.dtype == dtype and np.abs(resampled - expected).max() <= 0.501  # OpenCV's fixed-point weights: 1e-4 more


def test_j2k_levels_keep_stored_depth_and_sign() -> None:
    """Signed 12-bit J2K: the reduced values are int16 stored values, near pydicom's full decode averaged."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:512, 0:512]
    signed = np.clip(np.rint(1500 * np.sin(xx / 40.0) * np.cos(yy / 55.0) + rng.normal(0, 20, (512, 512))), -2048, 2047)
    signed = signed.astype(np.int16)
    ds = film_dataset(signed.view(np.uint16), bits=12)
    ds.PixelRepresentation = 1
    ds.compress(JPEG2000Lossless, signed)
    ds = pydicom.dcmread(io.BytesIO(_file_bytes(ds)))
    pixels = codecs.read_stored_pixels(ds, 0, DecodeOptions(reduced=ReducedDecode(wavelet=128, dct=128, binning=128)))
    assert pixels.decoder == "pillow-openjpeg reduce=2" and pixels.reduce == 4
    assert pixels.values.dtype == np.int16 and pixels.values.shape == (128, 128)
    oracle = box_mean(pixel_array(ds), 4)
    # The LL band is another low-pass than a box, centred up to 1.5 source pixels away: close, not equal.
    assert np.abs(pixels.values - oracle).mean() < 0.02 * np.ptp(oracle)
    assert pixels.values.min() < -1000 and pixels.values.max() > 1000  # sign kept, not offset or shifted


def intensity_centroid(tensor: np.ndarray) -> np.ndarray:
    """(row, col) centre of mass of what stands above the image's median."""
    above = np.clip(tensor.astype(np.float64) - np.median(tensor), 0, None)
    rows, cols = np.mgrid[0 : tensor.shape[0], 0 : tensor.shape[1]]
    return np.array([(above * rows).sum(), (above * cols).sum()]) / above.sum()


@pytest.mark.parametrize(("size", "level"), [(112, 1), (56, 2)])
def test_j2k_levels_put_the_film_where_binning_does(tmp_path, size: int, level: int) -> None:
    """A blob's centre at the model's input, through a reduced J2K decode and through binning
    of the same stored values (whose blocks are exact), each against a full decode.

    Uncorrected, an LL band puts it (2^r - 1) / 2 full-size pixels off: 0.055 and 0.082 of an
    output pixel here, where the two paths now agree within about 0.002.
    """
    yy, xx = np.mgrid[0:1024, 0:1024]
    film = (200 + 3000 * np.exp(-((yy - 450.3) ** 2 + (xx - 550.7) ** 2) / (2 * 30.0**2))).astype(np.uint16)
    config = PreprocessConfig(size=size)
    shifts = {}
    storage = "j2k_lossless"
    for stored in (storage, "uncompressed"):
        path = tmp_path / f"{stored}.dcm"
        path.write_bytes(stored_as(film, stored))
        full = decode_bytes(path.read_bytes(), path.name, DecodeOptions())
        row, reduced = process_file(str(path), path.name, path.stat().st_size, config, DecodeOptions(), 1 << 30, scope=None, salt=None)
        assert row["decoder"] == (f"pillow-openjpeg reduce={level}" if stored == storage else f"pydicom+bin{1 << level}")
        shifts[stored] = intensity_centroid(reduced) - intensity_centroid(preprocess(full.image, config, full.mask))
    assert np.abs(shifts[storage] - shifts["uncompressed"]).max() < 0.005


def test_j2k_levels_of_an_odd_sized_film_keep_its_geometry(tmp_path) -> None:
    """A 1023 x 1021 film: its level-1 band has 512 x 511 samples, the last of each reaching past
    the film. A blob near the far corner, through the reduced decode and through a full one:
    the same centre at the model's input (a band taken as is puts it 0.09 of a pixel off)."""
    yy, xx = np.mgrid[0:1023, 0:1021]
    film = (200 + 3000 * np.exp(-((yy - 900.3) ** 2 + (xx - 880.7) ** 2) / (2 * 30.0**2))).astype(np.uint16)
    path = tmp_path / "odd.dcm"
    path.write_bytes(stored_as(film, "j2k_lossless"))
    config = PreprocessConfig(size=112)
    row, reduced = process_file(str(path), path.name, path.stat().st_size, config, DecodeOptions(), 1 << 30, scope=None, salt=None)
    assert row["decoder"] == "pillow-openjpeg reduce=1"
    full = decode_bytes(path.read_bytes(), path.name, DecodeOptions())
    shift = intensity_centroid(reduced) - intensity_centroid(preprocess(full.image, config, full.mask))
    assert np.abs(shift).max() < 0.01, shift


@pytest.mark.parametrize(
    ("rows", "cols", "floor", "scale"),
    [(2048, 2048, 896, 2), (2048, 2048, 448, 4), (4096, 4096, 448, 8), (1024, 1024, 896, 1), (2046, 2048, 896, 2), (2047, 2048, 896, 1)],
)
def test_dct_scales_divide_both_sides(rows: int, cols: int, floor: int, scale: int) -> None:
    """libjpeg's last scaled sample of a side the scale does not divide reaches past the film."""
    assert dct_scale(rows, cols, floor) == scale


def test_jpeg_of_an_odd_sized_film_is_decoded_in_full(tmp_path) -> None:
    film = synthetic_film(2047)
    for storage in ("jpeg_baseline", "jpeg_file"):
        path = tmp_path / f"odd{STORAGES[storage]}"
        path.write_bytes(stored_as(film, storage))
        row, _ = process_file(str(path), path.name, path.stat().st_size, CONFIG, DecodeOptions(), 1 << 30, scope=None, salt=None)
        assert row["status"] == "ok" and row["decode_reduce"] == 1, row


def _file_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_level_pillow_refuses_is_decoded_at_openjpegs_size_on_the_real_j2k_film() -> None:
    """RG1_J2KR (1955x1841): Pillow's own `reduce = 2` refuses it (it rounds 1841 / 4 to 460
    where OpenJPEG's level has 461 columns); lungray's decode gets the level at OpenJPEG's size,
    and its values are the film's, as pydicom's full decode box-averaged by 4 gives them."""
    path = get_testdata_file("RG1_J2KR.dcm")
    ds = pydicom.dcmread(path)
    image = Image.open(io.BytesIO(get_frame(ds.PixelData, 0, number_of_frames=1)))
    image.reduce = 2
    with pytest.raises(OSError):
        image.load()
    pixels = codecs.read_stored_pixels(ds, 0, DecodeOptions(reduced=ReducedDecode(wavelet=448, dct=448, binning=448)))
    assert pixels.decoder == "pillow-openjpeg reduce=2" and pixels.values.shape == (489, 461)
    oracle = box_mean(pixel_array(ds), 4)  # 488 x 460: the last, partial blocks dropped
    assert np.abs(pixels.values[:488, :460] - oracle).mean() < 0.005 * np.ptp(oracle)
    data = open(path, "rb").read()
    row, reduced = reduced_row(path, data)  # the rows' floor, 4 x 224, stops at level 1
    assert row["decoder"] == "pillow-openjpeg reduce=1" and (row["rows"], row["cols"]) == (1955, 1841)
    assert_interpolation_noise(reduced, full_resolution(data))


@pytest.mark.parametrize(
    ("rows", "cols", "floor", "step"),
    [(2048, 2048, 896, 2), (2048, 2048, 448, 4), (2800, 2800, 896, 2), (3072, 3072, 896, 3), (978, 921, 448, 1), (800, 800, 896, 1)],
)
def test_binning_steps_divide_both_sides(rows: int, cols: int, floor: int, step: int) -> None:
    """A step that leaves a remainder would crop the film (2800 / 3), which moves probabilities."""
    assert bin_step(rows, cols, floor) == step


def test_failed_reduced_decode_falls_back_to_the_full_decode(films, monkeypatch) -> None:
    path, data = films["j2k_lossless"]

    def refuse(*args: object) -> None:
        raise RuntimeError("codec refused")

    monkeypatch.setattr(codecs, "decode_j2k_reduced", refuse)
    row, tensor = reduced_row(path, data)
    assert row["decoder"] == "pydicom+bin2 (reduced decode failed: RuntimeError)"
    assert_interpolation_noise(tensor, full_resolution(data))


@pytest.mark.parametrize("film", ["RG1", "RG3", "MR2", "US1"])
def test_j2k_wavelet_is_read_from_the_codestream(film: str) -> None:
    """The NEMA WG04 compression set names each J2K file by its wavelet: _J2KR reversible 5/3
    (in the lossless-only syntax), _J2KI irreversible 9/7 (in the JPEG 2000 syntax, which
    allows either)."""
    for suffix, reversible in (("J2KR", True), ("J2KI", False)):
        ds = pydicom.dcmread(get_testdata_file(f"{film}_{suffix}.dcm"))
        parameters = codecs.j2k_parameters(get_frame(ds.PixelData, 0, number_of_frames=1))
        assert parameters.reversible is reversible
        assert (parameters.rows, parameters.cols, parameters.components) == (ds.Rows, ds.Columns, ds.SamplesPerPixel)


def test_the_bomb_guard_reads_the_j2k_codestreams_own_size(monkeypatch) -> None:
    """A header that says 100x100 over RG3_J2KR's 1760x1760 codestream: refused by the size the
    codestream declares, before any decoder runs (one that ran would fail the test's way)."""
    ds = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"))
    ds.Rows = ds.Columns = 100
    data = io.BytesIO()
    ds.save_as(data)

    def decoded(*args, **kwargs):
        raise AssertionError("a decoder ran")

    monkeypatch.setattr(codecs, "pixel_array", decoded)
    monkeypatch.setattr(codecs, "pillow_j2k_reduced", decoded)
    for reduced in (None, ReducedDecode(wavelet=896, dct=896, binning=896)):
        result = decode_bytes(data.getvalue(), "film", DecodeOptions(max_pixels=20_000, reduced=reduced))
        assert result.error == (
            "image too large: the JPEG 2000 codestream is 1760x1760 x 1 components (the header says 100x100), "
            "which exceeds the limit of 20000 pixels (decompression bomb guard)"
        )
        assert result.meta["study_id"] == ds.StudyInstanceUID


def test_j2k_main_header_is_walked_segment_by_segment() -> None:
    """A comment (COM) segment after the SIZ whose text holds the bytes of a reversible COD: the
    parser reads the real COD after it (RG1_J2KI's 9/7), where a byte search would stop at the
    comment's copy."""
    ds = pydicom.dcmread(get_testdata_file("RG1_J2KI.dcm"))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    siz = frame.find(b"\xff\x4f\xff\x51") + 2
    after_siz = siz + 2 + struct.unpack(">H", frame[siz + 2 : siz + 4])[0]
    reversible_cod = b"\xff\x52\x00\x0c" + bytes([0, 0, 0, 1, 0, 5, 4, 4, 0, 1])
    comment = b"\xff\x64" + struct.pack(">H", 4 + len(reversible_cod)) + b"\x00\x01" + reversible_cod
    spoofed = frame[:after_siz] + comment + frame[after_siz:]
    assert codecs.j2k_parameters(spoofed) == codecs.j2k_parameters(frame)
    assert not codecs.j2k_parameters(spoofed).reversible


def test_irreversible_j2k_is_decoded_in_full_and_reversible_reduced_in_either_syntax(films) -> None:
    """A 9/7 codestream's LL band is not the film's box average (its probabilities moved 0.03 where
    the full decode's stayed within 0.004 of the film's before compression), so it is decoded in
    full and binned: pydicom's full decode, box-averaged, is the oracle. A 5/3 codestream in
    the JPEG 2000 syntax (which allows lossy and lossless) is reduced as in the lossless one."""
    floors = ReducedDecode(wavelet=896, dct=896, binning=896)
    lossy = pydicom.dcmread(io.BytesIO(films["j2k_lossy"][1]))
    assert not codecs.j2k_parameters(get_frame(lossy.PixelData, 0, number_of_frames=1)).reversible
    pixels = codecs.read_stored_pixels(lossy, 0, DecodeOptions(reduced=floors))
    assert pixels.decoder == "pydicom+bin2" and pixels.reduce == 2
    assert np.abs(pixels.values - box_mean(pixel_array(lossy), 2)).max() <= 0.5

    lossless = pydicom.dcmread(io.BytesIO(films["j2k_lossless"][1]))
    lossless.file_meta.TransferSyntaxUID = JPEG2000
    pixels = codecs.read_stored_pixels(lossless, 0, DecodeOptions(reduced=floors))
    assert pixels.decoder == "pillow-openjpeg reduce=1" and pixels.reduce == 2


def _with_the_97_wavelet_overriding_a_53_cod(frame: bytes, where: str) -> bytes:
    """A 9/7 codestream whose main COD is relabelled 5/3 while a segment that overrides it (T.800
    A.6) restores 9/7: a COC of component 0 after the COD ("coc"), or a COD in the first
    tile-part header ("tile"), its Psot grown to match. The same image to a conforming decoder."""
    siz = frame.find(b"\xff\x4f\xff\x51") + 2
    cod = siz
    while frame[cod : cod + 2] != b"\xff\x52":
        cod += 2 + struct.unpack(">H", frame[cod + 2 : cod + 4])[0]
    cod_length = struct.unpack(">H", frame[cod + 2 : cod + 4])[0]
    cod_end = cod + 2 + cod_length
    assert frame[cod + 13] == 0  # the 9/7 wavelet
    relabelled = frame[: cod + 13] + b"\x01" + frame[cod + 14 :]
    if where == "coc":  # Ccoc (component 0), Scoc (the COD's precinct flag), then the COD's SPcod
        spcoc = frame[cod + 9 : cod_end]
        coc = b"\xff\x53" + struct.pack(">H", 4 + len(spcoc)) + b"\x00" + bytes([frame[cod + 4] & 1]) + spcoc
        return relabelled[:cod_end] + coc + relabelled[cod_end:]
    sot = relabelled.index(b"\xff\x90", cod_end)
    tile_cod = frame[cod:cod_end]
    psot = struct.unpack(">I", relabelled[sot + 6 : sot + 10])[0] + len(tile_cod)
    return relabelled[: sot + 6] + struct.pack(">I", psot) + relabelled[sot + 10 : sot + 12] + tile_cod + relabelled[sot + 12 :]


@pytest.mark.parametrize("where", ["coc", "tile"])
def test_a_97_wavelet_set_by_coc_or_tile_part_cod_is_decoded_in_full(films, where: str) -> None:
    """The main COD is not the last word on the wavelet: a COC or a tile-part COD overrides it.
    Pillow's OpenJPEG decodes the spliced codestream to the original's pixels (the oracle that
    it still means 9/7); lungray then decodes it in full, as any 9/7 film (its LL band is
    another low-pass than the box), where reading the main COD alone took the level-1 band."""
    lossy = pydicom.dcmread(io.BytesIO(films["j2k_lossy"][1]))
    frame = get_frame(lossy.PixelData, 0, number_of_frames=1)
    spliced = _with_the_97_wavelet_overriding_a_53_cod(frame, where)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(spliced))), np.asarray(Image.open(io.BytesIO(frame))))
    assert codecs.j2k_parameters(spliced).reversible is False
    lossy.PixelData = encapsulate([spliced])
    pixels = codecs.read_stored_pixels(lossy, 0, DecodeOptions(reduced=ReducedDecode(wavelet=896, dct=896, binning=896)))
    assert pixels.decoder == "pydicom+bin2" and pixels.reduce == 2
    assert np.abs(pixels.values - box_mean(pixel_array(lossy), 2)).max() <= 0.5


def test_j2k_levels_are_the_fewest_any_coding_style_sets() -> None:
    """RG3_J2KR's 5 levels, with a COC of component 0 that sets 1: reduced by no more than one level."""
    frame = get_frame(pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm")).PixelData, 0, number_of_frames=1)
    cod = frame.index(b"\xff\x52")
    cod_end = cod + 2 + struct.unpack(">H", frame[cod + 2 : cod + 4])[0]
    spcoc = bytes([1]) + frame[cod + 10 : cod_end]
    coc = b"\xff\x53" + struct.pack(">H", 4 + len(spcoc)) + b"\x00" + bytes([frame[cod + 4] & 1]) + spcoc
    parameters = codecs.j2k_parameters(frame[:cod_end] + coc + frame[cod_end:])
    assert (codecs.j2k_parameters(frame).levels, parameters.levels, parameters.reversible) == (5, 1, True)


def test_a_j2k_tile_part_that_ends_inside_its_header_is_refused() -> None:
    """A Psot that ends the tile-part at its own SOD (RG3_J2KR has no tile-part header segments) would
    walk back to that SOD for ever."""
    frame = get_frame(pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm")).PixelData, 0, number_of_frames=1)
    sot = frame.index(b"\xff\x90", frame.index(b"\xff\x52"))
    looping = frame[: sot + 6] + struct.pack(">I", 12) + frame[sot + 10 :]
    with pytest.raises(ValueError, match="ends inside its own header"):
        codecs.j2k_parameters(looping)


def test_multi_frame_j2k_decodes_the_chosen_frame() -> None:
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:256, 0:256]
    base = 800 + 600 * np.sin(xx / 40.0) * np.cos(yy / 55.0)
    frames = np.stack([np.rint(base + 1000 * index + rng.normal(0, 10, base.shape)) for index in range(3)]).astype(np.uint16)
    ds = film_dataset(frames[0], bits=12)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.compress(JPEG2000Lossless, frames)
    ds = pydicom.dcmread(io.BytesIO(_file_bytes(ds)))
    pixels = codecs.read_stored_pixels(ds, 1, DecodeOptions(reduced=ReducedDecode(wavelet=64, dct=64, binning=64)))
    assert pixels.decoder == "pillow-openjpeg reduce=2" and pixels.values.shape == (64, 64)
    oracle = box_mean(pixel_array(ds, index=1), 4)
    assert np.abs(pixels.values - oracle).mean() < 50  # frames 0 and 2 are 1000 away
