"""Keys for patient identifiers, and pseudonyms for outputs meant to leave the hospital.

Every key is an HMAC-SHA256 under the site's secret salt (`LUNGRAY_PATIENT_SALT`): stable
within a site, and not reversible by hashing candidate MRNs or names without the salt.
Without a salt, ingest and screen refuse to run, because a public fallback would make
every key reversible by enumeration. `--throwaway-salt` (demos, tests, throwaway data)
draws a random salt for the one run instead: its keys match no other run's.

`--pseudonymize` replaces every column that can identify a patient (the file path and
relative path, whose folder and file names often carry names and MRNs; the study id,
which is a UID or such a folder; the DICOM UIDs; the file's mtime) by a keyed value,
truncates study dates to the year, keeps only DICOM Defined Terms of the header's code
strings (modality, body part, view; a misused one can hold a name), and scrubs the path
from error messages. Keys
are deterministic, so incremental screening, study grouping and joins between tables
still work on the pseudonymized values.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import urllib.parse
from dataclasses import dataclass

import pyarrow as pa

from lungray.io.scope import SETTING_OF_COLUMN, reason_with_defined_terms, with_defined_terms

SALT_ENV = "LUNGRAY_PATIENT_SALT"
KEY_HEX_CHARS = 32  # 128 bits: no collisions at any archive size

KEYED_COLUMNS = ("path", "relpath", "study_id", "series_uid", "sop_uid")
SHORTEST_SCRUBBED_FRAGMENT = 3  # path fragments shorter than this ("a", "01") carry no name
LOWER_CASE_WORD = re.compile(r"[a-z]+")


class MissingSaltError(ValueError):
    """Raised where a run would have to key patient identifiers without the site's secret."""


def require_salt(throwaway: bool) -> None:
    """Refuse early (before Ray starts) a run that has no salt and was not told to make one up."""
    if not os.environ.get(SALT_ENV) and not throwaway:
        raise MissingSaltError(
            f"{SALT_ENV} is not set: patient keys need the site's secret salt (e.g. `export {SALT_ENV}="
            '"$(openssl rand -hex 32)"`, kept stable and backed up); for demo or throwaway data pass '
            "--throwaway-salt, which uses a random salt for this run only"
        )


def resolve_salt(throwaway: bool) -> str:
    """The site's salt from the environment; a fresh random one for a throwaway run."""
    require_salt(throwaway)
    return os.environ.get(SALT_ENV) or secrets.token_hex(32)


def keyed(kind: str, value: str, salt: str) -> str:
    """HMAC-SHA256 of `value` under `salt`, separated by `kind` so that equal strings of different
    kinds (a patient ID and a folder name, say) get unrelated keys."""
    message = f"{kind}\x00{value}".encode()
    return hmac.new(salt.encode(), message, hashlib.sha256).hexdigest()[:KEY_HEX_CHARS]


def keyed_int(kind: str, value: int, salt: str) -> int:
    """A keyed non-negative int64, for integer columns that must stay integers (mtime_ns)."""
    digest = hmac.new(salt.encode(), f"{kind}\x00{value}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def year_of(date: str | None) -> str | None:
    """A DICOM date (YYYYMMDD) truncated to its year; anything else becomes null."""
    return date[:4] if date and len(date) >= 4 and date[:4].isdigit() else None


def scrub_path(message: str | None, path: str | None) -> str | None:
    """`message` without the file's path, in every form a library may quote it: whole, each
    trailing part (`bucket/study/x.dcm`, `study/x.dcm`, `x.dcm`), the bytes of a file:// URI of
    a name that is no UTF-8 (as Python quotes them), and each folder or file name that holds
    more than lower-case letters (names, MRNs, UIDs). Lower-case words of the path alone
    (`data`, `tmp`) stay, so that `pixel data` still reads as such."""
    if message is None or not path:
        return message
    for fragment in sorted(path_fragments(path), key=len, reverse=True):
        if len(fragment) >= SHORTEST_SCRUBBED_FRAGMENT:
            message = re.sub(rf"(?<![A-Za-z0-9]){re.escape(fragment)}(?![A-Za-z0-9])", "<path>", message)
    return message


def path_fragments(path: str) -> set[str]:
    """What `scrub_path` removes of `path` (a path or URI)."""
    scheme, separator, rest = path.partition("://")
    forms = {rest} if separator else {path}
    if scheme == "file" and separator:
        raw = urllib.parse.unquote_to_bytes(rest)
        forms |= {os.fsdecode(raw), repr(raw)[2:-1]}
    fragments = {path, *forms}
    for form in forms:
        segments = [segment for segment in form.split("/") if segment]
        fragments.update("/".join(segments[start:]) for start in range(len(segments)))
        fragments.update(segment for segment in segments if not LOWER_CASE_WORD.fullmatch(segment))
    return fragments


@dataclass(frozen=True)
class Pseudonymizer:
    """Replaces the identifying columns of a table, wherever they occur, by keyed values."""

    salt: str

    def key(self, column: str, value: str | None) -> str | None:
        return None if value is None else keyed(column, value, self.salt)

    def mtime(self, value: int | None) -> int | None:
        return None if value is None else keyed_int("mtime_ns", value, self.salt)

    def table(self, table: pa.Table) -> pa.Table:
        """`table` with its identifying columns pseudonymized; other columns untouched."""
        columns = dict(zip(table.column_names, table.columns))

        def replace(name: str, values: list, kind: pa.DataType) -> None:
            nonlocal table
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))

        if "error" in columns and "path" in columns:
            errors = [scrub_path(message, path) for message, path in zip(columns["error"].to_pylist(), columns["path"].to_pylist())]
            replace("error", errors, pa.string())
        for name in KEYED_COLUMNS:
            if name in columns:
                replace(name, [self.key(name, value) for value in columns[name].to_pylist()], pa.string())
        for name in SETTING_OF_COLUMN:  # header code strings: a damaged or misused one can hold a name
            if name in columns:
                replace(name, with_defined_terms(name, columns[name].to_pylist()), pa.string())
        if "skip_reason" in columns:
            replace("skip_reason", [reason_with_defined_terms(reason) for reason in columns["skip_reason"].to_pylist()], pa.string())
        if "study_date" in columns:
            replace("study_date", [year_of(value) for value in columns["study_date"].to_pylist()], pa.string())
        if "mtime_ns" in columns:
            replace("mtime_ns", [self.mtime(value) for value in columns["mtime_ns"].to_pylist()], pa.int64())
        return table
