"""Nightly screening: the output contract, incremental runs, chunked commits and resume, faults, S3, privacy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydicom
import pytest
import ray
from conftest import REPO, SAMPLES
from dicom_factory import dicom_bytes, dicom_dataset, png_header_only
from model_factory import untrained_model_dir
from scope_factory import CHEST_STUDY, LATERALS_STUDY, scope_archive
from pydicom.data import get_testdata_file

from lungray.io.rows import dataset_of_blocks
from lungray.io.scope import Scope
from lungray.privacy import Pseudonymizer
from lungray.screen.decode import chunk_rows
from lungray.screen.pipeline import ActorPlan, ScreenConfig, files_per_task, plan_actors, run_screen
from lungray.screen.tables import IMAGE_SCHEMA, open_table, read_table

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(600)]

DATE = "2026-11-27"
PLANTED_NAME, PLANTED_ID = "Prefect^Ford", "MRN-777111"
IMAGE_COLUMNS = {"path", "study_id", "sop_uid", "status", "error", "skip_reason", "prob", "model_id", "size", "mtime_ns", "etag", "tries", "run_id", "scored_date"}
STUDY_COLUMNS = {"study_id", "n_images", "n_errors", "n_skipped", "prob", "flagged", "threshold", "aggregate", "model_id", "run_id", "explain_path", "scored_date"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_model_dir(tmp_path_factory.mktemp("model") / "cnn", threshold=0.5)


def junk_archive(root: Path) -> Path:
    """Real images in two studies, a DICOM study with a planted patient, and every kind of junk."""
    for label in ("NORMAL", "PNEUMONIA"):
        target = root / f"study-{label.lower()}"
        target.mkdir(parents=True)
        for path in sorted((SAMPLES / "kermany-mini" / label).glob("*.jpeg"))[:6]:
            shutil.copy(path, target / path.name)
    image = (np.arange(96 * 96, dtype=np.uint32).reshape(96, 96) % 253).astype(np.uint8)
    dicom_study = root / "dicom"
    dicom_study.mkdir()
    for index in range(2):
        ds = dicom_dataset(image, patient_id=PLANTED_ID, patient_name=PLANTED_NAME, StudyInstanceUID="1.2.826.0.1.3680043.99.1")
        (dicom_study / f"im{index}.dcm").write_bytes(dicom_bytes(ds))
    junk = root / "junk"
    junk.mkdir()
    (junk / "empty.dcm").write_bytes(b"")
    (junk / "truncated.dcm").write_bytes(dicom_bytes(dicom_dataset(image))[:-2000])
    shutil.copy(get_testdata_file("test-SR.dcm"), junk / "report-sr.dcm")
    (junk / "random.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    (junk / "notes.txt").write_text("not an image\n")
    bomb = dicom_dataset(image[:8, :8])
    bomb.Rows, bomb.Columns = 60000, 60000
    (junk / "bomb.dcm").write_bytes(dicom_bytes(bomb))
    (junk / "bomb.png").write_bytes(png_header_only(60000, 60000))
    return root


def listed(root: Path) -> list[str]:
    return sorted(str(path) for path in root.rglob("*") if path.is_file())


def images_table(output: Path):
    return read_table(str(output), "images")


def studies_table(output: Path):
    return read_table(str(output), "studies")


def test_schema_and_one_row_per_file_with_junk(tmp_path: Path, model_dir: Path) -> None:
    archive = junk_archive(tmp_path / "archive")
    output = tmp_path / "out"
    summary = run_screen(ScreenConfig(model=str(model_dir), input=str(archive), output=str(output), date=DATE))

    images = images_table(output)
    assert IMAGE_COLUMNS <= set(images.column_names)
    assert sorted(images["path"].to_pylist()) == listed(archive)
    rows = {Path(row["path"]).name: row for row in images.to_pylist()}
    for junk in ("empty.dcm", "truncated.dcm", "random.bin", "notes.txt", "bomb.dcm", "bomb.png"):
        assert rows[junk]["status"] == "error" and rows[junk]["error"] and rows[junk]["prob"] is None, junk
    assert "60000x60000" in rows["bomb.dcm"]["error"]
    sr = rows["report-sr.dcm"]  # a structured report is no radiograph: out of scope by its Modality
    assert (sr["status"], sr["skip_reason"], sr["error"], sr["prob"]) == ("skipped", "out of scope: Modality SR is not one of CR,DX", None, None)
    ok_rows = [row for row in rows.values() if row["status"] == "ok"]
    assert len(ok_rows) == 14 and all(0.0 <= row["prob"] <= 1.0 and row["error"] is None for row in ok_rows)
    assert rows["im0.dcm"]["sop_uid"] and rows["im0.dcm"]["study_id"] == "1.2.826.0.1.3680043.99.1"
    assert rows["notes.txt"]["sop_uid"] is None
    assert {str(row["scored_date"]) for row in rows.values()} == {DATE}

    studies = studies_table(output).to_pylist()
    assert STUDY_COLUMNS <= set(studies[0])
    by_study = {row["study_id"]: row for row in studies}
    # A DICOM file that fails to decode counts in its header's study, the rest of the junk in its folder's;
    # an out-of-scope object (the SR) keeps its header's study too.
    header_studies = {junk: pydicom.dcmread(archive / "junk" / junk, stop_before_pixels=True).StudyInstanceUID for junk in ("truncated.dcm", "bomb.dcm")}
    assert all(rows[junk]["study_id"] == study for junk, study in header_studies.items())
    sr_study = pydicom.dcmread(get_testdata_file("test-SR.dcm")).StudyInstanceUID
    assert rows["report-sr.dcm"]["study_id"] == sr_study
    assert set(by_study) == {"study-normal", "study-pneumonia", "1.2.826.0.1.3680043.99.1", "junk", sr_study, *header_studies.values()}
    assert all(by_study[study]["n_errors"] == 1 for study in header_studies.values())
    normal = by_study["study-normal"]
    normal_probs = [row["prob"] for row in ok_rows if row["study_id"] == "study-normal"]
    assert normal["n_images"] == 6 and normal["n_errors"] == 0 and normal["prob"] == pytest.approx(max(normal_probs))
    assert normal["flagged"] == (normal["prob"] >= 0.5) and normal["threshold"] == 0.5
    assert normal["n_skipped"] == 0
    assert by_study["junk"]["n_errors"] == 4 and by_study["junk"]["prob"] is None and not by_study["junk"]["flagged"]
    assert (by_study[sr_study]["n_images"], by_study[sr_study]["n_skipped"], by_study[sr_study]["flagged"]) == (1, 1, False)

    run = json.loads((output / "runs" / f"{summary['run_id']}.json").read_text())
    assert run["by_status"] == {"ok": 14, "error": 6, "skipped": 1} and run["files_listed"] == 21
    assert run["config"]["scope"] == {"modality": ["CR", "DX"], "body_part": ["CHEST", "THORAX", "LUNG"], "view": ["PA", "AP"]}
    assert run["studies_flagged"] == sum(row["flagged"] for row in studies)
    assert run["chunks"] == 1 and all(row["tries"] == 1 for row in rows.values())


def test_out_of_scope_objects_are_skipped_rows_never_scored_and_counted_per_study(tmp_path: Path) -> None:
    flag_everything = untrained_model_dir(tmp_path / "model", threshold=0.0)
    archive = scope_archive(tmp_path / "archive")
    summary = run_screen(ScreenConfig(model=str(flag_everything), input=str(archive), output=str(tmp_path / "out"), date=DATE))

    rows = {Path(row["path"]).name: row for row in images_table(tmp_path / "out").to_pylist()}
    assert {name: row["status"] for name, row in rows.items()} == {
        "pa.dcm": "ok", "no-body-part.dcm": "ok", "film.jpeg": "ok",
        "lateral.dcm": "skipped", "knee.dcm": "skipped", "ct-slice.dcm": "skipped", "lat0.dcm": "skipped", "lat1.dcm": "skipped",
    }
    assert rows["lateral.dcm"]["skip_reason"] == "out of scope: ViewPosition LL is not one of PA,AP"
    assert rows["knee.dcm"]["skip_reason"] == "out of scope: BodyPartExamined KNEE is not one of CHEST,THORAX,LUNG"
    assert rows["ct-slice.dcm"]["skip_reason"] == "out of scope: Modality CT is not one of CR,DX"
    for row in rows.values():
        skipped = row["status"] == "skipped"
        assert (row["prob"] is None) == skipped and (row["skip_reason"] is not None) == skipped and row["error"] is None
    assert rows["knee.dcm"]["study_id"] == CHEST_STUDY and rows["ct-slice.dcm"]["sop_uid"]

    studies = {row["study_id"]: row for row in studies_table(tmp_path / "out").to_pylist()}
    chest = studies[CHEST_STUDY]
    assert (chest["n_images"], chest["n_errors"], chest["n_skipped"], chest["flagged"]) == (4, 0, 2, True)
    assert chest["prob"] == pytest.approx(max(rows[name]["prob"] for name in ("pa.dcm", "no-body-part.dcm")))
    laterals = studies[LATERALS_STUDY]
    assert (laterals["n_skipped"], laterals["prob"], laterals["flagged"]) == (2, None, False)  # never flagged at threshold 0
    ct_study = studies[rows["ct-slice.dcm"]["study_id"]]
    assert (ct_study["n_images"], ct_study["n_skipped"], ct_study["flagged"]) == (1, 1, False)
    assert summary["by_status"] == {"ok": 3, "error": 0, "skipped": 5} and summary["studies_flagged"] == 2

    # The accepted values are settings: laterals and any body part admitted, the CT still out.
    wider = Scope.from_settings(["view=PA,AP,LL,LATERAL", "body_part=any"])
    summary = run_screen(ScreenConfig(model=str(flag_everything), input=str(archive), output=str(tmp_path / "wider"), date=DATE, scope=wider))
    statuses = {Path(row["path"]).name: row["status"] for row in images_table(tmp_path / "wider").to_pylist()}
    assert [name for name, status in statuses.items() if status == "skipped"] == ["ct-slice.dcm"]
    run = json.loads((tmp_path / "wider" / "runs" / f"{summary['run_id']}.json").read_text())
    assert run["config"]["scope"] == {"modality": ["CR", "DX"], "body_part": None, "view": ["PA", "AP", "LL", "LATERAL"]}

    # Widened on an output of the narrower scope, an incremental run judges its skipped files again
    # (before, they stayed "current": the scope never reached them); then it has nothing to do.
    widened = ScreenConfig(model=str(flag_everything), input=str(archive), output=str(tmp_path / "out"), date=DATE, scope=wider, incremental=True)
    assert run_screen(widened)["files_scored"] == 5  # the five skipped files, the CT skipped again
    assert {Path(row["path"]).name: row["status"] for row in images_table(tmp_path / "out").to_pylist()} == statuses
    assert run_screen(widened)["files_scored"] == 0


def test_incremental_runs_add_nothing_then_only_new_files(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = junk_archive(tmp_path / "archive")
    output = tmp_path / "out"
    config = ScreenConfig(model=str(model_dir), input=str(archive), output=str(output), date=DATE, incremental=True)
    run_screen(config)
    first = images_table(output)

    again = run_screen(config)  # the six files in error are tried again; nothing else is
    assert (again["files_scored"], again["files_retried"], again["files_skipped"]) == (6, 6, 15)
    images = images_table(output)
    assert images.num_rows == first.num_rows
    assert sorted(images.filter(pc.equal(images["status"], "error"))["tries"].to_pylist()) == [2] * 6
    settled = run_screen(replace(config, max_retries=2))
    assert (settled["files_scored"], settled["files_given_up"]) == (0, 6)
    assert images_table(output).num_rows == first.num_rows and settled["folders_unlisted"] == 0

    real_scandir = os.scandir  # a study folder the run may not read: its files cannot have rows, and the summary says so

    def locked_study(path: object) -> object:
        if os.fspath(path).endswith("study-normal"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", locked_study)
        locked = run_screen(replace(config, max_retries=2))
    assert (locked["folders_unlisted"], locked["files_listed"], locked["files_scored"]) == (1, settled["files_listed"] - 6, 0)

    extra = sorted((SAMPLES / "kermany-mini" / "PNEUMONIA").glob("*.jpeg"))[10:13]
    for path in extra:
        shutil.copy(path, archive / "study-normal" / path.name)
    grown = run_screen(replace(config, date="2026-11-28", max_retries=2))
    assert grown["files_scored"] == 3 and grown["studies_written"] == 1
    images = images_table(output)
    assert images.num_rows == first.num_rows + 3
    assert sorted(set(images["path"].to_pylist())) == listed(archive)  # every file once, none twice
    newest = read_table(str(output), "studies", filter=pc.field("scored_date") == "2026-11-28").to_pylist()
    assert [(row["study_id"], row["n_images"]) for row in newest] == [("study-normal", 9)]
    all_probs = [row["prob"] for row in images.to_pylist() if row["study_id"] == "study-normal"]
    assert newest[0]["prob"] == pytest.approx(max(all_probs))


def test_rerun_on_the_same_date_replaces_instead_of_duplicating(tmp_path: Path, model_dir: Path) -> None:
    archive = junk_archive(tmp_path / "archive")
    output = tmp_path / "out"
    config = ScreenConfig(model=str(model_dir), input=str(archive), output=str(output), date=DATE)
    run_screen(config)
    run_screen(config)
    images = images_table(output)
    assert images.num_rows == len(listed(archive)) == len(set(images["path"].to_pylist()))
    # 4 folder studies, the SR's own study and the header studies of the truncated and bomb DICOMs
    assert len(studies_table(output)) == 7
    assert len(list((output / "runs").glob("*.json"))) == 2


def screen_command(model_dir: Path, archive: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lungray.cli", "screen", "--model", str(model_dir), "--input", str(archive), "--output", str(output), "--date", DATE, *extra]


def big_archive(root: Path, copies: int) -> Path:
    for index in range(copies):
        shutil.copytree(SAMPLES / "kermany-mini", root / f"batch{index}")
    return root


@pytest.mark.slow
def test_driver_killed_after_a_chunk_commits_resumes_with_the_rest(tmp_path: Path, model_dir: Path) -> None:
    archive = big_archive(tmp_path / "archive", copies=2)
    output = tmp_path / "out"
    total, chunk = len(listed(archive)), 40
    command = screen_command(model_dir, archive, output, "--chunk-files", str(chunk))
    env = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and images_table(output).num_rows == 0:
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be killed: make the archive larger"
    os.kill(process.pid, signal.SIGKILL)  # the driver, by its PID
    process.wait()
    os.killpg(process.pid, signal.SIGKILL)  # then the local Ray it started, so the rerun has the cores
    committed = images_table(output)
    assert 0 < committed.num_rows < total and committed.num_rows % chunk == 0  # whole chunks only
    assert committed.num_rows == len(set(committed["path"].to_pylist()))

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)  # the same command
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    run = json.loads(next((output / "runs").glob("*.json")).read_text())
    assert run["files_scored"] == total - committed.num_rows and run["files_resumed"] == committed.num_rows
    assert len(run["resumes"]) == 1 and run["files_listed"] == total
    images = images_table(output)
    assert images.num_rows == total and sorted(images["path"].to_pylist()) == listed(archive)
    studies = studies_table(output)
    assert sorted(studies["study_id"].to_pylist()) == sorted(set(images["study_id"].to_pylist()))
    assert sum(studies["n_images"].to_pylist()) == total  # the interrupted run's studies were caught up too


def ray_worker_pids(title: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if title in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["MapWorker(MapBatches(Predictor))", "MapBatches(decode_for_screening)"])
def test_killing_a_worker_mid_run_still_gives_complete_outputs(tmp_path: Path, model_dir: Path, victim: str) -> None:
    archive = big_archive(tmp_path / "archive", copies=3)
    output = tmp_path / "out"
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = ray_worker_pids(f"ray::{victim}")
            if pids:
                time.sleep(1.0)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    config = ScreenConfig(model=str(model_dir), input=str(archive), output=str(output), date=DATE, files_per_task=8, batch_size=8, chunk_files=60)
    summary = run_screen(config)
    killer.join(timeout=5)
    assert killed, f"no {victim} process was found to kill"
    images = images_table(output)
    assert images.num_rows == summary["files_listed"] == len(listed(archive)) == len(set(images["path"].to_pylist()))
    assert summary["by_status"]["ok"] == len(listed(archive)) and summary["chunks"] == -(-len(listed(archive)) // 60)


def test_s3_archive_in_and_outputs_out(tmp_path: Path, model_dir: Path, s3_bucket: str) -> None:
    import boto3

    archive = junk_archive(tmp_path / "archive")
    client = boto3.client("s3")
    for path in listed(archive):
        client.upload_file(path, s3_bucket, f"archive/{Path(path).relative_to(archive)}")
    config = ScreenConfig(model=str(model_dir), input=f"s3://{s3_bucket}/archive", output=f"s3://{s3_bucket}/screen", date=DATE, incremental=True)
    summary = run_screen(config)
    assert summary["files_scored"] == 21

    images = read_table(f"s3://{s3_bucket}/screen", "images")
    assert images.num_rows == 21 and all(path.startswith(f"s3://{s3_bucket}/archive/") for path in images["path"].to_pylist())
    assert all(etag for etag in images["etag"].to_pylist())  # the listing's ETags, part of the incremental key
    assert read_table(f"s3://{s3_bucket}/screen", "studies").num_rows == 7  # as on a local archive (see the rerun test)
    again = run_screen(config)
    assert again["files_scored"] == 6  # the six junk files in error, retried (try 2 of 3)
    assert run_screen(replace(config, max_retries=2))["files_scored"] == 0
    client.put_object(Bucket=s3_bucket, Key="archive/junk/notes.txt", Body=b"changed, same name\n")  # a new ETag
    changed = run_screen(replace(config, max_retries=2))
    assert changed["files_scored"] == 1 and changed["files_replaced"] == 1
    assert open_table(f"s3://{s3_bucket}/screen", "images").version() >= 3  # every chunk a Delta commit on S3
    keys = [obj["Key"] for obj in client.list_objects_v2(Bucket=s3_bucket, Prefix="screen/")["Contents"]]
    assert sum(key.startswith("screen/runs/") and key.endswith(".json") for key in keys) == 4
    assert not any(key.startswith("screen/_lungray/active/") and key.endswith(".json") for key in keys)  # every lease released


def test_no_patient_name_or_id_in_outputs_or_logs(tmp_path: Path, model_dir: Path) -> None:
    archive = junk_archive(tmp_path / "archive")
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "lungray.cli", "--verbose", *screen_command(model_dir, archive, output)[3:]],
        cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for text in (result.stdout, result.stderr):
        assert PLANTED_ID not in text and "Prefect" not in text
    for path in output.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert PLANTED_ID.encode() not in content and b"Prefect" not in content, path


def test_explain_writes_an_overlay_for_each_flagged_study(tmp_path: Path) -> None:
    from PIL import Image

    flag_everything = untrained_model_dir(tmp_path / "model", threshold=0.0)
    archive = junk_archive(tmp_path / "archive")
    output = tmp_path / "out"
    run_screen(ScreenConfig(model=str(flag_everything), input=str(archive), output=str(output), date=DATE, explain=True))
    studies = {row["study_id"]: row for row in studies_table(output).to_pylist()}
    assert studies["junk"]["flagged"] is False and studies["junk"]["explain_path"] is None
    flagged = [row for row in studies.values() if row["flagged"]]
    assert len(flagged) == 3
    for row in flagged:
        overlay = Image.open(row["explain_path"])
        assert overlay.size == (64, 64) and overlay.mode in ("RGB", "RGBA")
    assert len(list((output / "explain" / f"scored_date={DATE}").glob("*.png"))) == 3


def test_two_models_explain_one_output_in_chunks_each_with_its_own_overlays_and_counts(tmp_path: Path) -> None:
    """Two models screen one OUTPUT on one date with --explain --pseudonymize --aggregate mean,
    in windows of 4 files. Each flagged study keeps an overlay of its own model (they shared a
    file, the second overwriting the first), also where its top image was committed in an
    earlier chunk than the one that last moved its mean (it was dropped: keyed paths of earlier
    chunks cannot be read again); and the run summary counts each study once, as it stands
    (each chunk's sync added its studies again)."""
    archive = junk_archive(tmp_path / "archive")
    output = tmp_path / "out"
    summaries = []
    for seed in (0, 1):
        model = untrained_model_dir(tmp_path / f"model{seed}", threshold=0.0, seed=seed)
        config = ScreenConfig(model=str(model), input=str(archive), output=str(output), date=DATE, explain=True, pseudonymize=True, aggregate="mean", chunk_files=4)
        summaries.append(run_screen(config))
    overlays = {}
    for summary in summaries:
        rows = [row for row in studies_table(output).to_pylist() if row["model_id"] == summary["model_id"]]
        flagged = [row for row in rows if row["flagged"]]
        assert summary["chunks"] > 1 and len(flagged) == 3
        assert summary["studies_written"] == len(rows) == 7 and {row["run_id"] for row in rows} == {summary["run_id"]}
        assert summary["studies_flagged"] == len(flagged)
        assert all(row["explain_path"] and Path(row["explain_path"]).is_file() for row in flagged)
        overlays[summary["model_id"]] = {row["explain_path"]: Path(row["explain_path"]).read_bytes() for row in flagged}
    first, second = overlays.values()
    assert not set(first) & set(second) and not set(first.values()) & set(second.values())


def test_dates_are_written_as_the_partition_contract_spells_them() -> None:
    """Python's fromisoformat also takes 20261207 and 2026-W49-1, which became a partition
    `scored_date=20261207` that no `scored_date = '2026-12-07'` filter finds."""
    config = ScreenConfig(model="m", input="dicomweb+http://pacs/dicom-web", output="o", date="20261207", since="2026-W49-1", until="2026-12-08")
    assert (config.date, config.since, config.until) == ("2026-12-07", "2026-11-30", "2026-12-08")
    with pytest.raises(ValueError):
        ScreenConfig(model="m", input="i", output="o", date="7/12/2026")


def test_actor_plan_follows_the_gpus_or_the_gpu_flag_and_leaves_cpus_to_decode() -> None:
    config = ScreenConfig(model="m", input="i", output="o", date=DATE)
    # One CPU actor per two CPUs; together they ask for at most half, so decode tasks always find one.
    assert plan_actors(config, {"CPU": 8.0}) == ActorPlan(4, {"num_cpus": 0.5}, 32, threads=2)
    assert plan_actors(config, {"CPU": 2.0}) == ActorPlan(1, {"num_cpus": 0.5}, 32, threads=2)
    assert plan_actors(config, {"CPU": 1.0}) == ActorPlan(1, {"num_cpus": 0.5}, 32, threads=1)
    four = ScreenConfig(model="m", input="i", output="o", date=DATE, actors=4)
    assert plan_actors(four, {"CPU": 2.0}) == ActorPlan(4, {"num_cpus": 0.25}, 32, threads=1)
    assert plan_actors(config, {"CPU": 16.0, "GPU": 2.0}) == ActorPlan(2, {"num_gpus": 1}, 512)
    # --gpu on a cluster whose GPU nodes are not up yet: GPU actors, which the autoscaler serves.
    wants_gpu = ScreenConfig(model="m", input="i", output="o", date=DATE, gpu=True)
    assert plan_actors(wants_gpu, {"CPU": 4.0}) == ActorPlan(1, {"num_gpus": 1}, 512)
    sized = ScreenConfig(model="m", input="i", output="o", date=DATE, gpu=True, actors=4, batch_size=256)
    assert plan_actors(sized, {"CPU": 4.0}) == ActorPlan(4, {"num_gpus": 1}, 256)
    with pytest.raises(ValueError, match="actors"):
        ScreenConfig(model="m", input="i", output="o", date=DATE, actors=0)


def test_the_listing_becomes_one_block_per_decode_task_in_order() -> None:
    listing = pa.table({"uri": [f"f{index}" for index in range(10)]})
    dataset = dataset_of_blocks(listing, 4)
    blocks = ray.get(dataset.to_arrow_refs())
    assert [block["uri"].to_pylist() for block in blocks] == [["f0", "f1", "f2", "f3"], ["f4", "f5", "f6", "f7"], ["f8", "f9"]]
    assert dataset.count() == 10 and dataset.schema().names == ["uri"]  # from the blocks' metadata
    assert ray.get(dataset_of_blocks(listing.slice(0, 0), 4).to_arrow_refs())[0].num_rows == 0


def scored_block(paths: list[str], replaces: list[bool]) -> pa.Table:
    """What the model actor hands on: the decode task's columns, the carried ones and `prob`."""
    n = len(paths)
    return pa.table({
        "path": paths, "study_id": ["s"] * n, "sop_uid": [None] * n, "status": ["ok"] * n, "error": [None] * n,
        "skip_reason": [None] * n, "size": [10] * n, "mtime_ns": [5] * n, "etag": [None] * n, "tries": pa.array([1] * n, pa.int32()),
        "replaces": replaces, "prob": [0.5] * n,
    })


def test_a_chunks_blocks_become_its_new_rows_its_replacing_rows_and_their_keys() -> None:
    blocks = [scored_block(["a", "b"], [False, True]), scored_block(["c"], [False]), scored_block([], [])]
    new, replacing, keys = chunk_rows("m1", "r1", DATE, None, *blocks)
    assert new.schema == IMAGE_SCHEMA and replacing.schema == IMAGE_SCHEMA
    assert new["path"].to_pylist() == ["a", "c"] and replacing["path"].to_pylist() == ["b"]
    assert new.select(["model_id", "run_id", "scored_date"]).to_pylist() == [{"model_id": "m1", "run_id": "r1", "scored_date": DATE}] * 2
    assert keys.to_pylist() == [
        {"path": "a", "status": "ok", "replaces": False}, {"path": "b", "status": "ok", "replaces": True}, {"path": "c", "status": "ok", "replaces": False},
    ]
    keyed, _, keyed_keys = chunk_rows("m1", "r1", DATE, Pseudonymizer("salt"), *blocks)
    assert keyed_keys["path"].to_pylist() == [Pseudonymizer("salt").key("path", path) for path in "abc"]  # checked as the table holds them
    assert keyed["path"].to_pylist() == keyed_keys["path"].to_pylist()[::2]


def test_files_per_task_keeps_cpus_busy_within_bounds() -> None:
    assert files_per_task(10, cpus=2) == 16  # small archives: the lower bound
    assert files_per_task(1000, cpus=2) == 125  # four tasks per CPU
    assert files_per_task(5_000_000, cpus=64) == 256  # huge archives: the upper bound
    with pytest.raises(ValueError, match="files_per_task"):
        ScreenConfig(model="m", input="i", output="o", date=DATE, files_per_task=0)


def test_progress_says_the_time_left_once_the_listing_is_known_to_be_done(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The listing's last batch was only known to be the last after its windows were scored, so
    every line but the run's final one said "still listing" and never the time left."""
    import logging

    from lungray.progress import PROGRESS_LOGGER

    archive = junk_archive(tmp_path / "archive")
    model = untrained_model_dir(tmp_path / "model")
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        run_screen(ScreenConfig(model=str(model), input=str(archive), output=str(tmp_path / "out"), date=DATE, chunk_files=4))
    lines = [record.getMessage() for record in caplog.records if record.name == PROGRESS_LOGGER]
    assert len(lines) > 2 and all("listing done" in line for line in lines)
    assert any("left" in line for line in lines[:-1])
