"""DICOMweb input and SR output against a real Orthanc (tests/pacs_fixtures.py), plus the URI rules."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import io
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import CTImageStorage, ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, generate_uid

from conftest import SAMPLES
from dicom_factory import dicom_bytes, dicom_dataset
from lungray.pacs import dicomweb, dimse, overlay, report, source
from lungray.raysession import free_port
from lungray.report.gradcam import overlay_png
from lungray.screen.writeback import store_reports
from pacs_fixtures import OrthancServer, orthanc_installed, running_orthanc

SOP_CLASS = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation, "CT": CTImageStorage}
FAST = dicomweb.RequestPolicy(connect_timeout_s=2, read_timeout_s=5, retries=2, backoff_s=0.1, max_retry_after_s=0.2)


def make_instance(study_uid: str, study_date: str, modality: str, series_uid: str | None = None, seed: int = 0) -> pydicom.Dataset:
    """A small valid image of the given modality in the given study (pixels differ per seed)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)
    ds = dicom_dataset(
        pixels,
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid or generate_uid(),
        StudyDate=study_date,
        StudyTime="120000",
        Modality=modality,
        SOPClassUID=SOP_CLASS[modality],
    )
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def elements(ds: pydicom.Dataset) -> list[pydicom.DataElement]:
    """The data elements other than group lengths (retired; writers may drop them)."""
    return [element for element in ds if element.tag.element != 0]


def credentials(server: OrthancServer, password: str | None = None) -> dicomweb.Credentials:
    return dicomweb.Credentials(user=server.user, password=password or server.password)


def load(server: OrthancServer, datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        server.upload(dicom_bytes(ds))


def test_uri_rules() -> None:
    assert dicomweb.service_url("dicomweb+https://pacs.example:8443/dicom-web/") == "https://pacs.example:8443/dicom-web"
    uri = dicomweb.instance_uri("http://h:1/dw", "1.2.3", "1.2.4", "1.2.5")
    assert uri == "dicomweb+http://h:1/dw/studies/1.2.3/series/1.2.4/instances/1.2.5"
    assert dicomweb.parse_instance_uri(uri) == ("http://h:1/dw", "1.2.3", "1.2.4", "1.2.5")
    with pytest.raises(ValueError, match="must not hold credentials"):
        dicomweb.service_url("dicomweb+https://user:secret@pacs.example/dicom-web")
    with pytest.raises(ValueError, match="not a DICOMweb URI"):
        dicomweb.service_url("https://pacs.example/dicom-web")
    with pytest.raises(ValueError, match="instance URI"):
        dicomweb.parse_instance_uri("dicomweb+http://h:1/dw/studies/1.2.3")
    assert "secret" not in repr(dicomweb.Credentials(token="secret", user="u", password="secret"))


def test_search_keeps_only_the_date_range_and_modalities(orthanc: OrthancServer) -> None:
    inside, outside = [], []
    for index, (date, modality) in enumerate(
        [("20260110", "CR"), ("20260120", "DX"), ("20260131", "DX"), ("20260109", "CR"), ("20260201", "DX"), ("20260115", "CT")]
    ):
        ds = make_instance(generate_uid(), date, modality, seed=index)
        in_range = "20260110" <= date <= "20260131" and modality in ("CR", "DX")
        (inside if in_range else outside).append(ds)
    load(orthanc, inside + outside)

    records = list(dicomweb.search_instances(orthanc.uri, since="2026-01-10", until="2026-01-31", credentials=credentials(orthanc)))

    assert sorted(r.sop_uid for r in records) == sorted(str(ds.SOPInstanceUID) for ds in inside)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in inside}
    for record in records:
        source = by_sop[record.sop_uid]
        assert dicomweb.parse_instance_uri(record.path) == (
            orthanc.dicomweb_url, source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID
        )
        assert (record.modality, record.study_date, record.sop_class_uid) == (source.Modality, source.StudyDate, source.SOPClassUID)
    until_only = dicomweb.search_instances(orthanc.uri, until=dt.date(2026, 1, 10), credentials=credentials(orthanc))
    assert sorted(r.study_date for r in until_only) == ["20260109", "20260110"]
    since_only = dicomweb.search_instances(orthanc.uri, since="20260131", credentials=credentials(orthanc))
    assert sorted(r.study_date for r in since_only) == ["20260131", "20260201"]
    ct = list(dicomweb.search_instances(orthanc.uri, modalities=["CT"], credentials=credentials(orthanc)))
    assert [r.sop_uid for r in ct] == [str(outside[-1].SOPInstanceUID)]


