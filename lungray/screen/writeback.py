"""`--report-to`: a committed run's results stored back into the PACS, as DICOM SRs (and overlays).

Runs after the tables are published, so a PACS that refuses a store cannot undo a run:
each failure is counted (and logged with the server's reason, never a credential) in the
run summary. UIDs are deterministic (lungray.pacs.report / overlay), and `store_if_absent`
checks before storing, so a rerun stores nothing new.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Callable

import pyarrow as pa
import pydicom
from pydicom.dataset import Dataset

from lungray.io.listing import read_bytes
from lungray.pacs import dicomweb, overlay, report
from lungray.screen.explain import driving_images

log = logging.getLogger(__name__)

REPORT_CHOICES = ("flagged", "all")


def instance_header(path: str) -> Dataset:
    """A screened instance's attributes: WADO-RS metadata where the archive has it, else its retrieved file's header."""
    if dicomweb.is_dicomweb_uri(path):
        return dicomweb.retrieve_instance_header(path)
    return pydicom.dcmread(io.BytesIO(read_bytes(path)), stop_before_pixels=True)


def study_report(rows: list[dict], threshold: float, model_id: str) -> Dataset:
    return report.build_report([report.ScoredImage(instance_header(row["path"]), row["prob"]) for row in rows], threshold, model_id)


def study_overlay(image_path: str, png_uri: str, model_id: str) -> Dataset:
    return overlay.build_overlay(instance_header(image_path), read_bytes(png_uri), model_id)


def _store(report_to: str, build: Callable[[], Dataset], what: str, counts: dict[str, int]) -> None:
    """Build and store one object; its failure is counted and logged, never raised.

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
            return
        finally:
            if caught:
                log.info("%s: %d warning(s) about the source header, not shown (they may quote its values)", what, len(caught))
    counts["stored" if stored else "already_present"] += 1


def store_reports(
    report_to: str, which: str, with_overlays: bool, studies: pa.Table, images: pa.Table, threshold: float, model_id: str
) -> dict[str, dict[str, int]]:
    """Store an SR for each flagged (`which="all"`: each scored) study of `studies`, from its ok images in
    `images`; with `with_overlays`, also each flagged study's overlay PNG (`explain_path`) as a Secondary Capture."""
    if which not in REPORT_CHOICES:
        raise ValueError(f"report must be one of {REPORT_CHOICES}, got {which!r}")
    counts = {kind: {"stored": 0, "already_present": 0, "failed": 0} for kind in ("sr", "overlay")}
    chosen = [row for row in studies.to_pylist() if row["prob"] is not None and (row["flagged"] or which == "all")]
    by_study: dict[str, list[dict]] = {}
    for row in images.select(["path", "study_id", "status", "prob"]).to_pylist():
        if row["status"] == "ok" and row["prob"] is not None:
            by_study.setdefault(row["study_id"], []).append(row)
    for study in chosen:
        build = functools.partial(study_report, by_study.get(study["study_id"], []), threshold, model_id)
        _store(report_to, build, f"SR of study {study['study_id']}", counts["sr"])
    if with_overlays:
        flagged = [row for row in chosen if row["flagged"] and row["explain_path"]]
        driving = driving_images(images, [row["study_id"] for row in flagged])
        for study in flagged:
            image = driving.get(study["study_id"])
            if image is None:
                continue
            build = functools.partial(study_overlay, image["path"], study["explain_path"], model_id)
            _store(report_to, build, f"overlay of study {study['study_id']}", counts["overlay"])
    return counts
