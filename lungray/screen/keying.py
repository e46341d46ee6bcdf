"""One keying per OUTPUT: its image rows are all keyed under one salt, or none are.

The incremental ledger and the studies' MERGE match rows by `path` and `study_id`, which
`--pseudonymize` keys under the salt. A run keyed otherwise (another salt, a throwaway
one, or with and without `--pseudonymize` in turn) matches none of the rows there: it
scored every file again and added a second row for each file and study. So the first run
records how it keyed (`OUTPUT/_lungray/keying.json`: whether it pseudonymized, and a key
of a fixed text, which says nothing of the salt but tells another salt apart), and a run
that keys otherwise is refused before it reads anything.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from lungray.io.listing import create_exclusive, exists, join_uri, read_bytes
from lungray.privacy import KEY_HEX_CHARS, Pseudonymizer
from lungray.screen.tables import open_table, query

KEYING = "_lungray/keying.json"
KEYED_PATH = re.compile(f"[0-9a-f]{{{KEY_HEX_CHARS}}}")
RECORD_ATTEMPTS = 5


def keying_record(pseudonymizer: Pseudonymizer | None) -> dict[str, Any]:
    return {"pseudonymized": pseudonymizer is not None, "key_check": pseudonymizer.key("key-check", "lungray") if pseudonymizer else None}


def keying_of_rows(output: str) -> dict[str, Any] | None:
    """How an output written before keying.json keyed its rows, from one image row's `path`
    (32 hex digits under --pseudonymize, a URI otherwise); the salt cannot be told from it.
    None for an output without image rows."""
    images = open_table(output, "images")
    if images is None:
        return None
    rows = query(images, "images", "SELECT path FROM images LIMIT 1")
    return {"pseudonymized": bool(KEYED_PATH.fullmatch(rows["path"][0].as_py()))} if rows.num_rows else None


def check_keying(output: str, pseudonymizer: Pseudonymizer | None) -> None:
    """Record this run's keying in a new OUTPUT; refuse it (ValueError) where OUTPUT was keyed otherwise.

    Two first runs at once each find no record; the record is created only where none is
    (`create_exclusive`), so the second reads the first's and is refused if it keyed otherwise.
    """
    uri = join_uri(output, KEYING)
    record = keying_record(pseudonymizer)
    for attempt in range(RECORD_ATTEMPTS):
        on_record = exists(uri)
        try:
            recorded = json.loads(read_bytes(uri)) if on_record else keying_of_rows(output)
        except (json.JSONDecodeError, FileNotFoundError):  # being written by another run (no hard links there)
            time.sleep(0.1 * (attempt + 1))
            continue
        refuse_other_keying(output, recorded, record)
        if on_record or create_exclusive(uri, json.dumps(record).encode()):
            return  # a new output, or one of before keying.json, is recorded from now on
        time.sleep(0.1 * (attempt + 1))  # another run recorded it first (or, on S3, is recording it): read theirs
    raise RuntimeError(f"could not read or record {uri}: another run kept writing it")


def refuse_other_keying(output: str, recorded: dict[str, Any] | None, record: dict[str, Any]) -> None:
    """ValueError where `recorded` (None: nothing is) keyed otherwise than this run's `record`."""
    if recorded is None or (
        recorded["pseudonymized"] == record["pseudonymized"] and recorded.get("key_check", record["key_check"]) == record["key_check"]
    ):
        return
    if recorded["pseudonymized"] != record["pseudonymized"]:
        held = "pseudonymized rows" if recorded["pseudonymized"] else "rows that are not pseudonymized"
        fix = "pass --pseudonymize" if recorded["pseudonymized"] else "leave out --pseudonymize"
    else:
        held, fix = "rows keyed under another salt", "use the salt it was written with (not --throwaway-salt)"
    raise ValueError(
        f"{output} holds {held}: this run would match none of them, score every file again and add a second row "
        f"for each; {fix}, or screen into another output"
    )