def test_search_pages_return_every_instance_once(orthanc: OrthancServer) -> None:
    study = generate_uid()
    series = generate_uid()
    datasets = [make_instance(study, "20260105", "DX", series_uid=series, seed=i) for i in range(23)]
    load(orthanc, datasets)
    client = dicomweb.client_for(orthanc.dicomweb_url, credentials(orthanc))
    assert len(client.search_for_instances(limit=4, search_filters={"Modality": "DX"})) == 4  # the server pages

    records = list(dicomweb.search_instances(orthanc.uri, page_size=4, credentials=credentials(orthanc)))

    assert len(records) == 23
    assert {r.sop_uid for r in records} == {str(ds.SOPInstanceUID) for ds in datasets}


def test_search_is_a_stream(orthanc: OrthancServer) -> None:
    load(orthanc, [make_instance(generate_uid(), "20260105", "CR", seed=i) for i in range(6)])
    requests_made: list[str] = []
    client = dicomweb.client_for(orthanc.dicomweb_url, credentials(orthanc))
    client._session.hooks["response"].append(lambda response, *args, **kwargs: requests_made.append(response.url))
    try:
        stream = dicomweb.search_instances(orthanc.uri, page_size=2, credentials=credentials(orthanc))
        next(stream)
        assert len(requests_made) == 1  # one page fetched for the first record, not the whole listing
        assert len(list(stream)) == 5
        assert len(requests_made) == 3 + 1 + 1  # CR: three pages and the empty one; DX: one empty page
    finally:
        client._session.hooks["response"].clear()


def test_retrieve_returns_the_stored_bytes(orthanc: OrthancServer) -> None:
    samples = [path.read_bytes() for path in sorted((SAMPLES / "dicom").glob("*.dcm"))]
    stored = [data for data in samples if data[128:132] == b"DICM"]  # Part-10 files (CR and DX), byte for byte
    stored.append(dicom_bytes(make_instance(generate_uid(), "20260105", "DX")))
    for data in stored:
        orthanc.upload(data)
    records = list(dicomweb.search_instances(orthanc.uri, credentials=credentials(orthanc)))
    assert len(records) == len(stored) >= 3
    assert sorted(dicomweb.retrieve_instance_bytes(r.path, credentials(orthanc)) for r in records) == sorted(stored)


