"""The scope check: which header values make an object a frontal chest radiograph, and the settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import dicom_bytes, dicom_dataset
from pydicom.data import get_testdata_file

from lungray.io.decode import DecodeOptions
from lungray.io.rows import dicom_header, process_file
from lungray.io.scope import Scope, skip_reason
from lungray.preprocess import PreprocessConfig

CHEST_PA = {"modality": "DX", "body_part": "CHEST", "view_position": "PA"}


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (CHEST_PA, None),
        ({**CHEST_PA, "modality": "CR", "view_position": "AP"}, None),
        ({**CHEST_PA, "body_part": None}, None),  # many CR/DX films leave BodyPartExamined empty
        ({**CHEST_PA, "view_position": ""}, None),
        ({}, None),  # PNG / JPEG: no header, in scope
        ({**CHEST_PA, "body_part": "thorax "}, None),  # values compared as DICOM code strings
        ({**CHEST_PA, "modality": "CT"}, "out of scope: Modality CT is not one of CR,DX"),
        ({**CHEST_PA, "body_part": "KNEE"}, "out of scope: BodyPartExamined KNEE is not one of CHEST,THORAX,LUNG"),
        ({**CHEST_PA, "view_position": "LL"}, "out of scope: ViewPosition LL is not one of PA,AP"),
        ({**CHEST_PA, "view_position": "LATERAL"}, "out of scope: ViewPosition LATERAL is not one of PA,AP"),
        ({**CHEST_PA, "body_part": "Doe^Jane"}, "out of scope: BodyPartExamined <not a code string> is not one of CHEST,THORAX,LUNG"),
    ],
)
def test_skip_reason_by_header_field(meta: dict, reason: str | None) -> None:
    assert skip_reason(meta, Scope()) == reason


def test_settings_replace_the_defaults_they_name_and_any_accepts_everything() -> None:
    scope = Scope.from_settings(["view=pa,ap,ll", "body_part=any"])
    assert scope == Scope(modality=("CR", "DX"), body_part=None, view=("PA", "AP", "LL"))
    assert skip_reason({**CHEST_PA, "view_position": "LL", "body_part": "KNEE"}, scope) is None
    assert skip_reason({**CHEST_PA, "modality": "MR"}, scope) is not None
    for bad in ("view", "colour=red", "modality=,"):
        with pytest.raises(ValueError, match="scope"):
            Scope.from_settings([bad])


def test_the_header_is_read_from_dicom_bytes_without_their_pixels() -> None:
    ct, dataset = dicom_header(Path(get_testdata_file("CT_small.dcm")).read_bytes(), salt=None, max_pixels=DecodeOptions().max_pixels)
    assert ct["modality"] == "CT" and ct["study_id"] and ct["patient_key"] is None and dataset.Modality == "CT"
    knee = dicom_dataset(np.zeros((8, 8), np.uint8), Modality="CR", BodyPartExamined="KNEE")
    header, _ = dicom_header(dicom_bytes(knee)[:-40], salt="s", max_pixels=DecodeOptions().max_pixels)  # truncated pixels: the header still reads
    assert header["body_part"] == "KNEE" and header["patient_key"]
    assert dicom_header(b"\x89PNG\r\n\x1a\n....", salt=None, max_pixels=1) == ({}, None)
    assert dicom_header(b"random bytes", salt=None, max_pixels=1) == ({}, None)


@pytest.mark.parametrize(("modality", "status"), [("DX", "ok"), ("CT", "skipped")])
def test_a_dicom_file_is_parsed_once_for_scope_and_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modality: str, status: str
) -> None:
    """The scope check's dataset goes on to the decode; the row and tensor are those of a decode that parses itself."""
    rng = np.random.default_rng(0)
    path = tmp_path / "film.dcm"
    path.write_bytes(dicom_bytes(dicom_dataset(rng.integers(0, 4096, (64, 64)).astype(np.uint16), Modality=modality)))
    config = PreprocessConfig(size=32)

    def row_of(scope: Scope | None) -> tuple[dict, np.ndarray | None]:
        return process_file(str(path), "film.dcm", path.stat().st_size, config, DecodeOptions(), 1 << 20, scope=scope, salt="s")

    unscoped_row, unscoped_tensor = row_of(None)  # no header check: the decode parses the file itself
    parses = []
    dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *args, **kwargs: parses.append(1) or dcmread(*args, **kwargs))
    row, tensor = row_of(Scope())
    assert len(parses) == 1 and row["status"] == status
    if status == "ok":
        assert row == unscoped_row and np.array_equal(tensor, unscoped_tensor)
