"""`lungray screen` from a real Orthanc (tests/pacs_fixtures.py) and SRs stored back into it.

The Orthanc account is in LUNGRAY_DICOMWEB_USER/PASSWORD from the start of the session
(pacs_fixtures), so the Ray workers that retrieve instances see it as a cluster's would.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest
import ray
from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage, DigitalXRayImageStorageForPresentation, generate_uid

from dicom_factory import dicom_bytes, dicom_dataset
from model_factory import untrained_model_dir
from lungray import cli
from lungray.pacs import dicomweb, report, source
from lungray.raysession import free_port
from lungray.screen.pipeline import ScreenConfig, run_screen
from lungray.screen.writeback import store_reports
from pacs_fixtures import OrthancServer
from lungray.screen.tables import ensure_table, read_table

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(600)]

DATE = "2026-11-30"
SOP_CLASS = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation, "CT": CTImageStorage}
PLANTED_NAME, PLANTED_ID = "Prefect^Ford", "MRN-777111"


def instance(study_uid: str, study_date: str, modality: str, seed: int) -> pydicom.Dataset:
    pixels = np.random.default_rng(seed).integers(0, 255, (96, 96), dtype=np.uint8)
    ds = dicom_dataset(
        pixels, patient_id=PLANTED_ID, patient_name=PLANTED_NAME, StudyInstanceUID=study_uid, StudyDate=study_date,
        StudyTime="120000", Modality=modality, SOPClassUID=SOP_CLASS[modality],
    )
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def uri_of(server: OrthancServer, ds: pydicom.Dataset) -> str:
    return dicomweb.instance_uri(server.dicomweb_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


@pytest.mark.slow
def test_screen_from_orthanc_reports_back_and_a_rerun_adds_nothing(
    orthanc: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    two_images, one_image, victim_study, late, ct_study = (generate_uid() for _ in range(5))
    inside = [
        instance(two_images, "20260110", "CR", 0), instance(two_images, "20260110", "DX", 1),
        instance(one_image, "20260131", "DX", 2), instance(victim_study, "20260115", "DX", 3),
    ]
    outside = [instance(late, "20260201", "DX", 4), instance(ct_study, "20260115", "CT", 5)]
    for ds in inside + outside:
        orthanc.upload(dicom_bytes(ds))
    victim = inside[3]

    real_search = source.search_instances

    def search_then_delete(*args, **kwargs):  # the victim vanishes between the listing and its retrieve
        records = list(real_search(*args, **kwargs))
        orthanc.delete_instance(victim.SOPInstanceUID)
        return iter(records)

    monkeypatch.setattr(source, "search_instances", search_then_delete)
    model = untrained_model_dir(tmp_path / "model", threshold=0.0)  # every study with a probability is flagged
    output = tmp_path / "out"
    config = ScreenConfig(
        model=str(model), input=orthanc.uri, output=str(output), date=DATE, incremental=True,
        since="2026-01-10", until="2026-01-31", report_to=orthanc.uri, report_overlay=True,
    )
    caplog.set_level(logging.DEBUG)
    summary = run_screen(config)

    rows = {row["path"]: row for row in read_table(str(output), "images").to_pylist()}
    assert set(rows) == {uri_of(orthanc, ds) for ds in inside}  # one row per instance in range, CT and February out
    gone = rows[uri_of(orthanc, victim)]
    assert gone["status"] == "error" and "HTTP 404" in gone["error"] and gone["study_id"] == victim_study
    for ds in inside[:3]:
        row = rows[uri_of(orthanc, ds)]
        assert (row["status"], row["study_id"], row["sop_uid"]) == ("ok", ds.StudyInstanceUID, ds.SOPInstanceUID)
        assert 0.0 <= row["prob"] <= 1.0
    studies = {row["study_id"]: row for row in read_table(str(output), "studies").to_pylist()}
    assert {study for study, row in studies.items() if row["flagged"]} == {two_images, one_image}
    assert studies[victim_study]["n_errors"] == 1 and studies[victim_study]["prob"] is None

    # The SRs are in the flagged studies, read back, and say what the images table says.
    srs = list(dicomweb.search_instances(orthanc.uri, modalities=("SR",)))
    assert sorted(record.study_uid for record in srs) == sorted([two_images, one_image])
    for record in srs:
        content = report.read_report(pydicom.dcmread(io.BytesIO(source.retrieve_instance_bytes(record.path))))
        assert content.study_uid == record.study_uid and content.model_id == summary["model_id"]
        expected = {row["sop_uid"]: row["prob"] for row in rows.values() if row["study_id"] == record.study_uid}
        assert {image.sop_uid: image.probability for image in content.images} == pytest.approx(expected, rel=1e-6)
        assert all(image.finding == "abnormal" and image.threshold == 0.0 for image in content.images)
    overlays = list(dicomweb.search_instances(orthanc.uri, modalities=("OT",)))
    assert sorted(record.study_uid for record in overlays) == sorted([two_images, one_image])
    expected_counts = {"stored": 2, "already_present": 0, "failed": 0}
    assert summary["reports"] == {"sr": expected_counts, "overlay": expected_counts, "given_up": {"studies": 0}}
    run = json.loads((output / "runs" / f"{summary['run_id']}.json").read_text())
    assert run["reports"] == summary["reports"] and run["files_listed"] == 4

    # A rerun scores nothing and stores nothing; storing the same reports again finds them present.
    count = orthanc.instance_count()
    monkeypatch.setattr(source, "search_instances", real_search)
    again = run_screen(config)
    assert (again["files_listed"], again["files_scored"], again["files_skipped"]) == (3, 0, 3)
    assert again["reports"]["sr"]["stored"] == 0 and orthanc.instance_count() == count
    images, studies_table = read_table(str(output), "images"), read_table(str(output), "studies")
    repeated, _ = store_reports(orthanc.uri, "flagged", True, studies_table, images, 0.0, summary["model_id"])
    assert repeated["sr"] == repeated["overlay"] == {"stored": 0, "already_present": 2, "failed": 0}
    # `--report all` reports every scored study, `flagged` only the flagged ones.
    flags = [row["flagged"] and row["study_id"] != one_image for row in studies_table.to_pylist()]
    one_unflagged = studies_table.set_column(studies_table.schema.get_field_index("flagged"), "flagged", pa.array(flags))
    assert store_reports(orthanc.uri, "flagged", False, one_unflagged, images, 0.0, summary["model_id"]).counts["sr"]["already_present"] == 1
    assert store_reports(orthanc.uri, "all", False, one_unflagged, images, 0.0, summary["model_id"]).counts["sr"]["already_present"] == 2
    assert orthanc.instance_count() == count

    # Neither the password nor a patient identifier in any output, the driver's log or Ray's logs.
    secrets = (orthanc.password.encode(), PLANTED_ID.encode(), b"Prefect")
    ray_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in [*output.rglob("*"), *ray_logs.rglob("*")]:
        if path.is_file():
            content = path.read_bytes()
            assert not any(secret in content for secret in secrets), path
    assert not any(secret.decode() in caplog.text for secret in secrets)


@pytest.mark.slow
def test_a_study_across_commits_gets_one_whole_sr_and_a_refused_store_is_tried_again(
    orthanc: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study whose images fall in two commits (one file per chunk) was reported after the
    first with only its first image, and the second found that SR's UID present and stored
    nothing; a store the PACS refused was never tried again. Now the run stores what it queued
    when it ends, and what was refused stays queued for the next runs."""
    split_study, refused_study = generate_uid(), generate_uid()
    study_images = [instance(split_study, "20260110", "DX", 0), instance(split_study, "20260110", "DX", 1)]
    for ds in [*study_images, instance(refused_study, "20260110", "DX", 2)]:
        orthanc.upload(dicom_bytes(ds))
    real_store = dicomweb.store_if_absent

    def pacs_refusing_one_study(uri: str, dataset: pydicom.Dataset, *args, **kwargs) -> bool:
        if dataset.StudyInstanceUID == refused_study:
            raise dicomweb.DicomwebError("DICOMweb store at the PACS failed: HTTP 503 Service Unavailable")
        return real_store(uri, dataset, *args, **kwargs)

    monkeypatch.setattr(dicomweb, "store_if_absent", pacs_refusing_one_study)
    model = untrained_model_dir(tmp_path / "model", threshold=0.0)  # every study is flagged
    output = tmp_path / "out"
    config = ScreenConfig(model=str(model), input=orthanc.uri, output=str(output), date=DATE, incremental=True, chunk_files=1, report_to=orthanc.uri)
    first = run_screen(config)
    assert first["chunks"] == 3 and first["reports"]["sr"] == {"stored": 1, "already_present": 0, "failed": 1}

    (sr,) = list(dicomweb.search_instances(orthanc.uri, modalities=("SR",)))
    content = report.read_report(pydicom.dcmread(io.BytesIO(source.retrieve_instance_bytes(sr.path))))
    assert sr.study_uid == split_study and {image.sop_uid for image in content.images} == {ds.SOPInstanceUID for ds in study_images}

    monkeypatch.setattr(dicomweb, "store_if_absent", real_store)  # the PACS is back
    second = run_screen(config)
    assert second["files_scored"] == 0 and second["reports"]["sr"] == {"stored": 1, "already_present": 0, "failed": 0}
    assert sorted(record.study_uid for record in dicomweb.search_instances(orthanc.uri, modalities=("SR",))) == sorted([split_study, refused_study])
    count = orthanc.instance_count()
    assert run_screen(config)["reports"]["sr"] == {"stored": 0, "already_present": 0, "failed": 0}  # nothing queued is left
    assert orthanc.instance_count() == count and not list((output / "_lungray" / "writeback").rglob("*.json"))


