"""A PACS as a screening input, whichever protocol its URI names: what the screen pipeline calls.

`dicomweb+http(s)://...` goes to dicomweb.py, `dimse://...` to dimse.py; both yield the same
InstanceRecord and take an instance URI back to its Part-10 bytes, failing with PacsError.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence

from lungray.pacs import dicomweb, dimse
from lungray.pacs.dicomweb import DEFAULT_MODALITIES, InstanceRecord

PacsError = (dicomweb.DicomwebError, dimse.DimseError)  # for `except PacsError`: the instance becomes an error row


def is_pacs_uri(uri: str) -> bool:
    return dicomweb.is_dicomweb_uri(uri) or dimse.is_dimse_uri(uri)


def search_instances(
    uri: str,
    since: dt.date | str | None = None,
    until: dt.date | str | None = None,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
) -> Iterator[InstanceRecord]:
    """The instances of `modalities` in studies dated [since, until], streamed (QIDO-RS or C-FIND)."""
    if dimse.is_dimse_uri(uri):
        return dimse.search_instances(uri, since, until, modalities)
    return dicomweb.search_instances(uri, since, until, modalities)


def retrieve_instance_bytes(uri: str) -> bytes:
    """One instance's Part-10 bytes by the URI a search gave (WADO-RS or C-GET); PacsError on failure."""
    if dimse.is_dimse_uri(uri):
        return dimse.retrieve_instance_bytes(uri)
    return dicomweb.retrieve_instance_bytes(uri)
