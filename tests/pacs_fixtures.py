"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on loopback.

One Orthanc per test session (started and stopped here, with a temporary configuration and
storage); the function-scoped `orthanc` fixture empties it before each test so that tests
never see each other's studies. Without the packages (`apt-get install orthanc
orthanc-dicomweb`) every test that asks for it is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from lungray.pacs import dicomweb
from lungray.raysession import free_port

ORTHANC_EXECUTABLE = "Orthanc"
DICOMWEB_PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),  # Debian / Ubuntu orthanc-dicomweb
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
# The test Orthanc's account, in lungray's variables from the start of the session: Ray's
# workers read credentials from their environment, fixed when Ray starts (whichever test starts it).
TEST_USER = os.environ.setdefault(dicomweb.USER_VARIABLE, "lungray-test")
TEST_PASSWORD = os.environ.setdefault(dicomweb.PASSWORD_VARIABLE, secrets.token_urlsafe(16))


@dataclass(frozen=True)
class OrthancServer:
    """Where the test Orthanc listens and the one account it accepts."""

    rest_url: str  # Orthanc's own REST API, e.g. http://127.0.0.1:PORT
    dicomweb_url: str  # http://127.0.0.1:PORT/dicom-web
    user: str
    password: str = field(repr=False)
    dicom_port: int
    aet: str
    calling_aet: str  # the one DIMSE peer Orthanc knows (C-FIND and C-GET allowed, from 127.0.0.1)

    @property
    def dimse_uri(self) -> str:
        return f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def uri(self) -> str:
        """The input URI lungray takes: dicomweb+http://127.0.0.1:PORT/dicom-web."""
        return "dicomweb+" + self.dicomweb_url

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    def upload(self, data: bytes) -> str:
        """Store one Part-10 file through Orthanc's REST API; returns Orthanc's instance id."""
        response = requests.post(f"{self.rest_url}/instances", data=data, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()["ID"]

    def orthanc_id(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None when it holds none."""
        response = requests.post(f"{self.rest_url}/tools/lookup", data=sop_instance_uid, auth=self.auth, timeout=10)
        response.raise_for_status()
        ids = [item["ID"] for item in response.json() if item["Type"] == "Instance"]
        return ids[0] if ids else None

    def delete_instance(self, sop_instance_uid: str) -> None:
        orthanc_id = self.orthanc_id(sop_instance_uid)
        assert orthanc_id is not None, "no such instance in Orthanc"
        requests.delete(f"{self.rest_url}/instances/{orthanc_id}", auth=self.auth, timeout=10).raise_for_status()

    def instance_count(self) -> int:
        response = requests.get(f"{self.rest_url}/instances", auth=self.auth, timeout=10)
        response.raise_for_status()
        return len(response.json())

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        response = requests.get(f"{self.rest_url}/patients", auth=self.auth, timeout=10)
        response.raise_for_status()
        for patient in response.json():
            requests.delete(f"{self.rest_url}/patients/{patient}", auth=self.auth, timeout=10).raise_for_status()


def _plugin_path() -> Path | None:
    return next((path for path in DICOMWEB_PLUGIN_PATHS if path.exists()), None)


def _wait_until_answering(server: OrthancServer, process: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if requests.get(f"{server.dicomweb_url}/studies", auth=server.auth, timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"Orthanc did not answer within 30 s:\n{log.read_text()[-2000:]}")


def orthanc_installed() -> tuple[str, Path] | None:
    """(Orthanc executable, DICOMweb plugin) when both are installed."""
    executable = shutil.which(ORTHANC_EXECUTABLE) or shutil.which(ORTHANC_EXECUTABLE, path="/usr/sbin:/usr/local/sbin")
    plugin = _plugin_path()
    return (executable, plugin) if executable and plugin else None


@contextlib.contextmanager
def running_orthanc(root: Path, **settings: object) -> Iterator[OrthancServer]:
    """Orthanc with DICOMweb on 127.0.0.1 (free HTTP and DICOM ports), basic auth on, storage under
    `root`; `settings` are more top-level configuration (e.g. LimitFindResults=5).

    Also used by bench/pacs.py; raises RuntimeError when Orthanc is missing or does not start.
    """
    installed = orthanc_installed()
    if installed is None:
        raise RuntimeError("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    executable, plugin = installed
    storage = root / "storage"
    storage.mkdir(parents=True)
    http_port, dicom_port = free_port(), free_port()
    server = OrthancServer(
        rest_url=f"http://127.0.0.1:{http_port}",
        dicomweb_url=f"http://127.0.0.1:{http_port}/dicom-web",
        user=TEST_USER,
        password=TEST_PASSWORD,
        dicom_port=dicom_port,
        aet="ORTHANCTEST",
        calling_aet="LUNGRAYTEST",
    )
    config = {
        "Name": "lungray-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": server.aet,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {server.user: server.password},
        "DicomModalities": {
            "lungray": {"AET": server.calling_aet, "Host": "127.0.0.1", "Port": free_port(), "AllowFind": True, "AllowGet": True}
        },
        "DicomCheckModalityHost": True,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{http_port}"},
        "HttpCompressionEnabled": False,
        "SaveJobs": False,
        **settings,
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = root / "orthanc.log"
    with log.open("w") as log_file:
        process = subprocess.Popen([executable, str(config_path)], stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
    try:
        _wait_until_answering(server, process, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """The session's Orthanc (see running_orthanc); a skip with the reason where it is not installed."""
    if orthanc_installed() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def orthanc(orthanc_server: OrthancServer) -> OrthancServer:
    """The session's Orthanc, emptied for this test."""
    orthanc_server.clear()
    return orthanc_server
