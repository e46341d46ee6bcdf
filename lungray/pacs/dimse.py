"""A PACS without DICOMweb, reached with DIMSE: C-FIND to list, C-GET to fetch (pynetdicom).

`dimse://AET@HOST:PORT` names the archive (AET is its called AE title); lungray calls as
`LUNGRAY_DIMSE_AET` (default LUNGRAY), which the archive must know (and allow C-FIND and
C-GET for). C-GET brings the instance back over the same association, so unlike C-MOVE the
archive needs no route back to the caller's host and port. Searches are hierarchical (study,
then series, then image level), the one query model every Study Root SCP must answer; each
instance then has a URI `dimse://AET@HOST:PORT/studies/S/series/R/instances/I`.

DIMSE carries no password: access is by AE title and host, as the archive is configured.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from lungray.pacs.dicomweb import DEFAULT_MODALITIES, InstanceRecord

SCHEME = "dimse://"
CALLING_AET_VARIABLE = "LUNGRAY_DIMSE_AET"
DEFAULT_CALLING_AET = "LUNGRAY"
# The SOP classes a chest radiograph arrives as; C-GET can only return classes proposed here.
RETRIEVABLE_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
# Stored syntaxes the decoder reads (pydicom + pylibjpeg), so the archive need not transcode:
# an archive that cannot transcode a syntax not proposed fails the C-GET, and one that can
# spends its CPU on it. 4 classes x 15 syntaxes + 1 stays under the 128 contexts DICOM allows.
ACCEPTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)
_ARCHIVE = re.compile(r"^dimse://(?P<aet>[^@/]{1,16})@(?P<host>[^:/]+):(?P<port>\d+)(?P<rest>/.*)?$")
_INSTANCE_PATH = re.compile(r"^/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)$")
_SUCCESS, _PENDING = 0x0000, (0xFF00, 0xFF01)
_ACCEPTED, _REJECTED_TRANSIENT = 0x00, 0x02  # A-ASSOCIATE results (PS3.8 9.3.4)
_MATCHING_TERMINATED = 0xFE00  # "matching terminated due to Cancel": what archives answer at their result limit


class DimseError(RuntimeError):
    """A DIMSE operation failed; the message names the archive and the reason."""


@dataclass(frozen=True)
class Archive:
    """Where a DIMSE archive listens and the AE titles on both ends."""

    called_aet: str
    host: str
    port: int
    calling_aet: str

    def __str__(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for the association, for each DIMSE message and for the network."""

    association_s: float = 10.0
    dimse_s: float = 60.0
    network_s: float = 60.0
    retries: int = 3  # a refused or aborted association is tried again this many times (as DICOMweb's requests are)
    backoff_s: float = 0.5  # waits backoff * 2**n seconds before try n + 1


def is_dimse_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse_uri(uri: str, calling_aet: str | None = None) -> tuple[Archive, str]:
    """(archive, the path after HOST:PORT) of a `dimse://AET@HOST:PORT[/...]` URI."""
    match = _ARCHIVE.match(uri)
    if match is None:
        raise ValueError(f"a DIMSE URI is dimse://AET@HOST:PORT: {uri!r}")
    calling = calling_aet or os.environ.get(CALLING_AET_VARIABLE) or DEFAULT_CALLING_AET
    return Archive(match["aet"], match["host"], int(match["port"]), calling), match["rest"] or ""