@pytest.mark.slow
def test_a_run_killed_before_its_queue_is_written_leaves_the_study_to_the_next_run(
    orthanc: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue file was written after the studies' commit, which also moves the sync's
    watermark: a run killed between the two left a flagged study that no later sync saw again,
    so its SR was never stored. The queue is now written before that commit."""
    from lungray.screen import pipeline

    study = generate_uid()
    orthanc.upload(dicom_bytes(instance(study, "20260110", "DX", 0)))
    model = untrained_model_dir(tmp_path / "model", threshold=0.0)
    config = ScreenConfig(model=str(model), input=orthanc.uri, output=str(tmp_path / "out"), date=DATE, incremental=True, report_to=orthanc.uri)
    real_queue = pipeline.queue_reports

    def killed(output: str, model_id: str, which: str, studies: pa.Table, run_id: str) -> None:
        if studies.num_rows:  # the scored study, not the empty sync at the run's start
            raise KeyboardInterrupt("killed while queueing")
        real_queue(output, model_id, which, studies, run_id)

    monkeypatch.setattr(pipeline, "queue_reports", killed)
    with pytest.raises(KeyboardInterrupt):
        run_screen(config)
    monkeypatch.setattr(pipeline, "queue_reports", real_queue)
    again = run_screen(config)
    assert again["reports"]["sr"] == {"stored": 1, "already_present": 0, "failed": 0}
    assert [record.study_uid for record in dicomweb.search_instances(orthanc.uri, modalities=("SR",))] == [study]


def test_a_store_refused_every_night_is_given_up_after_max_tries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue is bounded: a study the PACS refuses `max_tries` times is dropped, and said to be."""
    from lungray.screen import writeback

    study = generate_uid()
    ensure_table(str(tmp_path), "images")
    ensure_table(str(tmp_path), "studies")
    monkeypatch.setattr(writeback, "current_studies", lambda *args: pa.table({"study_id": [study], "prob": [0.9], "flagged": [True], "explain_path": [None]}))
    monkeypatch.setattr(writeback, "study_images", lambda *args: pa.table({"path": ["p"], "study_id": [study], "status": ["ok"], "prob": [0.9]}))
    monkeypatch.setattr(writeback, "study_report", lambda *args: pydicom.Dataset())

    def refused(uri: str, dataset: pydicom.Dataset) -> bool:
        raise dicomweb.DicomwebError("DICOMweb store failed: HTTP 503")

    monkeypatch.setattr(dicomweb, "store_if_absent", refused)
    writeback.queue_reports(str(tmp_path), "m1", "flagged", pa.table({"study_id": [study], "prob": [0.9], "flagged": [True]}), "run-1")
    outcomes = [writeback.flush_reports(str(tmp_path), "m1", "dicomweb+http://pacs/dw", "flagged", False, 0.5, max_tries=2) for _ in range(3)]
    assert [(outcome["sr"]["failed"], outcome["given_up"]["studies"]) for outcome in outcomes] == [(1, 0), (1, 1), (0, 0)]


@pytest.mark.parametrize("failure", ["bad password", "refused connection"])
def test_a_pacs_that_cannot_be_queried_fails_the_run_with_a_message(
    failure: str, orthanc: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    orthanc.upload(dicom_bytes(instance(generate_uid(), "20260110", "DX", 0)))
    wrong = "wrong-" + orthanc.password
    if failure == "bad password":
        monkeypatch.setenv(dicomweb.PASSWORD_VARIABLE, wrong)
        uri, reason = orthanc.uri, "rejected the credentials (HTTP 401)"
    else:
        uri, reason = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web", "cannot connect"
    model = untrained_model_dir(tmp_path / "model")
    code = cli.main(["screen", "--model", str(model), "--input", uri, "--output", str(tmp_path / "out"), "--since", "2026-01-01"])
    captured = capsys.readouterr()
    assert code == 2 and reason in captured.err and "Traceback" not in captured.err
    assert wrong not in captured.out + captured.err and orthanc.password not in captured.out + captured.err
    assert not (tmp_path / "out" / "images").exists() and not (tmp_path / "out" / "runs").exists()


def test_pacs_flags_are_refused_where_they_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="filter a PACS query"):
        ScreenConfig(model="m", input=str(tmp_path), output="o", since="2026-01-01")
    with pytest.raises(ValueError, match="input must be a PACS"):
        ScreenConfig(model="m", input=str(tmp_path), output="o", report_to="dicomweb+http://127.0.0.1:1/dicom-web")
    with pytest.raises(ValueError, match="needs --report-to"):
        ScreenConfig(model="m", input="dicomweb+http://127.0.0.1:1/dicom-web", output="o", report_overlay=True)
    with pytest.raises(ValueError, match="must not hold credentials"):
        ScreenConfig(model="m", input="dicomweb+http://127.0.0.1:1/dicom-web", output="o", report_to="dicomweb+http://u:p@h/dw")


def test_a_listing_that_fails_part_way_is_a_failed_run_not_an_unqueryable_pacs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 says the PACS could not be queried and nothing was done; a query that fails after
    some pages (whose films may be scored and committed by then) is a failed run, exit 1."""
    from lungray.screen.pipeline import pacs_rows

    record = dicomweb.InstanceRecord("dicomweb+http://pacs/dicom-web/studies/1.2/series/1.3/instances/1.4", "1.2", "1.3", "1.4", None, "DX", None)

    def search(pages: int):
        def found(*args: object) -> object:
            yield from [record] * pages
            raise dicomweb.DicomwebError("QIDO-RS search at http://pacs: 503")

        return found

    config = ScreenConfig(model="m", input="dicomweb+http://pacs/dicom-web", output="o")
    monkeypatch.setattr(source, "search_instances", search(0))
    with pytest.raises(dicomweb.DicomwebError):
        list(pacs_rows(config))
    monkeypatch.setattr(source, "search_instances", search(1))
    with pytest.raises(RuntimeError, match="failed after 1 instances: QIDO-RS search .* 503; the same command resumes"):
        list(pacs_rows(config))
