"""The screening output tables: Delta Lake tables `OUTPUT/images` and `OUTPUT/studies`.

Both hold the current state, one row per (path, model_id) and per (study_id, model_id),
partitioned by `scored_date` (the date a row was last written). Every change is one Delta
transaction: readers see a commit whole or not at all, and the log keeps every earlier
version for time travel (`DeltaTable(uri, version=N)`). Why Delta and not Iceberg:
docs/operators.md, "Output tables".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, QueryBuilder
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from lungray.io.listing import absolute_uri, is_s3, join_uri, s3_endpoint, s3_region

IMAGE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("study_id", pa.string()),
        ("sop_uid", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("skip_reason", pa.string()),
        ("prob", pa.float64()),
        ("model_id", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("etag", pa.string()),
        ("tries", pa.int32()),
        ("run_id", pa.string()),
        ("scored_date", pa.string()),
    ]
)
STUDY_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("n_images", pa.int32()),
        ("n_errors", pa.int32()),
        ("n_skipped", pa.int32()),
        ("prob", pa.float64()),
        ("flagged", pa.bool_()),
        ("threshold", pa.float64()),
        ("aggregate", pa.string()),
        ("model_id", pa.string()),
        ("run_id", pa.string()),
        ("explain_path", pa.string()),
        ("scored_date", pa.string()),
    ]
)
SCHEMAS = {"images": IMAGE_SCHEMA, "studies": STUDY_SCHEMA}
KEYS = {"images": ("path", "model_id"), "studies": ("study_id", "model_id")}
PARTITION = "scored_date"
AGGREGATES = ("max", "mean")
# A MERGE that loses a race with another writer's commit is redone on the new version.
MERGE_ATTEMPTS = 5


def table_uri(output: str, name: str) -> str:
    """The table's URI; a local path made absolute (Ray's Delta writer needs one)."""
    return join_uri(absolute_uri(output), name)


def storage_options(uri: str) -> dict[str, str] | None:
    """delta-rs options for an s3:// table from the usual AWS variables (an endpoint for
    S3-compatible servers); commits use S3's conditional writes, so no lock service is needed."""
    if not is_s3(uri):
        return None
    options = {"AWS_REGION": s3_region()}
    endpoint = s3_endpoint()
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    return options


def open_table(output: str, name: str, version: int | None = None) -> DeltaTable | None:
    """The table, or None before the first run created it."""
    uri = table_uri(output, name)
    try:
        return DeltaTable(uri, version=version, storage_options=storage_options(uri))
    except TableNotFoundError:
        return None


def ensure_table(output: str, name: str) -> DeltaTable:
    """The table, created empty with its schema if missing (a concurrent creator may win: fine)."""
    table = open_table(output, name)
    if table is not None:
        return table
    uri = table_uri(output, name)
    try:
        DeltaTable.create(uri, SCHEMAS[name], partition_by=[PARTITION], storage_options=storage_options(uri), name=name)
    except Exception:  # noqa: BLE001 - lost the race to create it; the winner's table is the same
        if open_table(output, name) is None:
            raise
    return open_table(output, name)


