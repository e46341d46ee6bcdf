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
from typing import Any

from lungray.io.listing import exists, join_uri, read_bytes, write_whole
from lungray.privacy import KEY_HEX_CHARS, Pseudonymizer
from lungray.screen.tables import open_table

KEYING = "_lungray/keying.json"
KEYED_PATH = re.compile(f"[0-9a-f]{{{KEY_HEX_CHARS}}}")


def keying_record(pseudonymizer: Pseudonymizer | None) -> dict[str, Any]:
    return {"pseudonymized": pseudonymizer is not None, "key_check": pseudonymizer.key("key-check", "lungray") if pseudonymizer else None}


def keying_of_rows(output: str) -> dict[str, Any] | None:
    """How an output written before keying.json keyed its rows, from one image row's `path`
    (32 hex digits under --pseudonymize, a URI otherwise); the salt cannot be told from it.
    None for an output without image rows."""
    images = open_table(output, "images")
    if images is None:
        return None
    for batch in images.to_pyarrow_dataset().to_batches(columns=["path"]):
        if batch.num_rows:
            return {"pseudonymized": bool(KEYED_PATH.fullmatch(batch["path"][0].as_py()))}
    return None


def check_keying(output: str, pseudonymizer: Pseudonymizer | None) -> None:
    """Record this run's keying in a new OUTPUT; refuse it (ValueError) where OUTPUT was keyed otherwise."""
    uri = join_uri(output, KEYING)
    record = keying_record(pseudonymizer)
    on_record = exists(uri)
    recorded = json.loads(read_bytes(uri)) if on_record else keying_of_rows(output)
    agrees = recorded is None or (
        recorded["pseudonymized"] == record["pseudonymized"] and recorded.get("key_check", record["key_check"]) == record["key_check"]
    )
    if agrees:
        if not on_record:  # a new output, or one of before keying.json: recorded from now on
            write_whole(uri, json.dumps(record).encode())
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
