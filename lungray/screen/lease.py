"""One screen per model and OUTPUT at a time, and what an interrupted run left to resume.

Delta's optimistic concurrency lets two runs commit into one table, and runs of different
models do. Two runs of the same model over the same files would each append a row per
file: blind appends, which no table format reports as a conflict. So each run keeps a
marker, `OUTPUT/_lungray/active/<model_id>/<run_id>.json`, with a heartbeat: it writes its
marker, then reads the others; if another live one is there it withdraws and fails with a
message naming the other run. (Write-then-read means two racing runs cannot both miss each
other; at worst both withdraw.) A marker whose process is gone (same host, dead pid) or
whose heartbeat is stale is an interrupted run: a rerun of the same command (same
fingerprint) resumes it, skipping the files that run committed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import pyarrow.fs as pafs

from lungray.io.listing import filesystem_for

log = logging.getLogger(__name__)

ACTIVE = "_lungray/active"
HEARTBEAT_SECONDS = 15.0
STALE_AFTER_SECONDS = 120.0


class ConcurrentRunError(RuntimeError):
    """Another screen of the same model is writing into this OUTPUT."""


@dataclass(frozen=True)
class Marker:
    run_id: str
    model_id: str
    fingerprint: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    state: str = "running"  # or "failed": kept so that a rerun resumes it
    resumes: tuple[str, ...] = field(default_factory=tuple)


def fingerprint(settings: dict) -> str:
    """The same command, as far as resuming goes: what decides which files and rows a run writes."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(marker: Marker, now: float) -> bool:
    if marker.state != "running" or now - marker.heartbeat_at > STALE_AFTER_SECONDS:
        return False
    return marker.host != socket.gethostname() or pid_alive(marker.pid)


class Lease:
    """The run's marker: acquired before the first read of the tables, released after the last commit."""

    def __init__(self, output: str, model_id: str, run_id: str, fingerprint: str) -> None:
        self.fs, root = filesystem_for(output)
        self.folder = posixpath.join(root, ACTIVE, model_id)
        now = time.time()
        self.marker = Marker(run_id, model_id, fingerprint, socket.gethostname(), os.getpid(), now, now)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def path(self) -> str:
        return posixpath.join(self.folder, f"{self.marker.run_id}.json")

    def _write(self, marker: Marker) -> None:
        """Replace the marker whole: a reader that saw it half-written would skip it as no
        claim and take the lease beside this live run. An object store's PUT is atomic; a
        local or NFS file is written beside the marker and renamed over it."""
        self.marker = marker
        self.fs.create_dir(self.folder, recursive=True)
        body = json.dumps(asdict(marker)).encode()
        if self.fs.type_name != "local":
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(body)
            return
        staging = f"{self.path}.partial"  # not *.json: never read as a claim
        with self.fs.open_output_stream(staging) as stream:
            stream.write(body)
        self.fs.move(staging, self.path)

    def _others(self) -> list[Marker]:
        if self.fs.get_file_info(self.folder).type != pafs.FileType.Directory:
            return []
        markers = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.folder)):
            if info.type != pafs.FileType.File or info.path == self.path or not info.path.endswith(".json"):
                continue
            try:
                with self.fs.open_input_stream(info.path) as stream:
                    raw = json.loads(stream.read())
            except (OSError, ValueError):  # removed by its run while we listed, or half-written: not a claim
                continue
            markers.append(Marker(**{**raw, "resumes": tuple(raw.get("resumes", ()))}))
        return markers

    def acquire(self) -> tuple[str, ...]:
        """Claim the OUTPUT for this model; returns the runs this one resumes (oldest first)."""
        self._write(self.marker)
        others = self._others()
        now = time.time()
        live = [other for other in others if is_live(other, now)]
        if live:
            self.fs.delete_file(self.path)
            other = live[0]
            raise ConcurrentRunError(
                f"another screen of model {other.model_id} is writing into this output: run {other.run_id} on {other.host} "
                f"(pid {other.pid}), started {dt.datetime.fromtimestamp(other.started_at, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, "
                f"heartbeat {now - other.heartbeat_at:.0f} s ago. Nothing was written; run again when it has finished."
            )
        interrupted = sorted((other for other in others if other.fingerprint == self.marker.fingerprint), key=lambda m: m.started_at)
        resumes = tuple(dict.fromkeys(run for other in interrupted for run in (*other.resumes, other.run_id)))
        if interrupted:
            self._write(replace(self.marker, resumes=resumes))
            for other in interrupted:
                self.fs.delete_file(posixpath.join(self.folder, f"{other.run_id}.json"))
            log.warning("resuming interrupted run(s) %s: their committed files are not scored again", ", ".join(resumes))
        self._beat = threading.Thread(target=self._heartbeat, name="lungray-lease", daemon=True)
        self._beat.start()
        return resumes

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write(replace(self.marker, heartbeat_at=time.time()))
            except OSError as exc:  # a storage hiccup: the next beat tries again, well within the stale limit
                log.warning("lease heartbeat failed: %s", exc)

    def release(self, failed: bool) -> None:
        """Drop the claim; a failed run leaves its marker (state `failed`) for its rerun to resume."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if failed:
            self._write(replace(self.marker, state="failed", heartbeat_at=time.time()))
        else:
            self.fs.delete_file(self.path)
