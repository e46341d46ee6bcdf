"""A PACS reached through DICOMweb: QIDO-RS to list, WADO-RS to fetch, STOW-RS to store.

A thin layer over `dicomweb-client` that adds what a nightly job needs and the library leaves
to its caller: `dicomweb+http(s)://` URIs (one per instance, so an images row's `path` names
study, series and instance), credentials from the environment that never reach a message or
a log, retries with backoff on transient failures (urllib3's Retry, bounded, honouring
Retry-After), timeouts so a dead server is an error rather than a hang, and paged QIDO
searches streamed one instance at a time.

Environment: `LUNGRAY_DICOMWEB_TOKEN` (bearer token) or `LUNGRAY_DICOMWEB_USER` and
`LUNGRAY_DICOMWEB_PASSWORD` (basic auth); `LUNGRAY_DICOMWEB_CA_BUNDLE` (a PEM file to trust
instead of the system's CAs). TLS certificates are always verified.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import io
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pydicom
import requests
import requests.auth
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter
from requests_toolbelt.multipart.decoder import (
    ImproperBodyPartContentException,
    MultipartDecoder,
    NonMultipartContentTypeException,
)
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError, ReadTimeoutError
from urllib3.util.retry import Retry

SCHEME_PREFIX = "dicomweb+"
DEFAULT_MODALITIES = ("CR", "DX")
DEFAULT_PAGE_SIZE = 500
TOKEN_VARIABLE = "LUNGRAY_DICOMWEB_TOKEN"
USER_VARIABLE = "LUNGRAY_DICOMWEB_USER"
PASSWORD_VARIABLE = "LUNGRAY_DICOMWEB_PASSWORD"
CA_BUNDLE_VARIABLE = "LUNGRAY_DICOMWEB_CA_BUNDLE"
_INSTANCE_PATH = re.compile(r"^(?P<base>.*)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)$")
log = logging.getLogger(__name__)
_RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
# QIDO attributes each listed instance needs (UIDs for the URI and the incremental key, the rest for the row).
_INSTANCE_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "StudyDate")


class DicomwebError(RuntimeError):
    """A DICOMweb request failed for good (after retries); the message names the server, never a credential."""


@dataclass(frozen=True)
class Credentials:
    """Bearer token or basic-auth pair; `repr` shows which kind, never the secret."""

    token: str | None = field(default=None, repr=False)
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        env = os.environ if environ is None else environ

        def value(name: str) -> str | None:
            # A secret made from a file (Kubernetes --from-file, an env file) often ends with a
            # newline, which no header may hold: requests would refuse it and quote it in its error.
            return (env.get(name) or "").strip() or None

        return cls(token=value(TOKEN_VARIABLE), user=value(USER_VARIABLE), password=value(PASSWORD_VARIABLE), ca_bundle=value(CA_BUNDLE_VARIABLE))

    @property
    def secrets(self) -> list[str]:
        """The token, the password, and the basic-auth header's base64 of both, which an error may quote."""
        basic = base64.b64encode(f"{self.user}:{self.password}".encode()).decode() if self.user is not None and self.password else None
        return [value for value in (self.token, self.password, basic) if value]


@dataclass(frozen=True)
class RequestPolicy:
    """How long to wait and how often to retry; the defaults suit a PACS on a hospital network."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    retries: int = 3  # transient failures retried this many times, waits backoff * 2**n seconds
    backoff_s: float = 0.5
    max_retry_after_s: float = 30.0  # a server's Retry-After is honoured up to this, so it cannot stall a run


@dataclass(frozen=True)
class InstanceRecord:
    """One instance a QIDO-RS search found: what an images row and the incremental key need."""

    path: str  # dicomweb+http(s)://HOST/PATH/studies/S/series/R/instances/I
    study_uid: str
    series_uid: str
    sop_uid: str  # the incremental key
    sop_class_uid: str | None
    modality: str | None
    study_date: str | None  # YYYYMMDD as the archive holds it


def is_dicomweb_uri(uri: str) -> bool:
    return uri.startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))


def service_url(uri: str) -> str:
    """The HTTP(S) base URL of the DICOMweb service a `dicomweb+http(s)://HOST[:PORT]/PATH` URI names."""
    if not is_dicomweb_uri(uri):
        raise ValueError(f"not a DICOMweb URI (dicomweb+http:// or dicomweb+https://): {uri!r}")
    url = uri[len(SCHEME_PREFIX) :]
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"a DICOMweb URI must not hold credentials; set {TOKEN_VARIABLE} or {USER_VARIABLE}/{PASSWORD_VARIABLE}"
        )
    if parts.query or parts.fragment or not parts.hostname:
        raise ValueError(f"a DICOMweb URI is dicomweb+http(s)://HOST[:PORT]/PATH, without query or fragment: {uri!r}")
    return url.rstrip("/")


def instance_uri(base_url: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The URI naming one instance (its WADO-RS address with the dicomweb+ scheme)."""
    return f"{SCHEME_PREFIX}{base_url}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def parse_instance_uri(uri: str) -> tuple[str, str, str, str]:
    """(service base URL, study UID, series UID, SOP instance UID) of an `instance_uri`."""
    match = _INSTANCE_PATH.match(service_url(uri))
    if match is None:
        raise ValueError(f"not a DICOMweb instance URI (.../studies/S/series/R/instances/I): {uri!r}")
    return match["base"], match["study"], match["series"], match["sop"]


