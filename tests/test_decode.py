"""The one decode path: real chest DICOMs, encoding equivalence, odd DICOM, and bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES
from dicom_factory import dicom_bytes, dicom_dataset, png_bytes, png_header_only, with_patient_id_as_ul
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from lungray.io.decode import DecodeOptions, decode_bytes, patient_key

DICOM_SAMPLES = SAMPLES / "dicom"
REAL_DICOMS = sorted(DICOM_SAMPLES.glob("*.dcm"))


def decode_file(path: Path, **options: object):
    return decode_bytes(path.read_bytes(), path.name, DecodeOptions(**options))


def lung_vs_mediastinum(image: np.ndarray) -> tuple[float, float]:
    """Mean brightness of the two lung fields and of the central mediastinum (PA chest geometry)."""
    rows, cols = image.shape
    band = image[int(rows * 0.30) : int(rows * 0.60)]
    lungs = np.concatenate([band[:, int(cols * 0.15) : int(cols * 0.35)], band[:, int(cols * 0.65) : int(cols * 0.85)]], axis=1)
    mediastinum = band[:, int(cols * 0.45) : int(cols * 0.55)]
    return float(lungs.mean()), float(mediastinum.mean())


@pytest.mark.parametrize("path", REAL_DICOMS, ids=lambda p: p.name[:24])
def test_real_chest_dicoms_decode_with_bone_white_polarity(path: Path) -> None:
    decoded = decode_file(path)
    assert decoded.ok, decoded.error
    image = decoded.image
    assert image.dtype == np.float32 and image.ndim == 2
    assert 0.0 <= image.min() and image.max() <= 1.0
    lungs, mediastinum = lung_vs_mediastinum(image)
    # Air-filled lungs are dark and the mediastinum bright, MONOCHROME1 or 2 alike.
    assert lungs + 0.1 < mediastinum, (decoded.meta["photometric"], lungs, mediastinum)


def test_monochrome1_sample_is_inverted_and_has_no_preamble() -> None:
    path = DICOM_SAMPLES / "CR-MONO1-10-chest.dcm"
    assert path.read_bytes()[128:132] != b"DICM"
    mono1 = decode_file(path)
    assert mono1.meta["photometric"] == "MONOCHROME1"
    relabelled = pydicom.dcmread(path, force=True)
    relabelled.PhotometricInterpretation = "MONOCHROME2"
    buffer = io.BytesIO()
    relabelled.save_as(buffer, implicit_vr=True, little_endian=True)
    mono2 = decode_bytes(buffer.getvalue(), "relabelled.dcm")
    np.testing.assert_allclose(mono1.image, 1.0 - mono2.image, atol=1e-6)


def test_real_dicom_metadata_fields() -> None:
    path = DICOM_SAMPLES / "pydicom_RG1_J2KI.dcm"
    decoded = decode_file(path)
    header = pydicom.dcmread(path)
    meta = decoded.meta
    assert meta["study_id"] == header.StudyInstanceUID
    assert meta["sop_uid"] == header.SOPInstanceUID
    assert meta["series_uid"] == header.SeriesInstanceUID
    assert (meta["rows"], meta["cols"]) == (1955, 1841)
    assert meta["modality"] == "CR"
    assert meta["transfer_syntax"] == "1.2.840.10008.1.2.4.91"
    assert decoded.image.shape == (1955, 1841)


def test_voi_is_switchable() -> None:
    path = DICOM_SAMPLES / "CR-MONO1-10-chest.dcm"
    with_voi, without_voi = decode_file(path), decode_file(path, apply_voi=False)
    assert with_voi.meta["voi"] and without_voi.meta["voi"] is None
    # Without VOI the 10-bit range scales to [0,1]; with it, the header's 550/1024 LINEAR window
    # (PS3.3 C.11.2.1.2.1) applies before the MONOCHROME1 inversion.
    stored = (1.0 - without_voi.image.astype(np.float64)) * 1023
    expected = 1.0 - np.clip((stored - 549.5) / 1023 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(with_voi.image, expected, atol=1e-5)
    assert not np.allclose(with_voi.image, without_voi.image, atol=1e-3)


# --- one image, many encodings --------------------------------------------------------


@pytest.fixture(scope="module")
def base_image() -> np.ndarray:
    """A real 8-bit chest image from the bundled sample."""
    path = next(iter(sorted((SAMPLES / "kermany-mini" / "NORMAL").glob("*.jpeg"))))
    return np.asarray(Image.open(path).convert("L"), dtype=np.uint8)


def encodings(v: np.ndarray) -> dict[str, bytes]:
    v16 = v.astype(np.uint16)
    mono2 = dicom_dataset(v)
    rle = dicom_dataset(v)
    rle.compress(RLELossless)
    j2k = dicom_dataset(v16 * 257, bits_stored=16)
    j2k.compress(JPEG2000Lossless)
    return {
        "png8": png_bytes(v),
        "png16": png_bytes(v16 * 257),
        "dicom_mono2": dicom_bytes(mono2),
        "dicom_mono2_no_preamble": dicom_bytes(mono2, preamble=False),
        "dicom_mono1_inverted": dicom_bytes(dicom_dataset(255 - v, photometric="MONOCHROME1")),
        "dicom_rescale": dicom_bytes(
            dicom_dataset(v16 * 257, bits_stored=16, RescaleSlope="0.5", RescaleIntercept="-1024")
        ),
        "dicom_voi_window": dicom_bytes(dicom_dataset(v, WindowCenter="128", WindowWidth="256")),
        "dicom_rle": dicom_bytes(rle),
        "dicom_j2k_lossless": dicom_bytes(j2k),
    }


def test_every_encoding_of_one_image_decodes_the_same(base_image: np.ndarray) -> None:
    expected = base_image.astype(np.float32) / 255.0
    for name, data in encodings(base_image).items():
        decoded = decode_bytes(data, f"study/{name}")
        assert decoded.ok, (name, decoded.error)
        assert decoded.image.shape == expected.shape, name
        # within bit-depth rounding: half a step of 16 bits
        np.testing.assert_allclose(decoded.image, expected, atol=1 / 65535 / 2 + 1e-7, err_msg=name)


def test_rgb_and_palette_pngs_become_gray(base_image: np.ndarray) -> None:
    rgb = np.stack([base_image] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full(base_image.shape + (1,), 255, np.uint8)], axis=-1)
    palette = io.BytesIO()
    Image.fromarray(base_image).convert("P").save(palette, format="PNG")
    expected = base_image.astype(np.float32) / 255.0
    for name, data in {"rgb": png_bytes(rgb), "rgba": png_bytes(rgba), "palette": palette.getvalue()}.items():
        decoded = decode_bytes(data, name)
        assert decoded.ok, decoded.error
        tolerance = 1 / 255 + 1e-6 if name != "palette" else 8 / 255  # palettes quantise
        np.testing.assert_allclose(decoded.image, expected, atol=tolerance, err_msg=name)


def test_jpeg_decodes_close_to_source(base_image: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(base_image).save(buffer, format="JPEG", quality=95)
    decoded = decode_bytes(buffer.getvalue(), "a/b.jpg")
    assert decoded.ok and decoded.meta["format"] == "jpeg"
    assert np.abs(decoded.image - base_image / 255.0).mean() < 0.01


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"],
)
def test_transfer_syntaxes_agree_on_pydicom_corpus(name: str) -> None:
    reference = decode_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes(), "MR_small.dcm")
    decoded = decode_bytes(Path(get_testdata_file(name)).read_bytes(), name)
    assert decoded.ok, decoded.error
    np.testing.assert_allclose(decoded.image, reference.image, atol=1e-6)


def test_jpeg_lossless_and_baseline_decode() -> None:
    for name in ("JPEG-LL.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"):
        decoded = decode_bytes(Path(get_testdata_file(name)).read_bytes(), name)
        assert decoded.ok, (name, decoded.error)
        assert decoded.image.ndim == 2 and decoded.image.max() > decoded.image.min()


def test_multiframe_uses_the_chosen_frame() -> None:
    data = Path(get_testdata_file("emri_small.dcm")).read_bytes()
    first = decode_bytes(data, "emri", DecodeOptions(frame="first"))
    middle = decode_bytes(data, "emri", DecodeOptions(frame="middle"))
    assert first.meta["frames"] == 10 and first.meta["frame_index"] == 0
    assert middle.meta["frame_index"] == 5
    assert not np.array_equal(first.image, middle.image)


def test_rgb_dicom_becomes_gray() -> None:
    decoded = decode_bytes(Path(get_testdata_file("SC_rgb.dcm")).read_bytes(), "SC_rgb.dcm")
    assert decoded.ok and decoded.image.ndim == 2


def test_patient_identity_is_hashed_never_raw(base_image: np.ndarray) -> None:
    ds = dicom_dataset(base_image, patient_id="MRN-123456", patient_name="Smith^John")
    decoded = decode_bytes(dicom_bytes(ds), "x.dcm", salt="site-secret")
    assert decoded.meta["patient_key"] == patient_key("MRN-123456", salt="site-secret")
    assert decoded.meta["patient_key"] != patient_key("MRN-123456", salt="another-site")
    flat = repr(decoded.meta)
    assert "MRN-123456" not in flat and "Smith" not in flat


@pytest.mark.parametrize("pixels", ["intact", "truncated"])
def test_a_damaged_patient_id_is_never_quoted_and_the_study_is_kept(pixels: str, base_image: np.ndarray) -> None:
    """pydicom's own message quotes a damaged element's bytes (`received b'DOE^JANE12' ...`). It
    came up outside the scrubbed part of the decoder: the raw ID reached the row's error (under
    --pseudonymize too) and the row lost its study UID."""
    ds = dicom_dataset(base_image, patient_id="DOE^JANE12", patient_name="DOE^JANE")
    data = with_patient_id_as_ul(dicom_bytes(ds))
    with pytest.raises(Exception, match="DOE"):  # the oracle: pydicom itself quotes it
        pydicom.dcmread(io.BytesIO(data)).PatientID
    decoded = decode_bytes(data if pixels == "intact" else data[:-5000], "x.dcm", salt="site-secret")
    assert decoded.ok == (pixels == "intact"), decoded.error
    assert decoded.meta["study_id"] == ds.StudyInstanceUID and decoded.meta["patient_key"] is None
    assert "DOE" not in repr(decoded.meta) + (decoded.error or "") and "JANE" not in (decoded.error or "")


def test_an_unforeseen_decoder_failure_quotes_no_value(base_image: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last line of defence: whatever a decoder raises, the values it quotes stay out of the row."""
    from lungray.io import dicom

    def failing(*args: object) -> None:
        raise ValueError("cannot parse (0010,0010) value b'DOE^JANE' near 'MRN 12345678'")

    monkeypatch.setattr(dicom, "decode_dicom", failing)
    decoded = decode_bytes(dicom_bytes(dicom_dataset(base_image)), "x.dcm")
    assert decoded.error == "dicom decode failed: ValueError: cannot parse (0010,0010) value <value> near <value>"


