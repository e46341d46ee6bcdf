"""Privacy that fails closed: no salt no run, HMAC keys, `--pseudonymize`, Ray auth left alone."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import REPO, SAMPLES
from dicom_factory import dicom_bytes, dicom_dataset, with_patient_id_as_ul
from model_factory import untrained_model_dir

from lungray import raysession
from lungray.ingest import IngestConfig, SourceSpec
from lungray.io.decode import patient_key
from lungray.privacy import SALT_ENV, MissingSaltError, Pseudonymizer, resolve_salt, scrub_path
from lungray.screen.pipeline import ScreenConfig, run_screen
from lungray.screen.tables import read_table

PLANTED_FOLDER = "DOE_JANE_12345678"
PLANTED_STUDY_UID = "1.2.826.0.1.3680043.99.424242"
PLANTED_DATE = "19870412"


def test_patient_keys_are_hmac_sha256_under_the_site_salt() -> None:
    expected = hmac.new(b"site-secret", b"patient\x0012345678", hashlib.sha256).hexdigest()[:32]
    assert patient_key("12345678", "site-secret") == expected
    assert patient_key(" 12345678 ", "site-secret") == expected
    assert patient_key("12345678", "other-site") != expected
    assert patient_key("12345678", None) is None  # no salt, no key: never one under a public default
    assert patient_key("", "site-secret") is None


def test_without_a_salt_ingest_and_screen_refuse_unless_told_the_data_is_throwaway(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SALT_ENV, raising=False)
    with pytest.raises(MissingSaltError, match=SALT_ENV):
        IngestConfig(sources=(SourceSpec("in"),), output="out")
    with pytest.raises(MissingSaltError, match="--throwaway-salt"):
        ScreenConfig(model="m", input="i", output="o")
    IngestConfig(sources=(SourceSpec("in"),), output="out", throwaway_salt=True)
    ScreenConfig(model="m", input="i", output="o", throwaway_salt=True)
    first, second = resolve_salt(throwaway=True), resolve_salt(throwaway=True)
    assert first != second and len(first) == 64  # random for each run, so no key can be reversed
    monkeypatch.setenv(SALT_ENV, "site-secret")
    assert resolve_salt(throwaway=True) == "site-secret"  # the site's salt wins when there is one


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [["ingest", "IN", "OUT"], ["screen", "--model", "M", "--input", "IN", "--output", "OUT"]])
def test_the_cli_refuses_to_run_without_a_salt_with_exit_code_2(tmp_path: Path, command: list[str]) -> None:
    env = {key: value for key, value in os.environ.items() if key != SALT_ENV}
    done = subprocess.run([sys.executable, "-m", "lungray.cli", *command], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=100)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{SALT_ENV} is not set" in done.stderr and "--throwaway-salt" in done.stderr
    assert not (tmp_path / "OUT").exists()


def test_pseudonymizer_keys_identifying_columns_truncates_dates_and_scrubs_errors() -> None:
    path = f"/archive/{PLANTED_FOLDER}/{PLANTED_FOLDER}_pa.dcm"
    table = pa.table(
        {
            "path": [path, "/archive/b.png"],
            "relpath": [f"{PLANTED_FOLDER}/{PLANTED_FOLDER}_pa.dcm", "b.png"],
            "study_id": [PLANTED_STUDY_UID, "."],
            "sop_uid": ["1.2.3.4", None],
            "study_date": [PLANTED_DATE, None],
            "mtime_ns": pa.array([1_700_000_000_000_000_000, 5], pa.int64()),
            "error": [f"could not read file: PermissionError: [Errno 13] Permission denied: '{path}' ({PLANTED_FOLDER}_pa)", None],
            "label": [1, 0],
        }
    )
    out = Pseudonymizer("site-secret").table(table).to_pylist()
    assert out[0]["path"] == hmac.new(b"site-secret", f"path\x00{path}".encode(), hashlib.sha256).hexdigest()[:32]
    assert out[0]["relpath"] != out[0]["path"] and len(out[0]["relpath"]) == 32  # every kind keyed on its own
    assert out[1]["study_id"] != "." and out[1]["sop_uid"] is None
    assert out[0]["study_date"] == "1987" and out[1]["study_date"] is None
    assert out[0]["mtime_ns"] != 1_700_000_000_000_000_000 and out[0]["mtime_ns"] >= 0
    assert out[0]["error"].startswith("could not read file: PermissionError") and PLANTED_FOLDER not in out[0]["error"]
    assert [row["label"] for row in out] == [1, 0]
    again = Pseudonymizer("site-secret").table(table).to_pylist()
    assert again == out  # deterministic: the incremental ledger and study grouping still work
    assert Pseudonymizer("other-site").table(table).to_pylist()[0]["path"] != out[0]["path"]


def test_scrub_path_takes_every_form_of_the_path_and_leaves_the_words_of_the_message() -> None:
    assert scrub_path(None, "/a/b") is None
    # A lower-case folder name is a word of the message too: only the path's trailing parts take it.
    path = "/archive/data/DOE_JANE/1.2.840.99/truncated.dcm"
    assert scrub_path("truncated or malformed pixel data: attempt 2", path) == "truncated or malformed pixel data: attempt 2"
    # S3's messages quote the key; PACS' the instance's UID.
    key = "s3://bucket/DOE_JANE/x.dcm"
    assert scrub_path("reading key 'DOE_JANE/x.dcm' in bucket 'bucket'", key) == "reading key '<path>' in bucket 'bucket'"
    assert scrub_path("series 1.2.840.99 of DOE_JANE", path) == "series <path> of <path>"
    # A name that is no UTF-8 is listed as a file:// URI of its bytes; Python quotes the bytes.
    uri = "file:///archive/M%FCller_Hans/1.dcm"
    quoted = "[Errno 2] No such file or directory: b'/archive/M\\xfcller_Hans/1.dcm'"
    assert scrub_path(f"could not read file: {quoted}", uri) == "could not read file: [Errno 2] No such file or directory: b'<path>'"
    assert scrub_path("M\udcfcller_Hans", uri) == "<path>"  # the surrogate-escaped text of the same bytes


def test_pseudonymized_header_code_strings_keep_only_dicom_defined_terms() -> None:
    """A name or MRN is a valid code string, so a misused BodyPartExamined carried it into the
    skip reason and the raw columns of every output, under --pseudonymize too."""
    reason = "out of scope: BodyPartExamined {} is not one of CHEST,THORAX,LUNG"
    table = pa.table(
        {
            "modality": ["CT", "12345678", None],
            "body_part": ["Smithson", "knee ", "CHEST"],
            "view_position": ["LL", "PA", "['PA', 'LL']"],
            "skip_reason": [reason.format("SMITHSON"), reason.format("KNEE"), None],
        }
    )
    out = Pseudonymizer("site-secret").table(table).to_pydict()
    assert out == {
        "modality": ["CT", "<other value>", None],
        "body_part": ["<other value>", "KNEE", "CHEST"],
        "view_position": ["LL", "PA", "<other value>"],
        "skip_reason": [reason.format("<other value>"), reason.format("KNEE"), None],
    }


def test_an_output_keyed_one_way_refuses_a_run_keyed_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows keyed under another salt (a throwaway one, say) or not keyed at all match none of the
    ledger's and the studies' keys: every rerun into the output scored every file again and
    added a second row for each file and study. Refused before anything is read."""
    model = untrained_model_dir(tmp_path / "model")
    monkeypatch.setenv(SALT_ENV, "site-secret")

    def screen(output: str, **options: object) -> None:
        run_screen(ScreenConfig(model=str(model), input=str(tmp_path / "absent"), output=output, **options))

    keyed = str(tmp_path / "keyed")
    with pytest.raises(FileNotFoundError, match="input not found"):  # the keying is recorded first, then the listing fails
        screen(keyed, pseudonymize=True)
    with pytest.raises(FileNotFoundError):
        screen(keyed, pseudonymize=True)  # the same salt: allowed
    with pytest.raises(ValueError, match="holds pseudonymized rows.*pass --pseudonymize"):
        screen(keyed)
    monkeypatch.setenv(SALT_ENV, "another-site")
    with pytest.raises(ValueError, match="keyed under another salt"):
        screen(keyed, pseudonymize=True)
    monkeypatch.delenv(SALT_ENV)
    with pytest.raises(ValueError, match="keyed under another salt"):
        screen(keyed, pseudonymize=True, throwaway_salt=True)
    monkeypatch.setenv(SALT_ENV, "site-secret")
    plain = str(tmp_path / "plain")
    with pytest.raises(FileNotFoundError):
        screen(plain)
    with pytest.raises(FileNotFoundError):
        screen(plain)  # not pseudonymized, whatever the salt: paths are as listed
    with pytest.raises(ValueError, match="not pseudonymized.*leave out --pseudonymize"):
        screen(plain, pseudonymize=True)
    assert "site-secret" not in (tmp_path / "keyed" / "_lungray" / "keying.json").read_text()