def make_session(credentials: Credentials, policy: RequestPolicy) -> requests.Session:
    """A requests Session that authenticates, verifies TLS and retries transient failures with backoff."""
    session = requests.Session()
    retry = _BoundedRetry(
        max_retry_after_s=policy.max_retry_after_s,
        total=policy.retries,
        connect=policy.retries,
        read=policy.retries,
        status=policy.retries,
        backoff_factor=policy.backoff_s,
        status_forcelist=_TRANSIENT_STATUS,
        # STOW of a deterministic SOP Instance UID is idempotent, so a POST may be retried too.
        allowed_methods=frozenset({"GET", "HEAD", "POST", "DELETE"}),
        respect_retry_after_header=True,
        raise_on_status=False,  # the last response comes back and raise_for_status names its status
    )
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = credentials.ca_bundle or True
    if credentials.ca_bundle:
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override the session's verify, but not
        # a request's own: each request names the hospital's CA.
        session.request = functools.partial(session.request, verify=credentials.ca_bundle)  # type: ignore[method-assign]
    # Auth set on the session keeps requests from reaching for ~/.netrc (it still does when anonymous).
    if credentials.token:
        session.auth = _BearerAuth(credentials.token)
    elif credentials.user is not None and credentials.password is not None:
        session.auth = (credentials.user, credentials.password)
    return session


class _BoundedRetry(Retry):
    """urllib3's Retry with the wait a Retry-After header asks for capped (urllib3 caps only its own backoff)."""

    def __init__(self, *args: object, max_retry_after_s: float = 30.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.max_retry_after_s = max_retry_after_s

    def new(self, **kwargs: object) -> _BoundedRetry:
        retry = super().new(**kwargs)
        retry.max_retry_after_s = self.max_retry_after_s
        return retry

    def get_retry_after(self, response) -> float | None:  # noqa: ANN001 - urllib3's BaseHTTPResponse
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, self.max_retry_after_s)