def read_table(output: str, name: str, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
    """The current rows of `OUTPUT/<name>` (empty, with its schema, before the first run)."""
    table = open_table(output, name)
    if table is None:
        empty = SCHEMAS[name].empty_table()
        return empty.select(columns) if columns else empty
    # Filtered after reading, not pushed into the scan: files that delta-rs wrote hold string_view
    # columns, which pyarrow's dataset filter cannot compare with a string literal.
    rows = query(table, name, f"SELECT * FROM {name}").select(SCHEMAS[name].names).cast(SCHEMAS[name])
    rows = rows if filter is None else rows.filter(filter)
    return rows.select(columns) if columns else rows


def query(table: DeltaTable, name: str, sql: str) -> pa.Table:
    """The result of `sql` over `table` (registered as `name`), run by delta-rs's DataFusion.

    The tables are read this way rather than through `to_pyarrow_dataset().to_table()`: with
    deltalake 1.6.6 a process that read a partitioned table that way aborts at exit about half
    the time (`terminate called without an active exception`, exit code 134), which would fail
    a job whose work was done; a DataFusion read leaves no such thread behind.
    """
    return scan(table, name, sql).read_all()


def scan(table: DeltaTable, name: str, sql: str) -> pa.RecordBatchReader:
    """The batches of `sql` over `table` (registered as `name`), as DataFusion streams them."""
    return pa.RecordBatchReader.from_stream(QueryBuilder().register(name, table).execute(sql))


def run_study_counts(output: str, model_id: str, run_id: str, date: str) -> tuple[int, int]:
    """(study rows, flagged ones) that run `run_id` wrote and that stand: each study once,
    however many of the run's chunks changed it, and as its last sync left it. Read from the
    run's `scored_date` partition, which every row it writes is in."""
    studies = open_table(output, "studies")
    if studies is None:
        return 0, 0
    counted = query(
        studies, "studies",
        "SELECT count(*) AS written, sum(CASE WHEN flagged THEN 1 ELSE 0 END) AS flagged FROM studies "
        f"WHERE scored_date = {sql_string(date)} AND model_id = {sql_string(model_id)} AND run_id = {sql_string(run_id)}",
    )
    return int(counted["written"][0].as_py()), int(counted["flagged"][0].as_py() or 0)


def sql_string(value: str) -> str:
    """`value` as an SQL string literal (a path may hold a quote)."""
    return "'" + value.replace("'", "''") + "'"


def value_range(values: pa.Array | pa.ChunkedArray) -> tuple[str, str] | None:
    """(smallest, largest) of string `values`; None when there is no value."""
    bounds = pc.min_max(values)
    return (bounds["min"].as_py(), bounds["max"].as_py()) if bounds["min"].is_valid else None


def model_rows(
    table: DeltaTable,
    columns: list[str],
    model_id: str,
    within: tuple[str, pa.Array] | None = None,
    chunk_rows: int = 200_000,
    name: str = "images",
) -> Iterator[pa.Table]:
    """The model's rows of table `name` (image rows by default), some columns, streamed in
    tables of about `chunk_rows`: what the ledger and the study sync read, in memory that does
    not grow with the history.

    `within` = (column, values) keeps rows whose column lies in the values' range (none when
    they hold no value); the caller filters to the values themselves. The query runs
    in delta-rs's DataFusion engine, which skips the data files and row groups whose min/max
    statistics (the Delta log's, else the Parquet footer's) rule the filters out: a night's
    listing under new folders reads next to nothing of the history, however long it is.
    Batches are gathered to `chunk_rows` before they are returned, since a join per tiny
    batch (a table of many small files gives many) costs more than the scan.
    """
    where = [f'"model_id" = {sql_string(model_id)}']
    if within is not None:
        column, values = within
        bounds = value_range(values)
        if bounds is None:
            return
        where.append(f'"{column}" BETWEEN {sql_string(bounds[0])} AND {sql_string(bounds[1])}')
    selected = ", ".join(f'"{name}"' for name in columns)
    sql = f"SELECT {selected} FROM {name} WHERE {' AND '.join(where)}"
    schema = pa.schema([SCHEMAS[name].field(column) for column in columns])
    reader = scan(table, name, sql)
    gathered: list[pa.RecordBatch] = []
    rows = 0
    for batch in reader:
        if batch.num_rows:
            gathered.append(batch.cast(schema))  # DataFusion returns string_view; joins want string
            rows += batch.num_rows
        if rows >= chunk_rows:
            yield pa.Table.from_batches(gathered, schema)
            gathered, rows = [], 0
    if rows:
        yield pa.Table.from_batches(gathered, schema)


def merge(
    table: DeltaTable, name: str, rows: pa.Table, metadata: dict[str, str] | None = None, delete: str | None = None
) -> dict[str, Any]:
    """Upsert `rows` on the table's keys in one transaction, redone if a concurrent commit won the race.

    The predicate also bounds each key of the target by the source's literal min and max:
    delta-rs then skips, from the data files' statistics, every file that cannot hold a
    matching row (at 2.5M study rows, 0.03 s instead of 0.8 s for a night's studies). The
    bounds exclude no match, since every source key lies within them.

    `delete`: an SQL predicate on the target (alias `t`); rows it holds that no source row
    matches are deleted in the same transaction.
    """
    predicate = " AND ".join(f"t.{key} = s.{key}" for key in KEYS[name])
    for key in KEYS[name]:
        bounds = value_range(rows[key])
        if bounds is not None:
            predicate += f" AND t.{key} BETWEEN {sql_string(bounds[0])} AND {sql_string(bounds[1])}"
    for attempt in range(MERGE_ATTEMPTS):
        try:
            merger = (
                table.merge(
                    rows.select(SCHEMAS[name].names).cast(SCHEMAS[name]),
                    predicate,
                    source_alias="s",
                    target_alias="t",
                    commit_properties=CommitProperties(custom_metadata=metadata) if metadata else None,
                )
                .when_matched_update_all()
                .when_not_matched_insert_all()
            )
            if delete is not None:  # without a predicate delta-rs would delete every unmatched row
                merger = merger.when_not_matched_by_source_delete(delete)
            return merger.execute()
        except CommitFailedError:
            if attempt == MERGE_ATTEMPTS - 1:
                raise
            table.update_incremental()
    raise AssertionError("unreachable")


def equal_or_both_null(left: pa.ChunkedArray, right: pa.ChunkedArray) -> pa.ChunkedArray:
    """Element-wise equality where two nulls are equal (and a null and a value are not)."""
    both_null = pc.and_(pc.is_null(left), pc.is_null(right))
    return pc.or_(pc.fill_null(pc.equal(left, right), False), both_null)


def aggregate_studies(
    images: pa.Table, threshold: float, aggregate: str, model_id: str, run_id: str, date: str
) -> pa.Table:
    """One row per study in `images` (all of its current image rows; only `ok` ones score)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if images.num_rows == 0:
        return STUDY_SCHEMA.empty_table()
    # One order, and one thread, whatever order the rows were read in: a mean's last bit depends
    # on the order it sums in, and a study whose mean moved by a bit would be written, counted
    # and reported again (its SR names its probability).
    images = images.sort_by([("study_id", "ascending"), ("path", "ascending")])
    status = images["status"]
    usable = pc.and_(pc.equal(status, "ok"), pc.is_valid(images["prob"]))
    counts = pa.table(
        {
            "study_id": images["study_id"],
            "one": pa.array(np.ones(images.num_rows, np.int32)),
            "is_error": pc.cast(pc.equal(status, "error"), pa.int32()),
            "is_skipped": pc.cast(pc.equal(status, "skipped"), pa.int32()),
            "score": pc.if_else(usable, images["prob"], pa.scalar(None, pa.float64())),
        }
    ).group_by("study_id", use_threads=False).aggregate([("one", "sum"), ("is_error", "sum"), ("is_skipped", "sum"), ("score", aggregate)])
    counts = counts.sort_by("study_id")
    prob = counts[f"score_{aggregate}"]
    flagged = pc.fill_null(pc.greater_equal(prob, threshold), False)
    rows = counts.num_rows

    def constant(value: Any, kind: pa.DataType) -> pa.Array:
        return pa.array([value] * rows, kind)

    return pa.Table.from_arrays(
        [
            counts["study_id"],
            pc.cast(counts["one_sum"], pa.int32()),
            pc.cast(counts["is_error_sum"], pa.int32()),
            pc.cast(counts["is_skipped_sum"], pa.int32()),
            prob,
            flagged,
            constant(threshold, pa.float64()),
            constant(aggregate, pa.string()),
            constant(model_id, pa.string()),
            constant(run_id, pa.string()),
            constant(None, pa.string()),
            constant(date, pa.string()),
        ],
        schema=STUDY_SCHEMA,
    )