def test_a_dicom_file_whose_preamble_opens_like_a_jpeg_is_read_as_dicom(base_image: np.ndarray) -> None:
    """The 128-byte preamble is free for applications (PS3.10 7.1); the DICM marker after it decides."""
    data = dicom_bytes(dicom_dataset(base_image))
    for signature in (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n"):
        decoded = decode_bytes(signature + data[len(signature) :], "x.dcm")
        assert decoded.ok and decoded.meta["format"] == "dicom", decoded.error


def test_non_dicom_study_is_the_parent_folder(base_image: np.ndarray) -> None:
    assert decode_bytes(png_bytes(base_image), "site-a/study-7/img.png").meta["study_id"] == "site-a/study-7"
    assert decode_bytes(png_bytes(base_image), "img.png").meta["study_id"] == "."


# --- bad input: an error value each, never an exception ------------------------------


def truncated_dicom(v: np.ndarray) -> bytes:
    return dicom_bytes(dicom_dataset(v))[:-5000]


def unsupported_syntax_dicom(v: np.ndarray) -> bytes:
    ds = dicom_dataset(v)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not an image codec here
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    return dicom_bytes(ds)


def bomb_dicom(v: np.ndarray) -> bytes:
    ds = dicom_dataset(v[:8, :8])
    ds.Rows, ds.Columns = 60000, 60000
    return dicom_bytes(ds)


BAD_INPUTS = {
    "empty": (lambda v: b"", "empty file"),
    "random": (lambda v: np.random.default_rng(0).bytes(4096), "not a"),
    "text": (lambda v: b"patient list\nnothing to see here\n" * 20, "not a"),
    "structured_report": (lambda v: Path(get_testdata_file("test-SR.dcm")).read_bytes(), "no pixel data"),
    "truncated_pixels": (truncated_dicom, "truncated"),
    "unsupported_syntax": (unsupported_syntax_dicom, "transfer syntax"),
    "dicom_bomb": (bomb_dicom, "decompression bomb"),
    "png_bomb": (lambda v: png_header_only(60000, 60000), "decompression bomb"),
    "truncated_png": (lambda v: png_bytes(v)[:300], "png decode failed"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_an_error_value(kind: str, base_image: np.ndarray) -> None:
    make, expected_message = BAD_INPUTS[kind]
    decoded = decode_bytes(make(base_image), f"junk/{kind}")
    assert not decoded.ok and decoded.image is None
    assert expected_message in decoded.error, decoded.error


def test_bomb_is_refused_before_allocation(base_image: np.ndarray) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    decoded = decode_bytes(bomb_dicom(base_image), "bomb.dcm")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert "60000x60000" in decoded.error
    assert (after - before) * 1024 < 100 * 2**20  # 60000^2 x 2 bytes would be 7 GB


def test_bomb_limit_is_configurable(base_image: np.ndarray) -> None:
    data = png_bytes(base_image)
    assert not decode_bytes(data, "x.png", DecodeOptions(max_pixels=100)).ok
    assert decode_bytes(data, "x.png", DecodeOptions(max_pixels=224 * 224)).ok


def test_decoder_never_raises_on_mutated_dicom(base_image: np.ndarray) -> None:
    """Flip random header bytes of a valid file: every outcome is a value, and no error names the patient."""
    data = bytearray(dicom_bytes(dicom_dataset(base_image)))
    rng = np.random.default_rng(1)
    for _ in range(60):
        mutated = bytearray(data)
        for index in rng.integers(0, 400, size=6):
            mutated[index] = int(rng.integers(0, 256))
        decoded = decode_bytes(bytes(mutated), "fuzz.dcm")
        assert decoded.ok or decoded.error
        assert "Doe" not in (decoded.error or "") and "PAT-0001" not in (decoded.error or "")
        if decoded.ok:
            assert decoded.image.min() >= 0.0 and decoded.image.max() <= 1.0