def test_stored_datasets_come_back_whole(orthanc: OrthancServer) -> None:
    originals = {}
    for path in sorted((SAMPLES / "dicom").glob("*.dcm")):
        ds = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in ds.file_meta:  # the preamble-less CR sample: give it the file meta it lacks
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        dicomweb.store_dataset(orthanc.uri, ds, credentials(orthanc))
        originals[str(ds.SOPInstanceUID)] = ds
    uris = {str(ds.SOPInstanceUID): dicomweb.instance_uri(orthanc.dicomweb_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in originals.values()}
    for sop, uri in uris.items():
        data = dicomweb.retrieve_instance_bytes(uri, credentials(orthanc))
        got = pydicom.dcmread(io.BytesIO(data))
        original = originals[sop]
        assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # as stored, not transcoded
        assert got.PixelData == original.PixelData
        assert elements(got) == elements(original)  # every data element, compared by pydicom
        header = dicomweb.retrieve_instance_header(uri, credentials(orthanc))
        assert header.SOPInstanceUID == sop and "PixelData" not in header


def test_unretrievable_instance_raises_a_clear_error(orthanc: OrthancServer) -> None:
    ds = make_instance(generate_uid(), "20260105", "CR")
    load(orthanc, [ds])
    (record,) = dicomweb.search_instances(orthanc.uri, credentials=credentials(orthanc))
    orthanc.delete_instance(record.sop_uid)
    with pytest.raises(dicomweb.DicomwebError, match=rf"retrieve of instance {record.sop_uid} .* failed: not found"):
        dicomweb.retrieve_instance_bytes(record.path, credentials(orthanc), FAST)


def test_bad_password_fails_fast_and_is_never_shown(orthanc: OrthancServer, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "wrong-" + orthanc.password
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    with pytest.raises(dicomweb.DicomwebError, match="rejected the credentials") as error:
        list(dicomweb.search_instances(orthanc.uri, credentials=credentials(orthanc, wrong)))
    assert time.monotonic() - start < 5
    assert wrong not in str(error.value) and wrong not in caplog.text
    assert error.value.__cause__ is None and error.value.__context__ is not None  # the library's error is suppressed


def test_credentials_come_from_the_environment(orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    load(orthanc, [make_instance(generate_uid(), "20260105", "DX")])
    monkeypatch.setenv(dicomweb.USER_VARIABLE, orthanc.user)
    monkeypatch.setenv(dicomweb.PASSWORD_VARIABLE, orthanc.password)
    caplog.set_level(logging.DEBUG)
    (record,) = dicomweb.search_instances(orthanc.uri)
    assert pydicom.dcmread(io.BytesIO(dicomweb.retrieve_instance_bytes(record.path))).SOPInstanceUID == record.sop_uid
    assert orthanc.password not in caplog.text
    token = "tok-" + orthanc.password
    monkeypatch.setenv(dicomweb.TOKEN_VARIABLE, token)  # a token wins over basic auth; Orthanc takes none
    with pytest.raises(dicomweb.DicomwebError, match="HTTP 401") as error:
        dicomweb.retrieve_instance_bytes(record.path)
    assert token not in str(error.value) and token not in caplog.text


def test_a_secret_from_a_file_is_trimmed_and_never_quoted_back() -> None:
    """A token with the newline a secret file ends with: requests refuses such a header, and its
    error quotes the value as a repr (`b'Bearer tok\\n'`), which a scrub of the raw secret missed:
    `lungray screen` printed the token. The token is now trimmed, and every quoted form scrubbed.
    requests' own error is the oracle of how a library quotes it."""
    assert dicomweb.Credentials.from_environment({dicomweb.TOKEN_VARIABLE: "tok-secret\n"}).token == "tok-secret"
    with pytest.raises(requests.exceptions.InvalidHeader) as refused:
        requests.Request("GET", "http://pacs.example/", headers={"Authorization": "Bearer tok-secret\n"}).prepare()
    assert "tok-secret" in str(refused.value)
    failure = dicomweb._failure("search", "http://pacs.example/", refused.value, ["tok-secret\n"])
    assert "tok-secret" not in str(failure) and "***" in str(failure)
    basic = dicomweb.Credentials(user="reader", password="pass-word")
    header = requests.Request("GET", "http://pacs.example/", auth=(basic.user, basic.password)).prepare().headers["Authorization"]
    leaked = dicomweb._failure("search", "http://pacs.example/", ValueError(f"bad header {header!r}"), basic.secrets)
    assert header.split()[1] not in str(leaked) and "pass-word" not in str(leaked)


def test_the_hospital_ca_is_used_whatever_requests_ca_bundle_says(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """requests lets REQUESTS_CA_BUNDLE override a session's `verify` (not a request's own): the
    CA lungray was given must be the one a request is sent with."""
    bundle = str(tmp_path / "hospital-ca.pem")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    sent_with: list[object] = []

    def send(adapter, request, **kwargs):  # noqa: ANN001, ANN202 - requests' HTTPAdapter.send
        sent_with.append(kwargs.get("verify"))
        raise requests.exceptions.ConnectionError("not sent")

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
    session = dicomweb.make_session(dicomweb.Credentials(ca_bundle=bundle), dicomweb.RequestPolicy())
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get("https://pacs.example/dicom-web/studies")
    assert sent_with == [bundle]


def test_refused_connection_fails_fast(caplog: pytest.LogCaptureFixture) -> None:
    uri = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    with pytest.raises(dicomweb.DicomwebError, match=r"cannot connect \(.*Connection refused\)") as error:
        list(dicomweb.search_instances(uri, credentials=dicomweb.Credentials(token="tok-secret")))
    assert time.monotonic() - start < 10  # three retries with backoff, then the error
    assert "tok-secret" not in str(error.value) and "tok-secret" not in caplog.text


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"dicomweb+http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
        policy = dicomweb.RequestPolicy(connect_timeout_s=1, read_timeout_s=1, retries=1, backoff_s=0.1)
        start = time.monotonic()
        with pytest.raises(dicomweb.DicomwebError, match=r"no answer in time \(read timeout\)"):
            list(dicomweb.search_instances(uri, credentials=dicomweb.Credentials(), policy=policy))
        assert time.monotonic() - start < 6  # two tries of one second each, not a hang


class _QidoHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in DICOMweb server's handler: JSON answers, no request log."""

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """The DICOMweb URI of a loopback server answering with `handler`, for the block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"dicomweb+http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


class _FlakyHandler(_QidoHandler):
    """Answers 503 to the first `failures` requests, then an empty QIDO result."""

    failures = 2
    seen = 0

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        type(self).seen += 1
        if type(self).seen <= type(self).failures:
            self.send_response(503)
            self.send_header("Retry-After", "3600")  # an hour: capped by the policy's max_retry_after_s
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.answer(b"[]")


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, type[_FlakyHandler]]]:
    handler = type("Handler", (_FlakyHandler,), {"seen": 0})
    with serving(handler) as uri:
        yield uri, handler


def test_transient_errors_are_retried(flaky_server: tuple[str, type[_FlakyHandler]]) -> None:
    uri, handler = flaky_server
    start = time.monotonic()
    assert list(dicomweb.search_instances(uri, modalities=["CR"], credentials=dicomweb.Credentials(), policy=FAST)) == []
    assert handler.seen == 3  # two 503s retried, then the answer
    assert time.monotonic() - start < 3  # Retry-After: 3600 honoured only up to 0.2 s
    handler.seen, handler.failures = 0, 10
    with pytest.raises(dicomweb.DicomwebError, match="HTTP 503"):
        list(dicomweb.search_instances(uri, modalities=["CR"], credentials=dicomweb.Credentials(), policy=FAST))
    assert handler.seen == 1 + FAST.retries  # bounded


class _OffsetIgnoringHandler(_QidoHandler):
    """Answers every QIDO search with the same one instance, whatever its offset."""

    seen = 0
    ITEM = {tag: {"vr": "UI", "Value": [uid]} for tag, uid in (("0020000D", "1.2.3"), ("0020000E", "1.2.4"), ("00080018", "1.2.5"))}

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        type(self).seen += 1
        self.answer(json.dumps([self.ITEM]).encode())


@pytest.mark.timeout(60)  # without the check the listing pages for ever
def test_a_server_that_ignores_offset_fails_the_listing_instead_of_paging_for_ever() -> None:
    listed = []
    with serving(_OffsetIgnoringHandler) as uri:
        with pytest.raises(dicomweb.DicomwebError, match="answered offset 1 with the page it gave for the one before"):
            for record in dicomweb.search_instances(uri, modalities=["DX"], credentials=dicomweb.Credentials(), policy=FAST):
                listed.append(record.sop_uid)
    assert listed == ["1.2.5"] and _OffsetIgnoringHandler.seen == 2


class _UnpagedHandler(_QidoHandler):
    """Answers every QIDO search with all of its three instances, whatever limit and offset say."""

    seen = 0

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        type(self).seen += 1
        items = [{tag: {"vr": "UI", "Value": [f"1.2.{index}.{tag[-1]}"]} for tag in ("0020000D", "0020000E", "00080018")} for index in range(3)]
        self.answer(json.dumps(items).encode())


@pytest.mark.timeout(60)
def test_a_server_that_answers_whole_whatever_the_limit_is_listed_once() -> None:
    """More than the page asked for is the whole answer: not a page to be followed by a repeat of it."""
    with serving(_UnpagedHandler) as uri:
        records = list(dicomweb.search_instances(uri, modalities=["DX"], page_size=2, credentials=dicomweb.Credentials(), policy=FAST))
    assert [record.sop_uid for record in records] == ["1.2.0.8", "1.2.1.8", "1.2.2.8"] and _UnpagedHandler.seen == 1


def test_report_round_trip_through_the_pacs(orthanc: OrthancServer) -> None:
    study = generate_uid()
    images = [make_instance(study, "20260105", "DX", seed=1), make_instance(study, "20260105", "CR", seed=2)]
    load(orthanc, images)
    creds = credentials(orthanc)
    records = sorted(dicomweb.search_instances(orthanc.uri, credentials=creds), key=lambda r: r.sop_uid)
    probabilities = {records[0].sop_uid: 0.91, records[1].sop_uid: 0.12}
    scored = [report.ScoredImage(dicomweb.retrieve_instance_header(r.path, creds), probabilities[r.sop_uid]) for r in records]

    sr = report.build_report(scored, threshold=0.5, model_id="cnn_lstm-0123abcd")
    assert dicomweb.store_if_absent(orthanc.uri, sr, creds) is True

    client = dicomweb.client_for(orthanc.dicomweb_url, creds)
    found = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
    assert [pydicom.Dataset.from_json(item).SOPInstanceUID for item in found] == [sr.SOPInstanceUID]
    stored = pydicom.dcmread(io.BytesIO(dicomweb.retrieve_instance_bytes(
        dicomweb.instance_uri(orthanc.dicomweb_url, study, sr.SeriesInstanceUID, sr.SOPInstanceUID), creds
    )))
    assert stored.PatientID == images[0].PatientID and stored.StudyInstanceUID == study
    assert "not for diagnosis" in stored.SeriesDescription and stored.VerificationFlag == "UNVERIFIED"
    content = report.read_report(stored)
    assert content.model_id == "cnn_lstm-0123abcd" and content.study_uid == study
    assert {image.sop_uid: image.probability for image in content.images} == probabilities
    assert {image.sop_uid: image.finding for image in content.images} == {records[0].sop_uid: "abnormal", records[1].sop_uid: "normal"}
    assert {image.threshold for image in content.images} == {0.5}
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study_item in stored.CurrentRequestedProcedureEvidenceSequence
        for series_item in study_item.ReferencedSeriesSequence
        for sop in series_item.ReferencedSOPSequence
    }
    assert evidence == set(probabilities)

    before = orthanc.instance_count()
    again = report.build_report(scored, threshold=0.5, model_id="cnn_lstm-0123abcd")  # a rerun of the night
    assert again.SOPInstanceUID == sr.SOPInstanceUID
    assert dicomweb.store_if_absent(orthanc.uri, again, creds) is False
    dicomweb.store_dataset(orthanc.uri, again, creds)  # even stored blindly, the same UID makes no second copy
    assert orthanc.instance_count() == before


def test_writing_back_never_shows_the_patients_name(orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A name without carets (as many modalities write it) makes highdicom warn with the name in
    the text (the oracle, below); such warnings reached the job's stderr once per SR and overlay."""
    monkeypatch.setenv(dicomweb.USER_VARIABLE, orthanc.user)
    monkeypatch.setenv(dicomweb.PASSWORD_VARIABLE, orthanc.password)
    study = generate_uid()
    image = make_instance(study, "20260105", "DX", seed=3)
    image.PatientName = "PREFECT FORD"
    load(orthanc, [image])
    (record,) = [found for found in dicomweb.search_instances(orthanc.uri, credentials=credentials(orthanc)) if found.study_uid == study]
    with pytest.warns(UserWarning, match="PREFECT FORD"):
        report.build_report([report.ScoredImage(dicomweb.retrieve_instance_header(record.path, credentials(orthanc)), 0.9)], 0.5, "model-x")

    studies = pa.table({"study_id": [study], "prob": [0.9], "flagged": [True], "explain_path": [None]})
    images = pa.table({"path": [record.path], "study_id": [study], "status": ["ok"], "prob": [0.9]})
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        counts, _ = store_reports(orthanc.uri, "flagged", False, studies, images, 0.5, "model-x")
    assert counts["sr"]["stored"] == 1
    assert not [warning for warning in escaped if "PREFECT" in str(warning.message)]
    assert "PREFECT" not in caplog.text and "warning(s) about the source header" in caplog.text


def test_dcmtk_reads_the_report_as_tid_1500(tmp_path) -> None:
    """DCMTK's dsrdump (installed with Orthanc) as an independent parser of the SR and its templates."""
    dsrdump = shutil.which("dsrdump")
    if dsrdump is None:
        pytest.skip("dsrdump (DCMTK) is not installed")
    study = generate_uid()
    path = tmp_path / "sr.dcm"
    sr = report.build_report([report.ScoredImage(make_instance(study, "20260105", "DX"), 0.73)], threshold=0.4, model_id="m1")
    path.write_bytes(dicomweb.dataset_bytes(sr))
    done = subprocess.run([dsrdump, "+Pt", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert any('"Imaging Measurement Report"' in line and "TID 1500 (DCMR)" in line for line in lines)
    assert any('"Measurement Group"' in line and "TID 1501 (DCMR)" in line for line in lines)
    assert '<contains NUM:(,,"Probability")="0.73" (1,UCUM,"no units")>' in done.stdout
    assert '<contains CODE:(,,"Overall Assessment")=(263654008,SCT,"Abnormal")>' in done.stdout
    assert "Verification Flag   : UNVERIFIED" in done.stdout


def test_report_uids_are_deterministic_per_model_study_and_result() -> None:
    """One series per model and study; one SR instance per result said in it, so that a rerun
    stores nothing new and a changed result (an image added later) is stored as a new SR."""
    study = generate_uid()
    first, second = make_instance(study, "20260105", "DX", seed=1), make_instance(study, "20260105", "DX", seed=2)
    one = report.build_report([report.ScoredImage(first, 0.7)], 0.5, "m1")
    assert one.SOPInstanceUID == report.build_report([report.ScoredImage(first, 0.7)], 0.5, "m1").SOPInstanceUID
    both = report.build_report([report.ScoredImage(second, 0.2), report.ScoredImage(first, 0.7)], 0.5, "m1")
    assert both.SeriesInstanceUID == one.SeriesInstanceUID and both.SOPInstanceUID != one.SOPInstanceUID
    for changed in (report.build_report([report.ScoredImage(first, 0.71)], 0.5, "m1"), report.build_report([report.ScoredImage(first, 0.7)], 0.6, "m1")):
        assert changed.SOPInstanceUID not in (one.SOPInstanceUID, both.SOPInstanceUID)
    uids = {*report.report_uids("m1", study, "a"), *report.report_uids("m2", study, "a"), *report.report_uids("m1", generate_uid(), "a")}
    assert len(uids) == 6
    other_study = make_instance(generate_uid(), "20260105", "DX")
    with pytest.raises(ValueError, match="one study"):
        report.build_report(
            [report.ScoredImage(make_instance(study, "20260105", "DX"), 0.3), report.ScoredImage(other_study, 0.4)], 0.5, "m1"
        )


def test_dimse_search_and_retrieve(orthanc: OrthancServer) -> None:
    """C-FIND (study, series, image levels) and C-GET against Orthanc's DICOM port."""
    inside = [make_instance(generate_uid(), date, modality, seed=i) for i, (date, modality) in enumerate([("20260110", "CR"), ("20260131", "DX")])]
    outside = [make_instance(generate_uid(), "20260201", "DX", seed=3), make_instance(generate_uid(), "20260115", "CT", seed=4)]
    study = generate_uid()
    series = generate_uid()
    inside += [make_instance(study, "20260112", "DX", series_uid=series, seed=5 + i) for i in range(3)]
    load(orthanc, inside + outside)
    jpeg_path = next((SAMPLES / "dicom").glob("siim_acr_*.dcm"))  # JPEG Baseline: must come back as stored
    orthanc.upload(jpeg_path.read_bytes())
    jpeg = pydicom.dcmread(jpeg_path)

    records = list(dimse.search_instances(orthanc.dimse_uri, since="2026-01-10", until="2026-01-31", calling_aet=orthanc.calling_aet))
    assert sorted(r.sop_uid for r in records) == sorted(str(ds.SOPInstanceUID) for ds in inside)
    for record in records:
        got = pydicom.dcmread(io.BytesIO(dimse.retrieve_instance_bytes(record.path, calling_aet=orthanc.calling_aet)))
        assert got.SOPInstanceUID == record.sop_uid and got.StudyInstanceUID == record.study_uid
    (jpeg_record,) = [r for r in dimse.search_instances(orthanc.dimse_uri, calling_aet=orthanc.calling_aet) if r.sop_uid == jpeg.SOPInstanceUID]
    got = pydicom.dcmread(io.BytesIO(dimse.retrieve_instance_bytes(jpeg_record.path, calling_aet=orthanc.calling_aet)))
    assert got.file_meta.TransferSyntaxUID == jpeg.file_meta.TransferSyntaxUID and got.PixelData == jpeg.PixelData

    orthanc.delete_instance(records[0].sop_uid)
    with pytest.raises(dimse.DimseError, match=rf"C-GET of instance {records[0].sop_uid} .* returned 0 instances"):
        dimse.retrieve_instance_bytes(records[0].path, calling_aet=orthanc.calling_aet)


def test_c_get_brings_jpeg_lossless_back_as_stored(tmp_path) -> None:
    """JPEG Lossless process 14 (.57), the syntax of many older CR archives, is proposed in
    the C-GET, so the archive sends the stored codestream instead of transcoding it (Orthanc
    stores this film as .57 by its IngestTranscoding, and sends it decompressed when .57 is
    not proposed); lungray then decodes it to the stored values."""
    if orthanc_installed() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    pixels = np.random.default_rng(7).integers(0, 4096, (64, 64), dtype=np.uint16)
    ds = dicom_dataset(pixels, StudyInstanceUID=generate_uid(), StudyDate="20260110", Modality="CR", SOPClassUID=ComputedRadiographyImageStorage)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    with running_orthanc(tmp_path, IngestTranscoding=pydicom.uid.JPEGLossless) as archive:
        archive.upload(dicom_bytes(ds))
        (record,) = dimse.search_instances(archive.dimse_uri, calling_aet=archive.calling_aet)
        got = pydicom.dcmread(io.BytesIO(dimse.retrieve_instance_bytes(record.path, calling_aet=archive.calling_aet)))
    assert got.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLossless
    np.testing.assert_array_equal(got.pixel_array, pixels)


@contextlib.contextmanager
def dropping_proxy(port: int, drops: int) -> Iterator[int]:
    """A TCP port that closes its first `drops` connections at once (an archive restarting),
    then forwards each later one to `port`; yields the proxy's port."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = 0

    def pipe(sender: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := sender.recv(65536):
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def serve() -> None:
        nonlocal accepted
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                accepted += 1
                if accepted <= drops:
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", port))
                for sender, target in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pipe, args=(sender, target), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_dimse_connections_the_archive_drops_are_tried_again(orthanc: OrthancServer) -> None:
    """An association the archive drops (a restart, a full pool) is tried again with backoff,
    as DICOMweb requests are, rather than failing the listing or the film at once."""
    ds = make_instance(generate_uid(), "20260110", "CR", seed=11)
    load(orthanc, [ds])
    record = next(r for r in dimse.search_instances(orthanc.dimse_uri, calling_aet=orthanc.calling_aet) if r.sop_uid == ds.SOPInstanceUID)
    patient = dimse.Timeouts(association_s=2, retries=2, backoff_s=0.05)
    with dropping_proxy(orthanc.dicom_port, drops=2) as port:
        proxied = record.path.replace(f":{orthanc.dicom_port}/", f":{port}/")
        got = pydicom.dcmread(io.BytesIO(dimse.retrieve_instance_bytes(proxied, calling_aet=orthanc.calling_aet, timeouts=patient)))
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    with dropping_proxy(orthanc.dicom_port, drops=2) as port:
        listed = list(dimse.search_instances(f"dimse://{orthanc.aet}@127.0.0.1:{port}", calling_aet=orthanc.calling_aet, timeouts=patient))
    assert ds.SOPInstanceUID in {r.sop_uid for r in listed}
    with dropping_proxy(orthanc.dicom_port, drops=3) as port, pytest.raises(dimse.DimseError, match="cannot connect .* 3 tries"):
        dimse.retrieve_instance_bytes(record.path.replace(f":{orthanc.dicom_port}/", f":{port}/"), calling_aet=orthanc.calling_aet, timeouts=patient)


def test_a_busy_archive_is_tried_again_and_an_unknown_caller_is_not() -> None:
    """An archive whose association pool is full rejects for now (A-ASSOCIATE-RJ, result 2):
    tried again, as the pool frees; one that does not know the caller rejects for good
    (result 1): refused at once with what to check. pynetdicom's own SCP is the archive."""
    from pynetdicom import AE, evt as events
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

    def no_matches(event: events.Event) -> Iterator[tuple[int, None]]:
        yield from ()

    port = free_port()
    archive = AE(ae_title="ARCHIVE")
    archive.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    archive.add_supported_context(Verification)
    archive.maximum_associations = 1
    server = archive.start_server(("127.0.0.1", port), block=False, evt_handlers=[(events.EVT_C_FIND, no_matches)])
    try:
        other = AE(ae_title="OTHER")
        other.add_requested_context(Verification)
        held = other.associate("127.0.0.1", port, ae_title="ARCHIVE")  # the pool's one association
        assert held.is_established
        threading.Timer(0.3, held.release).start()
        patient = dimse.Timeouts(association_s=2, retries=2, backoff_s=0.5)
        assert list(dimse.search_instances(f"dimse://ARCHIVE@127.0.0.1:{port}", calling_aet="LUNGRAY", timeouts=patient)) == []
        archive.maximum_associations, archive.require_calling_aet = 10, ["SOMEONE"]
        start = time.monotonic()
        with pytest.raises(dimse.DimseError, match="rejected .* calling AE title 'LUNGRAY'"):
            list(dimse.search_instances(f"dimse://ARCHIVE@127.0.0.1:{port}", calling_aet="LUNGRAY", timeouts=patient))
        assert time.monotonic() - start < 0.5  # not retried
    finally:
        server.shutdown()


def test_a_capped_c_find_says_what_stopped_it(tmp_path) -> None:
    """An archive at its C-FIND result limit ends the search with 0xFE00 (Orthanc with
    LimitFindResults=2, three studies): the run stops, saying why and what to do, rather than
    listing two of the three studies or naming a bare status code."""
    if orthanc_installed() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    with running_orthanc(tmp_path, LimitFindResults=2) as capped:
        load(capped, [make_instance(generate_uid(), "20260110", "DX", seed=index) for index in range(3)])
        with pytest.raises(dimse.DimseError, match=r"ended early after \d+ matches \(status 0xFE00.*narrow the dates"):
            list(dimse.search_instances(capped.dimse_uri, calling_aet=capped.calling_aet))


def test_dimse_failures_are_clear_and_quick(orthanc: OrthancServer) -> None:
    start = time.monotonic()
    with pytest.raises(dimse.DimseError, match="aborted or timed out .* 'STRANGER'"):
        list(dimse.search_instances(orthanc.dimse_uri, calling_aet="STRANGER"))
    with pytest.raises(dimse.DimseError, match="cannot connect"):
        list(dimse.search_instances(f"dimse://PACS@127.0.0.1:{free_port()}", calling_aet=orthanc.calling_aet))
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="dimse://AET@HOST:PORT"):
        dimse.parse_uri("dimse://127.0.0.1:104")


def test_overlay_secondary_capture_round_trip(orthanc: OrthancServer) -> None:
    source = make_instance(generate_uid(), "20260105", "DX", seed=9)
    load(orthanc, [source])
    creds = credentials(orthanc)
    (record,) = dicomweb.search_instances(orthanc.uri, credentials=creds)
    header = dicomweb.retrieve_instance_header(record.path, creds)
    heat = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    png = overlay_png(source.pixel_array, heat)

    sc = overlay.build_overlay(header, png, model_id="m1")
    assert dicomweb.store_if_absent(orthanc.uri, sc, creds) is True
    assert dicomweb.store_if_absent(orthanc.uri, overlay.build_overlay(header, png, model_id="m1"), creds) is False

    stored = pydicom.dcmread(io.BytesIO(dicomweb.retrieve_instance_bytes(
        dicomweb.instance_uri(orthanc.dicomweb_url, source.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID), creds
    )))
    assert stored.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and stored.StudyInstanceUID == source.StudyInstanceUID
    assert stored.PatientID == source.PatientID
    assert list(stored.ImageType) == ["DERIVED", "SECONDARY"] and "not for diagnosis" in stored.SeriesDescription
    assert stored.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(stored.pixel_array, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    assert orthanc.instance_count() == 2


def test_source_dispatches_on_the_uri(orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dicomweb.USER_VARIABLE, orthanc.user)
    monkeypatch.setenv(dicomweb.PASSWORD_VARIABLE, orthanc.password)
    monkeypatch.setenv(dimse.CALLING_AET_VARIABLE, orthanc.calling_aet)
    ds = make_instance(generate_uid(), "20260105", "CR")
    load(orthanc, [ds])
    for uri in (orthanc.uri, orthanc.dimse_uri):
        assert source.is_pacs_uri(uri)
        (record,) = source.search_instances(uri, since="2026-01-01", until="2026-01-31")
        assert record.path.startswith(uri + "/studies/") and record.sop_uid == ds.SOPInstanceUID
        assert pydicom.dcmread(io.BytesIO(source.retrieve_instance_bytes(record.path))).SOPInstanceUID == ds.SOPInstanceUID
        orthanc.delete_instance(record.sop_uid)
        with pytest.raises(source.PacsError):
            source.retrieve_instance_bytes(record.path)
        load(orthanc, [ds])
    assert not source.is_pacs_uri("s3://bucket/night") and not source.is_pacs_uri("/archive/night")
