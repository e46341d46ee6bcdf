"""What a run scores: each listed file against the model's last row for it in `OUTPUT/images`.

A listed batch is joined to the images table's key columns only, streamed batch by batch
(bounded memory whatever the history's size), and only in the batch's range of paths; no
Python set of the history is built.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from lungray.io.listing import exists, join_uri, read_bytes, write_whole
from lungray.io.scope import Scope
from lungray.screen.tables import IMAGE_SCHEMA, equal_or_both_null, model_rows

KEY_COLUMNS = ["path", "size", "mtime_ns", "etag", "status", "tries", "run_id"]
KEY_SCHEMA = pa.schema([IMAGE_SCHEMA.field(name) for name in KEY_COLUMNS])


@dataclass(frozen=True)
class LedgerRule:
    """`incremental`: skip files whose last row is current (same size, mtime and ETag), except
    errors tried fewer than `max_retries` times, and skipped files when `rescore_skipped`.
    Rows of `resumed_runs` (this command, interrupted) are always skipped: their files are
    done for this run whatever the mode."""

    incremental: bool
    max_retries: int
    resumed_runs: frozenset[str] = frozenset()
    rescore_skipped: bool = False  # the scope changed since the model's last run: its skipped files are judged again


SCOPES = "_lungray/scope"


def scope_record_uri(output: str, model_id: str) -> str:
    return join_uri(output, SCOPES, f"{model_id}.json")


def scope_changed(output: str, model_id: str, scope: Scope) -> bool:
    """Whether the model's last finished run into `output` had another scope (False when none is recorded)."""
    uri = scope_record_uri(output, model_id)
    return exists(uri) and json.loads(read_bytes(uri)) != json.loads(json.dumps(asdict(scope)))


def record_scope(output: str, model_id: str, scope: Scope) -> None:
    """The scope the model's skipped rows were judged by, written when a run has finished."""
    write_whole(scope_record_uri(output, model_id), json.dumps(asdict(scope)).encode())


def previous_rows(listing_paths: pa.Array, images: DeltaTable | None, model_id: str) -> pa.Table:
    """The model's current row for each of `listing_paths` that has one (key columns only)."""
    if images is None:
        return KEY_SCHEMA.empty_table()
    wanted = pa.table({"path": listing_paths})
    matched = []
    # Only history whose paths fall in the listing batch's range is read: a sorted listing's
    # batch under tonight's folders skips every data file of earlier nights.
    for rows in model_rows(images, KEY_COLUMNS, model_id, within=("path", listing_paths)):
        found = rows.join(wanted, "path", join_type="left semi")
        if found.num_rows:
            matched.append(found)
    return pa.concat_tables(matched).cast(KEY_SCHEMA) if matched else KEY_SCHEMA.empty_table()


def plan(listing: pa.Table, images: DeltaTable | None, model_id: str, rule: LedgerRule) -> pa.Table:
    """`listing` (with `path`, `size`, `mtime_ns`, `etag` as the images table writes them) plus
    what to do with each file: `score` it (`replaces` an existing row; its `tries`), or why not."""
    previous = previous_rows(listing["path"], images, model_id)
    renamed = previous.rename_columns([f"prev_{name}" if name != "path" else "path" for name in previous.column_names])
    joined = listing.join(renamed, "path", join_type="left outer")
    exists = pc.is_valid(joined["prev_status"])
    same_version = pc.and_(
        exists,
        pc.and_(
            equal_or_both_null(joined["size"], joined["prev_size"]),
            pc.and_(equal_or_both_null(joined["mtime_ns"], joined["prev_mtime_ns"]), equal_or_both_null(joined["etag"], joined["prev_etag"])),
        ),
    )
    was_error = pc.and_(same_version, pc.fill_null(pc.equal(joined["prev_status"], "error"), False))
    prev_tries = pc.fill_null(joined["prev_tries"], 1)
    retryable = pc.and_(was_error, pc.less(prev_tries, rule.max_retries))
    resumed = pc.and_(same_version, pc.is_in(joined["prev_run_id"], pa.array(sorted(rule.resumed_runs), pa.string())))
    resumed = pc.fill_null(resumed, False)
    current = pc.and_(same_version, pc.invert(retryable))
    if rule.rescore_skipped:
        current = pc.and_(current, pc.invert(pc.fill_null(pc.equal(joined["prev_status"], "skipped"), False)))
    if rule.incremental:
        score = pc.and_(pc.invert(resumed), pc.invert(current))
    else:
        score = pc.invert(resumed)
    tries = pc.if_else(was_error, pc.add(prev_tries, 1), 1)
    planned = joined.select(listing.column_names)
    for name, column in (
        ("score", score),
        ("replaces", exists),
        ("tries", pc.cast(tries, pa.int32())),
        ("already_done", pc.and_(pc.invert(score), pc.invert(resumed))),
        ("resumed", pc.and_(pc.invert(score), resumed)),
        ("given_up", pc.and_(pc.invert(score), pc.and_(was_error, pc.invert(retryable)))),
    ):
        planned = planned.append_column(name, column)
    return planned
