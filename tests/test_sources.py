"""Dataset adapters on constructed listings and on the real kermany-224 archive."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lungray.sources import DATASETS, SourceInfo, describe, merge, parse_label

KERMANY_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany-224"


def kermany_listing() -> list[str]:
    """Relative POSIX paths of every file under kermany-224, as the ingest lists them."""
    if not KERMANY_ROOT.is_dir():
        pytest.skip(f"real data not present at {KERMANY_ROOT}")
    files = (path for path in KERMANY_ROOT.rglob("*") if path.is_file())
    return sorted(path.relative_to(KERMANY_ROOT).as_posix() for path in files)


@pytest.mark.parametrize(
    ("path", "label", "patient"),
    [
        ("train/NORMAL/IM-0115-0001.jpeg", 0, "IM-0115"),
        ("chest_xray/test/PNEUMONIA/person1_bacteria_1.jpeg", 1, "person1"),
        ("a/b/c/pneumonia/person12_virus_44.jpeg", 1, "person12"),
        ("Normal/IM-0629-0001-0002.jpeg", 0, "IM-0629"),
        ("train/NORMAL/NORMAL2-IM-1234-0001.jpeg", 0, "NORMAL2-IM-1234"),
        ("train/PNEUMONIA/person447_virus_921_1.jpeg", 1, "person447"),
        # the nearest class folder decides, so a nested re-sort is honoured
        ("NORMAL/PNEUMONIA/person3_virus_9.jpeg", 1, "person3"),
        # a name that does not parse keeps its folder label but has no patient
        ("train/NORMAL/scan.jpeg", 0, None),
        ("train/PNEUMONIA/person_bacteria_1.jpeg", 1, None),
        # outside any class folder nothing is known, even for a class-like file name
        ("NORMAL.jpeg", None, None),
        ("README.md", None, None),
        ("extra/person5_virus_2.jpeg", None, None),
    ],
)
def test_kermany_labels_from_folder_and_patient_from_name(
    path: str, label: int | None, patient: str | None
) -> None:
    assert describe("kermany", [path]) == {path: SourceInfo(label, patient, "kermany")}


@pytest.mark.parametrize(
    ("dataset", "path", "expected"),
    [
        ("shenzhen", "CXR_png/CHNCXR_0001_0.png", SourceInfo(0, "CHNCXR_0001", "shenzhen")),
        ("shenzhen", "deep/er/CHNCXR_0327_1.png", SourceInfo(1, "CHNCXR_0327", "shenzhen")),
        ("shenzhen", "CHNCXR_0001_2.png", SourceInfo(None, None, "shenzhen")),
        ("shenzhen", "MCUCXR_0001_0.png", SourceInfo(None, None, "shenzhen")),
        # file type is the ingest's concern (it decodes every file), so only the name counts
        ("shenzhen", "Readings/CHNCXR_0001_0.txt", SourceInfo(0, "CHNCXR_0001", "shenzhen")),
        ("montgomery", "Set/CXR_png/MCUCXR_0104_1.png", SourceInfo(1, "MCUCXR_0104", "montgomery")),
        ("montgomery", "MCUCXR_0005_0.png", SourceInfo(0, "MCUCXR_0005", "montgomery")),
        ("montgomery", "CHNCXR_0001_0.png", SourceInfo(None, None, "montgomery")),
        ("montgomery", "NLM-MontgomeryCXRSet.pdf", SourceInfo(None, None, "montgomery")),
    ],
)
def test_tuberculosis_sets_label_from_suffix(dataset: str, path: str, expected: SourceInfo) -> None:
    assert describe(dataset, [path]) == {path: expected}


CHESTXRAY14_CSV = """\
Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age
00000001_000.png,Cardiomegaly,0,1,58
00000001_001.png,Cardiomegaly|Emphysema,1,1,58
00000002_000.png,No Finding,0,2,81
00000003_000.png,,0,3,74
"""


def test_chestxray14_matches_by_basename_and_reads_findings() -> None:
    paths = [
        "images_001/images/00000001_000.png",
        "images_001/images/00000001_001.png",
        "images_002/00000002_000.png",
        "00000003_000.png",
        "images_002/00000099_000.png",
        "Data_Entry_2017.csv",
    ]
    assert describe("chestxray14", paths, CHESTXRAY14_CSV) == {
        paths[0]: SourceInfo(1, "1", "chestxray14"),
        paths[1]: SourceInfo(1, "1", "chestxray14"),
        paths[2]: SourceInfo(0, "2", "chestxray14"),
        paths[3]: SourceInfo(None, "3", "chestxray14"),
        paths[4]: SourceInfo(None, None, "chestxray14"),
        paths[5]: SourceInfo(None, None, "chestxray14"),
    }


def test_chestxray14_rejects_missing_columns_and_repeated_images() -> None:
    with pytest.raises(ValueError, match="Patient ID"):
        describe("chestxray14", ["a.png"], "Image Index,Finding Labels\na.png,No Finding\n")
    repeated = "Image Index,Finding Labels,Patient ID\na.png,No Finding,1\na.png,Mass,1\n"
    with pytest.raises(ValueError, match="line 3.*listed twice"):
        describe("chestxray14", ["a.png"], repeated)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("0", 0),
        ("normal", 0),
        ("NORMAL", 0),
        ("No Finding", 0),
        ("  no   finding ", 0),
        ("1", 1),
        ("abnormal", 1),
        ("Pneumonia", 1),
        ("TB", 1),
        ("tuberculosis", 1),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_label_accepts_synonyms(text: str, label: int | None) -> None:
    assert parse_label(text) == label


@pytest.mark.parametrize("text", ["2", "maybe", "covid", "1.0", "-1"])
def test_parse_label_rejects_other_words(text: str) -> None:
    with pytest.raises(ValueError, match="unrecognised label"):
        parse_label(text)


def test_generic_csv_matches_exact_paths_then_unique_basenames() -> None:
    labels_csv = (
        "path,label,patient\n"
        "train/NORMAL/a.jpeg,normal,p1\n"
        "./train/PNEUMONIA/b.jpeg,pneumonia,\n"
        "c.jpeg,tb,p3\n"
        "d.jpeg,1,p4\n"
        "e.jpeg,,p5\n"
    )
    paths = [
        "train/NORMAL/a.jpeg",
        "train/PNEUMONIA/b.jpeg",
        "nested/c.jpeg",  # unique basename on both sides
        "one/d.jpeg",  # basename listed twice: ambiguous, so unmatched
        "two/d.jpeg",
        "elsewhere/e.jpeg",
        "labels.csv",
    ]
    assert describe("csv", paths, labels_csv) == {
        "train/NORMAL/a.jpeg": SourceInfo(0, "p1", "csv"),
        "train/PNEUMONIA/b.jpeg": SourceInfo(1, None, "csv"),
        "nested/c.jpeg": SourceInfo(1, "p3", "csv"),
        "one/d.jpeg": SourceInfo(None, None, "csv"),
        "two/d.jpeg": SourceInfo(None, None, "csv"),
        "elsewhere/e.jpeg": SourceInfo(None, "p5", "csv"),
        "labels.csv": SourceInfo(None, None, "csv"),
    }


def test_generic_csv_basename_match_needs_a_unique_csv_row() -> None:
    labels_csv = "path,label\nx/a.png,0\ny/a.png,1\n"
    assert describe("csv", ["z/a.png"], labels_csv) == {"z/a.png": SourceInfo(None, None, "csv")}


def test_generic_csv_without_patient_column_and_with_bom() -> None:
    labels_csv = "\ufeffpath, label\nimg.png,Abnormal\n"
    assert describe("csv", ["img.png"], labels_csv) == {"img.png": SourceInfo(1, None, "csv")}


@pytest.mark.parametrize(
    ("labels_csv", "message"),
    [
        ("path,label\na.png,0\nb.png,sick\n", r"line 3 \(b.png\).*'sick'"),
        ("file,label\na.png,0\n", "lacks columns.*path"),
        ("path\na.png\n", "lacks columns.*label"),
        ("", "lacks columns"),
        ("path,label\na.png,0\na.png,0\n", "line 3.*listed twice"),
        ("path,label\n,0\n", "line 2: empty path"),
    ],
)
def test_generic_csv_errors_name_the_row(labels_csv: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        describe("csv", ["a.png", "b.png"], labels_csv)


def test_archive_without_dataset_is_unlabelled_or_csv() -> None:
    paths = ["x/a.dcm", "b.png"]
    assert describe(None, paths) == {path: SourceInfo(None, None, "archive") for path in paths}
    assert describe(None, paths, "path,label\nb.png,normal\n") == {
        "x/a.dcm": SourceInfo(None, None, "csv"),
        "b.png": SourceInfo(0, None, "csv"),
    }


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'nih'"):
        describe("nih", ["a.png"])
    for dataset in ("chestxray14", "csv"):
        with pytest.raises(ValueError, match="needs a labels CSV"):
            describe(dataset, ["a.png"])
    for dataset in ("kermany", "shenzhen", "montgomery"):
        with pytest.raises(ValueError, match="file names, not a CSV"):
            describe(dataset, ["a.png"], "path,label\n")
    assert set(DATASETS) == {"kermany", "shenzhen", "montgomery", "chestxray14", "csv"}


def test_merge_lets_the_labelling_source_win() -> None:
    paths = ["shenzhen/CHNCXR_0001_1.png", "montgomery/MCUCXR_0002_0.png", "notes.txt"]
    merged = merge([describe("shenzhen", paths), describe("montgomery", paths)])
    assert merged == {
        paths[0]: SourceInfo(1, "CHNCXR_0001", "shenzhen"),
        paths[1]: SourceInfo(0, "MCUCXR_0002", "montgomery"),
        paths[2]: SourceInfo(None, None, "shenzhen"),
    }


def test_merge_keeps_agreeing_claims_and_rejects_conflicts() -> None:
    first = {"a.png": SourceInfo(1, "p", "csv")}
    assert merge([first, {"a.png": SourceInfo(1, None, "archive")}]) == first
    with pytest.raises(ValueError, match="for 'a.png': 1 from csv, 0 from kermany"):
        merge([first, {"a.png": SourceInfo(0, "q", "kermany")}])


def test_real_kermany_every_image_has_label_and_patient() -> None:
    listing = kermany_listing()
    described = describe("kermany", listing)
    images = {path: info for path, info in described.items() if path.startswith("train/")}
    assert len(images) == 5216
    assert Counter(info.label for info in images.values()) == {0: 1341, 1: 3875}
    unparsed = [path for path, info in images.items() if info.patient_id is None]
    assert unparsed == []
    outside = {path: info for path, info in described.items() if path not in images}
    assert set(outside) == {"README.md", "labels.csv"}
    assert all(info == SourceInfo(None, None, "kermany") for info in outside.values())
    images_per_patient = Counter(info.patient_id for info in images.values())
    assert len(images_per_patient) < len(images)
    assert max(images_per_patient.values()) > 1


def test_real_kermany_labels_csv_agrees_with_folders() -> None:
    listing = kermany_listing()
    by_folder = describe("kermany", listing)
    by_csv = describe(None, listing, (KERMANY_ROOT / "labels.csv").read_text())
    labelled = {path: info.label for path, info in by_csv.items() if info.label is not None}
    assert len(labelled) == 5216
    assert all(by_folder[path].label == label for path, label in labelled.items())
