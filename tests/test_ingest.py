"""Ray Data ingest end to end: every file accounted for, labels, patient split, S3, odd corpora."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLES, shared_data
from dicom_factory import dicom_bytes, dicom_dataset, png_header_only
from pydicom.data import get_testdata_files
from scope_factory import scope_archive

from lungray.ingest import IngestConfig, SourceSpec, run_ingest, split_groups
from lungray.io.scope import Scope
from lungray.preprocess import PreprocessConfig

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(600)]

PLANTED_NAME, PLANTED_ID = "Beeblebrox^Zaphod", "MRN-424242"
ACCEPT_ALL = Scope(modality=None, body_part=None, view=None)


def make_archive(root: Path) -> int:
    """Kermany-mini labelled sample plus DICOMs and junk in other folders; returns the file count."""
    shutil.copytree(SAMPLES / "kermany-mini", root / "kermany")
    junk = root / "kermany" / "junk"
    junk.mkdir()
    (junk / "empty.dcm").write_bytes(b"")
    (junk / "notes.txt").write_text("not an image\n")
    (junk / "random.bin").write_bytes(np.random.default_rng(0).bytes(2048))
    (junk / "bomb.png").write_bytes(png_header_only(60000, 60000))
    image = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 251).astype(np.uint8)
    (junk / "planted.dcm").write_bytes(dicom_bytes(dicom_dataset(image, patient_id=PLANTED_ID, patient_name=PLANTED_NAME)))
    (junk / "truncated.dcm").write_bytes(dicom_bytes(dicom_dataset(image))[:-1000])
    return sum(1 for path in root.rglob("*") if path.is_file())


def test_ingest_accounts_for_every_file(tmp_path: Path) -> None:
    files = make_archive(tmp_path / "in")
    output = tmp_path / "out"
    config = IngestConfig(
        sources=(SourceSpec(str(tmp_path / "in" / "kermany"), dataset="kermany"),),
        output=str(output),
        preprocess=PreprocessConfig(size=64),
        shard_rows=50,
    )
    summary = run_ingest(config)
    data = pq.read_table(output / "data")
    errors = pq.read_table(output / "errors.parquet").to_pylist()

    assert data.num_rows + len(errors) == files == summary["files"]
    assert sorted(data["path"].to_pylist() + [row["path"] for row in errors]) == sorted(
        str(path) for path in (tmp_path / "in" / "kermany").rglob("*") if path.is_file()
    )
    reasons = {Path(row["path"]).name: row["error"] for row in errors}
    assert set(reasons) == {"empty.dcm", "notes.txt", "random.bin", "bomb.png", "truncated.dcm"}
    assert "decompression bomb" in reasons["bomb.png"] and reasons["empty.dcm"] == "empty file"
    assert "truncated" in reasons["truncated.dcm"]

    # shards of at most shard_rows; the tensor column at the configured size and dtype
    shard_rows = [pq.read_metadata(path).num_rows for path in (output / "data").glob("*.parquet")]
    assert len(shard_rows) >= 3 and max(shard_rows) <= 50
    images = np.stack(data["image"].to_numpy(zero_copy_only=False)).reshape(-1, 64, 64)
    assert images.dtype == np.uint8 and images.std() > 10

    rows = data.drop_columns(["image"]).to_pylist()
    labelled = [row for row in rows if row["label"] is not None]
    assert summary["by_label"] == {"0": 61, "1": 61, "None": 1}
    assert len(labelled) == 122 and {row["source"] for row in rows} == {"kermany"}
    assert all(row["patient_key"] and len(row["patient_key"]) == 32 for row in labelled)
    split_of: dict[str, set[str]] = {}
    for row in labelled:
        split_of.setdefault(row["patient_key"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of.values())
    assert {row["split"] for row in labelled} == {"train", "val", "test"}
    assert summary["preprocess"]["size"] == 64 and len(summary["fingerprint"]) == 64
    assert summary["by_status"] == {"error": 5, "ok": files - 5}
    assert pq.read_table(output / "skipped.parquet").num_rows == 0  # the planted DICOM is a DX PA chest

    planted = next(row for row in rows if row["path"].endswith("planted.dcm"))
    assert planted["format"] == "dicom" and planted["study_id"].startswith("1.2.")
    for path in output.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert PLANTED_ID.encode() not in content and b"Beeblebrox" not in content, path

    with pytest.raises(FileExistsError):
        run_ingest(config)


def test_ingest_sets_out_of_scope_objects_aside_with_their_reason(tmp_path: Path) -> None:
    archive = scope_archive(tmp_path / "in")
    summary = run_ingest(IngestConfig(sources=(SourceSpec(str(archive)),), output=str(tmp_path / "out"), preprocess=PreprocessConfig(size=64)))
    data = pq.read_table(tmp_path / "out" / "data", columns=["path", "study_id", "body_part"]).to_pylist()
    skipped = {Path(row["path"]).name: row for row in pq.read_table(tmp_path / "out" / "skipped.parquet").to_pylist()}
    assert sorted(Path(row["path"]).name for row in data) == ["film.jpeg", "no-body-part.dcm", "pa.dcm"]
    assert sorted(skipped) == ["ct-slice.dcm", "knee.dcm", "lat0.dcm", "lat1.dcm", "lateral.dcm"]
    assert skipped["knee.dcm"]["skip_reason"] == "out of scope: BodyPartExamined KNEE is not one of CHEST,THORAX,LUNG"
    assert (skipped["ct-slice.dcm"]["modality"], skipped["lat0.dcm"]["view_position"]) == ("CT", "LATERAL")
    assert pq.read_table(tmp_path / "out" / "errors.parquet").num_rows == 0
    assert summary["by_status"] == {"ok": 3, "skipped": 5} and summary["files"] == 8
    assert summary["skipped_by_reason"]["out of scope: ViewPosition LATERAL is not one of PA,AP"] == 2
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["scope"] == {"modality": ["CR", "DX"], "body_part": ["CHEST", "THORAX", "LUNG"], "view": ["PA", "AP"]}
    assert written["layout"]["skipped"] == "skipped.parquet" and written["pseudonymized"] is False


def test_ingest_merges_sources_and_study_ids(tmp_path: Path) -> None:
    shutil.copytree(SAMPLES / "kermany-mini", tmp_path / "kermany")
    shutil.copytree(SAMPLES / "dicom", tmp_path / "dicom")
    labels = tmp_path / "dicom-labels.csv"
    nih = next(path.name for path in (SAMPLES / "dicom").glob("nih_*.dcm"))
    labels.write_text(f"path,label\n{nih},normal\n")
    summary = run_ingest(
        IngestConfig(
            sources=(
                SourceSpec(str(tmp_path / "kermany"), dataset="kermany"),
                SourceSpec(str(tmp_path / "dicom"), dataset="csv", labels=str(labels)),
            ),
            output=str(tmp_path / "out"),
            preprocess=PreprocessConfig(size=64),
        )
    )
    assert summary["by_source"] == {"csv": 4, "kermany": 122}
    rows = pq.read_table(tmp_path / "out" / "data").drop_columns(["image"]).to_pylist()
    dicoms = [row for row in rows if row["source"] == "csv"]
    assert len(dicoms) == 4 and all(row["format"] == "dicom" for row in dicoms)
    assert [row["label"] for row in dicoms if row["path"].endswith(nih)] == [0]
    assert all(row["study_id"].startswith(("1.", "2.")) for row in dicoms if row["study_id"] != ".")
    assert {row["study_id"] for row in rows if row["source"] == "kermany"} == {"NORMAL", "PNEUMONIA"}


def test_films_of_one_study_without_a_patient_id_stay_in_one_split(tmp_path: Path) -> None:
    """DICOM films without PatientID (labels from a CSV) were each their own patient, so the two
    films of one study fell into different splits (8 of these 12 studies)."""
    rng = np.random.default_rng(0)
    lines = ["path,label"]
    for study_index in range(12):
        study = f"1.2.826.0.1.3680043.8.498.{study_index + 1}"
        for view in range(2):
            ds = dicom_dataset(rng.integers(0, 255, (64, 64), dtype=np.uint8), StudyInstanceUID=study)
            del ds.PatientID
            (tmp_path / "in").mkdir(exist_ok=True)
            (tmp_path / "in" / f"s{study_index:02d}_{view}.dcm").write_bytes(dicom_bytes(ds))
            lines.append(f"s{study_index:02d}_{view}.dcm,{study_index % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    run_ingest(
        IngestConfig(
            sources=(SourceSpec(str(tmp_path / "in"), dataset="csv", labels=str(tmp_path / "labels.csv")),),
            output=str(tmp_path / "out"), preprocess=PreprocessConfig(size=32), scope=ACCEPT_ALL,
        )
    )
    rows = pq.read_table(tmp_path / "out" / "data", columns=["study_id", "split", "patient_key"]).to_pylist()
    assert len(rows) == 24 and {row["patient_key"] for row in rows} == {None}
    splits_of: dict[str, set[str]] = {}
    for row in rows:
        splits_of.setdefault(row["study_id"], set()).add(row["split"])
    assert len(splits_of) == 12 and all(len(splits) == 1 for splits in splits_of.values()), splits_of
    assert {split for splits in splits_of.values() for split in splits} == {"train", "val", "test"}


def test_a_class_folder_is_no_study_for_the_split() -> None:
    """Kermany-style files have no header; their study is their folder, NORMAL/ or PNEUMONIA/,
    which must not join every film of a class into one group."""
    groups = split_groups([None, None, "p1", "p1"], ["h1", "h2", "h3", "h4"], ["a", "b", "c", "d"], ["NORMAL", "NORMAL", "1.2.3", "1.2.3"])
    assert groups[0] != groups[1] and groups[2] == groups[3]
    # One study, whether its UID came from the header or from a folder named by it (the export layout).
    joined = split_groups([None, None], ["h1", "h2"], ["a", "b"], ["1.2.3", "1.2.3"])
    assert joined[0] == joined[1]
    dated = split_groups([None, None], ["h1", "h2"], ["a", "b"], ["2026.11.30", "2026.11.30"])
    assert dated[0] != dated[1]  # a day's folder is no study


def test_overlapping_sources_are_refused_before_anything_is_decoded(tmp_path: Path) -> None:
    """A folder and one of its subfolders as two sources gave every file of the subfolder two
    rows (two training images), and, labelled otherwise by the second source, a crash at the end."""
    shutil.copytree(SAMPLES / "kermany-mini", tmp_path / "kermany")
    sources = (SourceSpec(str(tmp_path / "kermany"), dataset="kermany"), SourceSpec(str(tmp_path / "kermany" / "NORMAL"), dataset="kermany"))
    normals = sum(1 for path in (tmp_path / "kermany" / "NORMAL").rglob("*") if path.is_file())
    with pytest.raises(ValueError, match=rf"{normals} file\(s\) of source .*NORMAL are also in source .*kermany:"):
        run_ingest(IngestConfig(sources=sources, output=str(tmp_path / "out"), preprocess=PreprocessConfig(size=32)))
    (tmp_path / "alias").symlink_to(tmp_path / "kermany")  # the same folder through a link
    linked = (SourceSpec(str(tmp_path / "kermany"), dataset="kermany"), SourceSpec(str(tmp_path / "alias" / "NORMAL"), dataset="kermany"))
    with pytest.raises(ValueError, match="are also in source"):
        run_ingest(IngestConfig(sources=linked, output=str(tmp_path / "out"), preprocess=PreprocessConfig(size=32)))
    assert not (tmp_path / "out").exists()


def test_an_output_is_only_cleared_for_an_ingest_that_can_start(tmp_path: Path) -> None:
    """A data/ folder no ingest started is left alone and refused; an unfinished ingest's is
    cleared only once the new run's input lists (a mistyped input deleted it first); fractions
    that do not sum to 1 are refused before any decode."""
    theirs = tmp_path / "project"
    (theirs / "data").mkdir(parents=True)
    (theirs / "data" / "notes.txt").write_text("precious")
    archive = str(SAMPLES / "kermany-mini")
    with pytest.raises(FileExistsError, match="data/ folder that no lungray ingest started"):
        run_ingest(IngestConfig(sources=(SourceSpec(archive, dataset="kermany"),), output=str(theirs), preprocess=PreprocessConfig(size=32)))
    assert (theirs / "data" / "notes.txt").read_text() == "precious"

    unfinished = tmp_path / "unfinished"
    (unfinished / "_staging").mkdir(parents=True)
    (unfinished / "data").mkdir()
    (unfinished / "data" / "part-0.parquet").write_bytes(b"an earlier run's")
    with pytest.raises(FileNotFoundError):
        run_ingest(IngestConfig(sources=(SourceSpec(str(tmp_path / "no-such-archive"), dataset="kermany"),), output=str(unfinished)))
    assert (unfinished / "data" / "part-0.parquet").exists()
    with pytest.raises(ValueError, match="must sum to 1"):
        IngestConfig(sources=(SourceSpec(archive, dataset="kermany"),), output=str(unfinished), fractions=(0.7, 0.2, 0.2))
    summary = run_ingest(IngestConfig(sources=(SourceSpec(archive, dataset="kermany"),), output=str(unfinished), preprocess=PreprocessConfig(size=32)))
    assert summary["files"] > 0 and not (unfinished / "data" / "part-0.parquet").exists()
    assert sorted(path.name for path in unfinished.iterdir()) == ["data", "errors.parquet", "skipped.parquet", "summary.json"]


def test_ingest_reads_and_writes_s3(tmp_path: Path, s3_bucket: str) -> None:
    import boto3

    client = boto3.client("s3")
    source_files = sorted((SAMPLES / "kermany-mini").rglob("*.jpeg"))[::6]
    for path in source_files:
        client.upload_file(str(path), s3_bucket, f"archive/{path.parent.name}/{path.name}")
    client.put_object(Bucket=s3_bucket, Key="archive/NORMAL/broken.jpeg", Body=b"\xff\xd8\xff\xe0 truncated")

    summary = run_ingest(
        IngestConfig(
            sources=(SourceSpec(f"s3://{s3_bucket}/archive", dataset="kermany"),),
            output=f"s3://{s3_bucket}/ingested",
            preprocess=PreprocessConfig(size=64),
        )
    )
    assert summary["files"] == len(source_files) + 1
    fs = pafs.S3FileSystem(
        endpoint_override=client.meta.endpoint_url.split("://")[1], scheme="http", region="us-east-1",
        access_key="testing", secret_key="testing",
    )
    data = pq.read_table(f"{s3_bucket}/ingested/data", filesystem=fs)
    errors = pq.read_table(f"{s3_bucket}/ingested/errors.parquet", filesystem=fs).to_pylist()
    assert data.num_rows == len(source_files)
    assert all(path.startswith(f"s3://{s3_bucket}/archive/") for path in data["path"].to_pylist())
    assert [row["path"] for row in errors] == [f"s3://{s3_bucket}/archive/NORMAL/broken.jpeg"]
    keys = [obj["Key"] for obj in client.list_objects_v2(Bucket=s3_bucket, Prefix="ingested/")["Contents"]]
    assert "ingested/summary.json" in keys and not any("_staging" in key for key in keys)


@pytest.mark.slow
def test_whole_pydicom_corpus_passes_with_one_row_per_file(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = sorted(
        {file for path in map(Path, get_testdata_files()) for file in ([path] if path.is_file() else path.rglob("*")) if file.is_file()}
    )
    assert len(files) > 200, "pydicom-data should add its files to pydicom's own"
    for index, path in enumerate(files):
        shutil.copy(path, corpus / f"{index:03d}_{path.name}")
    summary = run_ingest(
        # Every modality admitted: the test is of the decoder, on CT, MR, US... as much as on CR.
        IngestConfig(sources=(SourceSpec(str(corpus)),), output=str(tmp_path / "out"), preprocess=PreprocessConfig(size=64), scope=ACCEPT_ALL)
    )
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    data_rows = pq.read_table(tmp_path / "out" / "data", columns=["path"]).num_rows
    assert summary["files"] == len(files) == data_rows + len(errors)
    assert summary["by_status"]["ok"] > 100
    assert all(row["error"] for row in errors)


@pytest.mark.slow
def test_kermany_224_patient_split_through_the_ingest(tmp_path: Path) -> None:
    kermany = shared_data("kermany-224")
    summary = run_ingest(
        IngestConfig(sources=(SourceSpec(str(kermany), dataset="kermany"),), output=str(tmp_path / "out"), preprocess=PreprocessConfig(size=64))
    )
    table = pq.read_table(tmp_path / "out" / "data", columns=["patient_key", "split", "label", "content_hash"])
    rows = table.to_pylist()
    assert len(rows) == 5216
    by_patient: dict[str, set[str]] = {}
    by_content: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_key"], set()).add(row["split"])
        by_content.setdefault(row["content_hash"], set()).add(row["split"])
    assert len(by_patient) < 5216 * 0.7  # patients do have several images
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert all(len(splits) == 1 for splits in by_content.values())  # duplicates never straddle splits
    fractions = {name: summary["splits"][name]["images"] / 5216 for name in ("train", "val", "test")}
    assert abs(fractions["train"] - 0.70) < 0.02 and abs(fractions["test"] - 0.15) < 0.02
