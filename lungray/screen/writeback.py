"""`--report-to`: a run's results stored back into the PACS, as DICOM SRs (and overlays).

Each commit's study sync queues the studies it changed (`queue_reports`: one small file per
sync under OUTPUT/_lungray/writeback/<model>/); the run stores them when it ends
(`flush_reports`), from the tables as they then stand. So a study whose images span two
commits gets one SR with all of them, a run killed before its end leaves its queue to the
next run, and a store the PACS refused stays queued and is tried again by the next runs, up
to `max_tries` in all. Stores come after the tables are published, so a PACS that refuses
one cannot undo a run: each failure is counted (and logged with the server's reason, never a
credential) in the run summary. UIDs are deterministic (lungray.pacs.report / overlay), and
`store_if_absent` checks before storing, so storing the same result again stores nothing.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
import uuid
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pydicom
from pydicom.dataset import Dataset

from lungray.io.listing import filesystem_for, join_uri, read_bytes, write_whole
from lungray.pacs import dicomweb, overlay, report
from lungray.screen.studies import current_studies, driving_images, study_images
from lungray.screen.tables import open_table

log = logging.getLogger(__name__)

REPORT_CHOICES = ("flagged", "all")
QUEUE = "_lungray/writeback"


def instance_header(path: str) -> Dataset:
    """A screened instance's attributes: WADO-RS metadata where the archive has it, else its retrieved file's header."""
    if dicomweb.is_dicomweb_uri(path):
        return dicomweb.retrieve_instance_header(path)
    return pydicom.dcmread(io.BytesIO(read_bytes(path)), stop_before_pixels=True)


def study_report(rows: list[dict], threshold: float, model_id: str) -> Dataset:
    return report.build_report([report.ScoredImage(instance_header(row["path"]), row["prob"]) for row in rows], threshold, model_id)


def study_overlay(image_path: str, png_uri: str, model_id: str) -> Dataset:
    return overlay.build_overlay(instance_header(image_path), read_bytes(png_uri), model_id)


def _store(report_to: str, build: Callable[[], Dataset], what: str, counts: dict[str, int]) -> bool:
    """Build and store one object (True: stored or already present); a failure is counted and logged, never raised.

    highdicom and pydicom warn and fail with the header's values in their text (a patient name
    that is not in PN form, say), so their warnings are counted and their errors named by type
    only; the server's own failures (DicomwebError, scrubbed of credentials) are logged whole.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stored = dicomweb.store_if_absent(report_to, build())
        except Exception as exc:  # noqa: BLE001 - a refused store, an unreadable or odd header: counted, the run stands
            counts["failed"] += 1
            detail = str(exc) if isinstance(exc, dicomweb.DicomwebError) else f"{type(exc).__name__} (its text is not shown: it may quote the header)"
            log.warning("%s not stored: %s", what, detail)
            return False
        finally:
            if caught:
                log.info("%s: %d warning(s) about the source header, not shown (they may quote its values)", what, len(caught))
    counts["stored" if stored else "already_present"] += 1
    return True


class Reports(NamedTuple):
    """What a write-back did: per kind ("sr", "overlay"), how many were stored, already present
    or failed; and the studies with a failed store, to be tried again."""

    counts: dict[str, dict[str, int]]
    failed_studies: set[str]


def no_reports() -> dict[str, dict[str, int]]:
    return {kind: {"stored": 0, "already_present": 0, "failed": 0} for kind in ("sr", "overlay")}


def reported(studies: pa.Table, which: str) -> list[dict]:
    """The study rows `which` reports: flagged ones ("all": every one with a probability)."""
    if which not in REPORT_CHOICES:
        raise ValueError(f"report must be one of {REPORT_CHOICES}, got {which!r}")
    return [row for row in studies.to_pylist() if row["prob"] is not None and (row["flagged"] or which == "all")]