class _BearerAuth(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


@functools.lru_cache(maxsize=8)
def _cached_session(base_url: str, credentials: Credentials, policy: RequestPolicy) -> requests.Session:
    return make_session(credentials, policy)


@functools.lru_cache(maxsize=8)
def _cached_client(base_url: str, credentials: Credentials, policy: RequestPolicy) -> DICOMwebClient:
    client = DICOMwebClient(
        base_url,
        session=_cached_session(base_url, credentials, policy),
        timeout=(policy.connect_timeout_s, policy.read_timeout_s),
    )
    client.set_http_retry_params(retry=False)  # the session's urllib3 Retry does it, for connection errors too
    return client


def client_for(base_url: str, credentials: Credentials | None = None, policy: RequestPolicy | None = None) -> DICOMwebClient:
    """A DICOMweb client for the service, reused within a process (a Ray worker keeps its connections)."""
    return _cached_client(base_url, credentials or Credentials.from_environment(), policy or RequestPolicy())


def _failure(action: str, base_url: str, error: Exception, secrets: Sequence[str]) -> DicomwebError:
    """A DicomwebError saying what failed where, with any secret scrubbed from the library's text."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        reason = {
            401: "the server rejected the credentials (HTTP 401)",
            403: "the credentials are not allowed to do this (HTTP 403)",
            404: "not found on the server (HTTP 404)",
        }.get(status, f"HTTP {status} {error.response.reason}")
    elif isinstance(error, requests.ConnectionError):  # Timeout and retries exhausted land here too
        reason = _network_reason(error)
    else:
        reason = f"{type(error).__name__}: {error}"
    message = f"DICOMweb {action} at {base_url} failed: {reason}"
    return DicomwebError(scrub_secrets(message, secrets))


def scrub_secrets(message: str, secrets: Sequence[str]) -> str:
    """`message` without any secret, as given or as a library quotes it (repr of the text or its bytes)."""
    forms = {form for secret in secrets for text in (secret, secret.strip()) if text for form in (text, repr(text)[1:-1], repr(text.encode())[2:-1])}
    for form in sorted(forms, key=len, reverse=True):
        message = message.replace(form, "***")
    return message


def _network_reason(error: requests.ConnectionError) -> str:
    """The root cause of a network failure in a few words (the library's text repeats the whole URL)."""
    cause = error.args[0] if error.args else error
    if isinstance(cause, MaxRetryError):
        cause = cause.reason
    if isinstance(cause, ReadTimeoutError) or isinstance(error, requests.ReadTimeout):
        return "no answer in time (read timeout)"
    if isinstance(cause, NewConnectionError):  # before ConnectTimeoutError, its base class in urllib3
        return f"cannot connect ({str(cause).rpartition(': ')[2]})"
    if isinstance(cause, ConnectTimeoutError) or isinstance(error, requests.ConnectTimeout):
        return "cannot connect in time (connect timeout)"
    return f"cannot connect ({cause})"


def _date(value: dt.date | str | None) -> str:
    if value is None:
        return ""
    return value.strftime("%Y%m%d") if isinstance(value, dt.date) else value.replace("-", "")


def _first(item: Mapping[str, dict], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value")
    return str(values[0]) if values else None


def search_instances(
    uri: str,
    since: dt.date | str | None = None,
    until: dt.date | str | None = None,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    page_size: int = DEFAULT_PAGE_SIZE,
    credentials: Credentials | None = None,
    policy: RequestPolicy | None = None,
) -> Iterator[InstanceRecord]:
    """Every instance of the given modalities with StudyDate in [since, until], one QIDO-RS page at a time.

    A generator: pages are fetched as the caller consumes them, never the whole archive at
    once. Paging stops at the first empty page (not a short one: a server may cap the page
    size below `page_size`). One search per modality, since list matching on Modality is not
    portable across servers. Raises DicomwebError when the server cannot be searched.
    """
    base_url = service_url(uri)
    credentials = credentials or Credentials.from_environment()
    client = client_for(base_url, credentials, policy)
    filters: dict[str, str] = {}
    if since is not None or until is not None:
        filters["StudyDate"] = f"{_date(since)}-{_date(until)}"
    for modality in modalities:
        offset, previous_page = 0, frozenset[str]()
        while True:
            try:
                page = client.search_for_instances(
                    limit=page_size,
                    offset=offset,
                    fields=list(_INSTANCE_FIELDS),
                    search_filters={**filters, "Modality": modality},
                )
            except (requests.RequestException, ValueError) as error:
                raise _failure("search", base_url, error, credentials.secrets) from None
            if not page:
                break
            sops = frozenset(_first(item, "00080018") or "" for item in page)
            if sops <= previous_page:  # a server that ignores offset repeats its page for ever
                raise DicomwebError(
                    f"DICOMweb search at {base_url} failed: the server answered offset {offset} with the page it gave "
                    "for the one before, so it does not page by offset; the listing cannot go on"
                )
            offset, previous_page = offset + len(page), sops
            for item in page:
                study, series, sop = (_first(item, tag) for tag in ("0020000D", "0020000E", "00080018"))
                if not (study and series and sop):  # names nothing that could be retrieved, so no row
                    log.warning("DICOMweb search at %s returned an instance without its study/series/SOP UIDs; skipped", base_url)
                    continue
                yield InstanceRecord(
                    path=instance_uri(base_url, study, series, sop),
                    study_uid=study,
                    series_uid=series,
                    sop_uid=sop,
                    sop_class_uid=_first(item, "00080016"),
                    modality=_first(item, "00080060") or modality,
                    study_date=_first(item, "00080020"),
                )
            if len(page) > page_size:  # more than asked: the server ignores limit and answered whole
                break


def retrieve_instance_bytes(uri: str, credentials: Credentials | None = None, policy: RequestPolicy | None = None) -> bytes:
    """The Part-10 file of one instance by its URI, as the archive holds it (WADO-RS, any transfer syntax).

    What a decode task calls; on failure it raises DicomwebError with a message fit for an
    error row (server and reason, no credential). The multipart answer is split here rather
    than by dicomweb-client's retrieve_instance, which parses the file into a pydicom Dataset:
    the bytes as stored are what the decoder takes, and parsing then re-encoding a Dataset
    doubled the time per instance (2 MB DX from a loopback Orthanc).
    """
    base_url, study, series, sop = parse_instance_uri(uri)
    credentials = credentials or Credentials.from_environment()
    policy = policy or RequestPolicy()
    session = _cached_session(base_url, credentials, policy)  # the one the client uses: authenticated, retrying
    url = f"{base_url}/studies/{study}/series/{series}/instances/{sop}"
    try:
        response = session.get(url, headers={"Accept": _RETRIEVE_ACCEPT}, timeout=(policy.connect_timeout_s, policy.read_timeout_s))
        response.raise_for_status()
        return _single_part10(response)
    except (requests.RequestException, ValueError, ImproperBodyPartContentException, NonMultipartContentTypeException) as error:
        raise _failure(f"retrieve of instance {sop}", base_url, error, credentials.secrets) from None


def _single_part10(response: requests.Response) -> bytes:
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("application/dicom"):  # a single non-encapsulated part, as some servers send
        data = response.content
    else:
        parts = MultipartDecoder(response.content, content_type).parts
        if len(parts) != 1:
            raise ValueError(f"expected one instance in the answer, got {len(parts)}")
        data = parts[0].content
    if data[128:132] != b"DICM":
        raise ValueError("the answer is not a DICOM Part-10 file")
    return data


def retrieve_instance_header(uri: str, credentials: Credentials | None = None, policy: RequestPolicy | None = None) -> Dataset:
    """One instance's attributes without its bulk data (WADO-RS metadata), e.g. to build an SR in its study."""
    base_url, study, series, sop = parse_instance_uri(uri)
    credentials = credentials or Credentials.from_environment()
    client = client_for(base_url, credentials, policy)
    try:
        metadata = client.retrieve_instance_metadata(study, series, sop)
    except (requests.RequestException, ValueError) as error:
        raise _failure(f"metadata retrieve of instance {sop}", base_url, error, credentials.secrets) from None
    inline = {tag: value for tag, value in metadata.items() if "BulkDataURI" not in value}
    return Dataset.from_json(inline)


def dataset_bytes(dataset: Dataset) -> bytes:
    """A dataset as a Part-10 file (preamble and file meta), as decode and STOW take it."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def instance_exists(
    uri: str, study_uid: str, sop_uid: str, credentials: Credentials | None = None, policy: RequestPolicy | None = None
) -> bool:
    """Whether the service holds an instance with this SOP Instance UID in this study (QIDO-RS)."""
    base_url = service_url(uri)
    credentials = credentials or Credentials.from_environment()
    client = client_for(base_url, credentials, policy)
    try:
        found = client.search_for_instances(study_instance_uid=study_uid, search_filters={"SOPInstanceUID": sop_uid})
    except (requests.RequestException, ValueError) as error:
        raise _failure("search", base_url, error, credentials.secrets) from None
    return any(_first(item, "00080018") == sop_uid for item in found)


def store_dataset(uri: str, dataset: Dataset, credentials: Credentials | None = None, policy: RequestPolicy | None = None) -> None:
    """Store one dataset with STOW-RS; raises DicomwebError if the server refuses it."""
    base_url = service_url(uri)
    credentials = credentials or Credentials.from_environment()
    client = client_for(base_url, credentials, policy)
    # dicomweb-client writes the dataset as it is; one read without a preamble would go out without one.
    part10 = pydicom.dcmread(io.BytesIO(dataset_bytes(dataset)))
    try:
        answer = client.store_instances([part10], study_instance_uid=dataset.StudyInstanceUID)
    except (requests.RequestException, ValueError) as error:
        raise _failure(f"store of instance {dataset.SOPInstanceUID}", base_url, error, credentials.secrets) from None
    failed = answer.get("FailedSOPSequence")
    if failed:
        reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed)
        raise DicomwebError(f"DICOMweb store of instance {dataset.SOPInstanceUID} at {base_url} failed: reason {reasons}")


def store_if_absent(uri: str, dataset: Dataset, credentials: Credentials | None = None, policy: RequestPolicy | None = None) -> bool:
    """Store with STOW-RS unless the service already holds this SOP Instance UID; True when stored now.

    With lungray's deterministic UIDs (report.report_uids, overlay.overlay_uids) this makes a
    rerun store nothing new.
    """
    if instance_exists(uri, str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID), credentials, policy):
        return False
    store_dataset(uri, dataset, credentials, policy)
    return True