def instance_uri(archive: Archive, study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"{SCHEME}{archive}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def parse_instance_uri(uri: str, calling_aet: str | None = None) -> tuple[Archive, str, str, str]:
    archive, rest = parse_uri(uri, calling_aet)
    match = _INSTANCE_PATH.match(rest)
    if match is None:
        raise ValueError(f"not a DIMSE instance URI (.../studies/S/series/R/instances/I): {uri!r}")
    return archive, match["study"], match["series"], match["sop"]


def _application(archive: Archive, timeouts: Timeouts) -> AE:
    ae = AE(ae_title=archive.calling_aet)
    ae.acse_timeout = timeouts.association_s
    ae.connection_timeout = timeouts.association_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    return ae


def _associate(ae: AE, archive: Archive, timeouts: Timeouts, handlers: list | None = None, roles: list | None = None):
    """An established association, tried again with backoff while the archive refuses, drops or
    transiently rejects it (a restart, a full association pool). A permanent rejection (an
    unknown AE title) and an association that accepts none of the proposed contexts are the
    archive's configuration: not retried."""
    for attempt in range(timeouts.retries + 1):
        if attempt:
            time.sleep(timeouts.backoff_s * 2 ** (attempt - 1))
        answers: list[int] = []  # the A-ASSOCIATE result: 0 accepted, 1 rejected for good, 2 rejected for now

        def on_answer(event: evt.Event) -> None:
            result = getattr(event.primitive, "result", None)
            if isinstance(result, int):
                answers.append(result)

        assoc = ae.associate(
            archive.host, archive.port, ae_title=archive.called_aet, ext_neg=roles,
            evt_handlers=[*(handlers or []), (evt.EVT_ACSE_RECV, on_answer)],
        )
        if assoc.is_established:
            return assoc
        if assoc.is_rejected and answers[-1:] != [_REJECTED_TRANSIENT]:
            raise DimseError(f"DIMSE association with {archive} rejected (is the calling AE title {archive.calling_aet!r} known to it?)")
        if answers[-1:] == [_ACCEPTED]:
            raise DimseError(f"DIMSE archive {archive} accepted none of the proposed presentation contexts (SOP classes and syntaxes)")
    # pynetdicom reports a refused or timed-out connection as an aborted association.
    raise DimseError(
        f"cannot connect to DIMSE archive {archive} (refused, unreachable, aborted, or busy; {timeouts.retries + 1} tries)"
    )


def _no_answer(operation: str, archive: Archive) -> str:
    return (
        f"no answer: the association was aborted or timed out "
        f"(does the archive allow {operation} from the calling AE title {archive.calling_aet!r}?)"
    )


def _find(assoc, archive: Archive, query: Dataset) -> list[Dataset]:
    """Every match of one C-FIND (all pending responses), or DimseError on a failure status."""
    matches = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = getattr(status, "Status", None)
        if code is None:
            raise DimseError(f"C-FIND at {archive}: {_no_answer('C-FIND', archive)}")
        if code in _PENDING:
            matches.append(identifier)
        elif code == _MATCHING_TERMINATED:
            raise DimseError(
                f"C-FIND at {archive} ended early after {len(matches)} matches (status 0xFE00, matching terminated: "
                "an archive's answer at its result limit, e.g. Orthanc's LimitFindResults), so the listing would miss "
                "the rest: narrow the dates (--since / --until) or raise the archive's limit"
            )
        elif code != _SUCCESS:
            raise DimseError(f"C-FIND at {archive} failed with status 0x{code:04X}")
    return matches


def _query(level: str, **keys: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


def _date(value: dt.date | str | None) -> str:
    if value is None:
        return ""
    return value.strftime("%Y%m%d") if isinstance(value, dt.date) else value.replace("-", "")


def search_instances(
    uri: str,
    since: dt.date | str | None = None,
    until: dt.date | str | None = None,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    calling_aet: str | None = None,
    timeouts: Timeouts = Timeouts(),
) -> Iterator[InstanceRecord]:
    """Every instance of the modalities in studies dated [since, until]: C-FIND per level, one association.

    Studies are listed first (UIDs only); then, one short association per study (so a slow
    consumer never holds one open past the archive's idle timeout), its series of the
    wanted modalities and their images.
    """
    archive, _ = parse_uri(uri, calling_aet)
    ae = _application(archive, timeouts)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    study_date = f"{_date(since)}-{_date(until)}" if since or until else ""
    assoc = _associate(ae, archive, timeouts)
    try:
        studies = _find(assoc, archive, _query("STUDY", StudyInstanceUID="", StudyDate=study_date))
    finally:
        assoc.release()
    for study in studies:
        yield from _study_instances(ae, archive, timeouts, study, set(modalities))


def _study_instances(ae: AE, archive: Archive, timeouts: Timeouts, study: Dataset, wanted: set[str]) -> list[InstanceRecord]:
    records = []
    assoc = _associate(ae, archive, timeouts)
    try:
        series_list = _find(assoc, archive, _query("SERIES", StudyInstanceUID=study.StudyInstanceUID, SeriesInstanceUID="", Modality=""))
        for series in series_list:
            if series.get("Modality") not in wanted:
                continue
            images = _find(assoc, archive, _query(
                "IMAGE", StudyInstanceUID=study.StudyInstanceUID, SeriesInstanceUID=series.SeriesInstanceUID,
                SOPInstanceUID="", SOPClassUID="",
            ))
            records.extend(
                InstanceRecord(
                    path=instance_uri(archive, study.StudyInstanceUID, series.SeriesInstanceUID, image.SOPInstanceUID),
                    study_uid=str(study.StudyInstanceUID),
                    series_uid=str(series.SeriesInstanceUID),
                    sop_uid=str(image.SOPInstanceUID),
                    sop_class_uid=str(image.get("SOPClassUID") or "") or None,
                    modality=str(series.Modality),
                    study_date=str(study.get("StudyDate") or "") or None,
                )
                for image in images
            )
    finally:
        assoc.release()
    return records


def retrieve_instance_bytes(uri: str, calling_aet: str | None = None, timeouts: Timeouts = Timeouts()) -> bytes:
    """The Part-10 file of one instance by its URI, with C-GET; DimseError when the archive does not send it."""
    archive, study, series, sop = parse_instance_uri(uri, calling_aet)
    ae = _application(archive, timeouts)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    # One context per (class, syntax): all are accepted, so the archive can send the stored syntax
    # (one context with every syntax gets one accepted syntax, and the archive transcodes to it).
    for sop_class in RETRIEVABLE_SOP_CLASSES:
        for syntax in ACCEPTED_TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    roles = [build_role(sop_class, scp_role=True) for sop_class in RETRIEVABLE_SOP_CLASSES]
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.encoded_dataset(include_meta=True))
        return _SUCCESS

    assoc = _associate(ae, archive, timeouts, handlers=[(evt.EVT_C_STORE, on_store)], roles=roles)
    final = None
    try:
        query = _query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop)
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            final = getattr(status, "Status", None)
    finally:
        assoc.release()
    if final is None:
        raise DimseError(f"C-GET of instance {sop} at {archive}: {_no_answer('C-GET', archive)}")
    if len(received) != 1:
        reason = "not found" if final == _SUCCESS else f"status 0x{final:04X}"
        raise DimseError(f"C-GET of instance {sop} at {archive} returned {len(received)} instances: {reason}")
    return received[0]