def store_reports(
    report_to: str, which: str, with_overlays: bool, studies: pa.Table, images: pa.Table, threshold: float, model_id: str
) -> Reports:
    """Store an SR for each flagged (`which="all"`: each scored) study of `studies`, from its ok images in
    `images`; with `with_overlays`, also each flagged study's overlay PNG (`explain_path`) as a Secondary Capture."""
    chosen = reported(studies, which)
    reports = Reports(no_reports(), set())
    by_study: dict[str, list[dict]] = {}
    for row in images.select(["path", "study_id", "status", "prob"]).to_pylist():
        if row["status"] == "ok" and row["prob"] is not None:
            by_study.setdefault(row["study_id"], []).append(row)
    for study in chosen:
        build = functools.partial(study_report, by_study.get(study["study_id"], []), threshold, model_id)
        if not _store(report_to, build, f"SR of study {study['study_id']}", reports.counts["sr"]):
            reports.failed_studies.add(study["study_id"])
    if with_overlays:
        flagged = [row for row in chosen if row["flagged"] and row["explain_path"]]
        driving = driving_images(images, [row["study_id"] for row in flagged])
        for study in flagged:
            image = driving.get(study["study_id"])
            if image is None:
                continue
            build = functools.partial(study_overlay, image["path"], study["explain_path"], model_id)
            if not _store(report_to, build, f"overlay of study {study['study_id']}", reports.counts["overlay"]):
                reports.failed_studies.add(study["study_id"])
    return reports


def queue_uri(output: str, model_id: str, name: str) -> str:
    return join_uri(output, QUEUE, model_id, f"{name}.json")


def queue_reports(output: str, model_id: str, which: str, studies: pa.Table, run_id: str) -> None:
    """Queue the studies of a sync's new rows that `which` reports, as one file of their own,
    named to sort after the run's earlier ones."""
    chosen = sorted({row["study_id"] for row in reported(studies, which)})
    if chosen:
        write_whole(queue_uri(output, model_id, f"{run_id}-{time.time_ns():020d}"), json.dumps({study: 1 for study in chosen}).encode())


def flush_reports(
    output: str, model_id: str, report_to: str, which: str, with_overlays: bool, threshold: float, max_tries: int
) -> dict[str, dict[str, int]]:
    """Store the model's queued studies from the tables as they stand, one queue file at a time
    (bounded memory on a backfill); a study whose store failed is queued again with one try
    more, and given up (logged) after `max_tries`. Returns the counts, with `given_up`."""
    counts = {**no_reports(), "given_up": {"studies": 0}}
    fs, folder = filesystem_for(join_uri(output, QUEUE, model_id))
    queued = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)) if info.path.endswith(".json"))
    images, studies = open_table(output, "images"), open_table(output, "studies")
    previous: set[str] = set()
    for path in queued:
        with fs.open_input_stream(path) as stream:
            tries: dict[str, int] = json.loads(stream.read())
        # A study whose images span two commits is in both of their (consecutive) files: stored once.
        tries, previous = {study: count for study, count in tries.items() if study not in previous}, set(tries)
        if images is not None and studies is not None and tries:
            ids = pa.array(sorted(tries), pa.string())
            done = store_reports(
                report_to, which, with_overlays, current_studies(studies, model_id, ids), study_images(images, model_id, ids), threshold, model_id
            )
            for kind, numbers in done.counts.items():
                for key, value in numbers.items():
                    counts[kind][key] += value
            retry = {study: tries[study] + 1 for study in done.failed_studies if tries[study] < max_tries}
            counts["given_up"]["studies"] += len(done.failed_studies) - len(retry)
            if len(retry) < len(done.failed_studies):
                log.warning("%d stud(ies) given up after %d failed write-backs", len(done.failed_studies) - len(retry), max_tries)
            if retry:
                write_whole(queue_uri(output, model_id, f"retry-{uuid.uuid4().hex}"), json.dumps(retry).encode())  # sorts after run ids
        fs.delete_file(path)
    return counts