def test_init_ray_leaves_the_auth_settings_of_a_cluster_it_joins_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "ray://cluster.example:10001")
    monkeypatch.setattr(raysession.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(raysession.ray, "init", lambda **kwargs: calls.append((kwargs, os.environ.get("RAY_AUTH_MODE"))))
    monkeypatch.setattr(raysession.ray, "cluster_resources", lambda: {})
    raysession.init_ray()
    assert calls == [({"address": "ray://cluster.example:10001", "log_to_driver": True}, None)]
    assert "RAY_AUTH_MODE" not in os.environ

    calls.clear()
    monkeypatch.setattr(raysession, "dashboard_installed", lambda: False)
    # A Ray of our own listens on every interface: its token authentication stays as Ray sets it
    # (on), so nobody who reaches its ports runs code in it or reads the salt from its environment.
    raysession.start_local_ray(num_cpus=1, object_store_memory=100_000_000)
    assert calls[0][1] is None
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    raysession.start_local_ray(num_cpus=1, object_store_memory=100_000_000)
    assert calls[1][1] == "disabled"  # the caller's choice


def text_of(path: Path) -> str:
    """Everything a reader can get out of a file: Parquet decoded (compression hides raw bytes), else its bytes."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        readable = table.drop_columns([name for name in table.column_names if name == "image"])
        return json.dumps(readable.to_pylist(), default=str)
    return path.read_bytes().decode("latin-1")


def planted_values_in(root: Path, needles: list[str]) -> dict[str, list[str]]:
    """{file: needles found} for every file under root."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_socket():
            text = text_of(path)
            hits = [needle for needle in needles if needle in text]
            if hits:
                found[str(path)] = hits
    return found


def test_the_planted_value_search_finds_a_value_inside_compressed_parquet(tmp_path: Path) -> None:
    """The detector the pseudonymization test relies on can fail: it reads Parquet decoded, so no encoding or
    compression of a page can hide a value from it."""
    path = f"/archive/{PLANTED_FOLDER}/x.dcm"
    pq.write_table(pa.table({"path": [path] * 50, "n": list(range(50))}), tmp_path / "t.parquet", compression="zstd")
    assert planted_values_in(tmp_path, [PLANTED_FOLDER, "JANE"]) == {str(tmp_path / "t.parquet"): [PLANTED_FOLDER, "JANE"]}


def planted_archive(root: Path) -> tuple[Path, list[str]]:
    """A study whose folder, file names and headers carry a patient's name and MRN; returns what must not leak."""
    study = root / PLANTED_FOLDER
    study.mkdir(parents=True)
    image = (np.arange(96 * 96, dtype=np.uint32).reshape(96, 96) % 241).astype(np.uint8)
    uids = [PLANTED_STUDY_UID]
    for name, view in (("pa", "PA"), ("ap", "AP"), ("lateral", "LL")):
        ds = dicom_dataset(
            image, patient_id="12345678", patient_name="DOE^JANE", StudyInstanceUID=PLANTED_STUDY_UID, StudyDate=PLANTED_DATE,
            ViewPosition=view, AccessionNumber="ACC12345678",
        )
        uids += [ds.SOPInstanceUID, ds.SeriesInstanceUID]
        (study / f"{PLANTED_FOLDER}_{name}.dcm").write_bytes(dicom_bytes(ds))
    # A misused code string (the MRN as body part) and a damaged PatientID, which pydicom quotes in its error.
    misused = dicom_dataset(image, patient_id="12345678", StudyInstanceUID=PLANTED_STUDY_UID, BodyPartExamined="12345678")
    damaged = dicom_dataset(image, patient_id="12345678X", StudyInstanceUID=PLANTED_STUDY_UID, StudyDate=PLANTED_DATE)
    uids += [misused.SOPInstanceUID, misused.SeriesInstanceUID, damaged.SOPInstanceUID, damaged.SeriesInstanceUID]
    (study / f"{PLANTED_FOLDER}_body.dcm").write_bytes(dicom_bytes(misused))
    (study / f"{PLANTED_FOLDER}_damaged.dcm").write_bytes(with_patient_id_as_ul(dicom_bytes(damaged)))
    (study / f"{PLANTED_FOLDER}_broken.dcm").write_bytes(dicom_bytes(dicom_dataset(image, patient_id="12345678", patient_name="DOE^JANE"))[:-3000])
    shutil.copy(next((SAMPLES / "kermany-mini" / "NORMAL").glob("*.jpeg")), study / f"JANE_DOE_{12345678}.jpeg")
    return root, ["DOE", "JANE", "12345678", PLANTED_DATE, *uids]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pseudonymized_ingest_and_screen_leave_no_planted_name_mrn_uid_or_date_anywhere(tmp_path: Path, ray_tmpdir: Path) -> None:
    archive, planted = planted_archive(tmp_path / "archive")
    assert planted_values_in(archive, planted)  # the search does find them where they are
    model = untrained_model_dir(tmp_path / "model", threshold=0.0)  # flags every study: overlays are written too
    output = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmpdir), "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "lungray.cli", "--verbose"]
    runs = [
        [*cli, "ingest", str(archive), str(output / "ingested"), "--size", "64", "--pseudonymize"],
        [*cli, "screen", "--model", str(model), "--input", str(archive), "--output", str(output / "screen"), "--date", "2026-11-27", "--pseudonymize", "--explain"],
        [*cli, "screen", "--model", str(model), "--input", str(archive), "--output", str(output / "screen"), "--date", "2026-11-28", "--pseudonymize", "--incremental", "--max-retries", "1"],
    ]
    logs, last_stdout = [], ""
    for command in runs:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append(done.stdout + done.stderr)
        last_stdout = done.stdout

    assert json.JSONDecoder().raw_decode(last_stdout)[0]["files_scored"] == 0  # keyed ledger: nothing scored twice
    summary = json.loads((output / "ingested" / "summary.json").read_text())
    assert summary["pseudonymized"] and summary["by_status"] == {"error": 1, "ok": 4, "skipped": 2}
    data = pq.read_table(output / "ingested" / "data").drop_columns(["image"]).to_pylist()
    assert {row["study_date"] for row in data if row["format"] == "dicom"} == {"1987"}
    assert len({row["study_id"] for row in data if row["format"] == "dicom"}) == 1  # still one study, under its key
    images = read_table(str(output / "screen"), "images").to_pylist()
    assert sorted(row["status"] for row in images) == ["error", "ok", "ok", "ok", "ok", "skipped", "skipped"]
    studies = read_table(str(output / "screen"), "studies", filter=pc.field("scored_date") == "2026-11-27").to_pylist()
    dicom_study = next(row for row in studies if row["n_skipped"] == 2)
    assert dicom_study["n_images"] == 5 and dicom_study["flagged"] and dicom_study["explain_path"] and Path(dicom_study["explain_path"]).is_file()

    assert planted_values_in(output, planted) == {}
    for log in logs:
        assert [value for value in planted if value in log] == []
    ray_logs = [folder for folder in ray_tmpdir.glob("ray/session_*/logs") if not folder.parent.is_symlink()]
    assert len(ray_logs) == 3, ray_logs
    for folder in ray_logs:
        assert planted_values_in(folder, planted) == {}
