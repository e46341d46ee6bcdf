"""The screening output tables: their schemas, the incremental ledger and study aggregation.

`images/scored_date=D/part-0.parquet` and `studies/scored_date=D/part-0.parquet` hold one
file per date (hive partitioning), rewritten whole by each run that scores on that date,
so a rerun replaces its rows instead of adding a second copy.
"""

from __future__ import annotations

import io
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lungray.screen.commit import Store

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
        ("run_id", pa.string()),
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
    ]
)
PART_FILE = "part-0.parquet"
AGGREGATES = ("max", "mean")


def partition_file(store: Store, table: str, date: str) -> str:
    return store.path(table, f"scored_date={date}", PART_FILE)


def read_partition(store: Store, table: str, date: str, schema: pa.Schema) -> pa.Table:
    path = partition_file(store, table, date)
    if not store.exists(path):
        return schema.empty_table()
    return pq.read_table(io.BytesIO(store.read(path)), schema=schema)


def read_all_images(store: Store, model_id: str) -> pa.Table:
    """Every image row this model has published, on any date, with its `scored_date`."""
    tables = []
    for path in store.files(store.path("images")):
        if posixpath.basename(path) != PART_FILE:
            continue
        date = posixpath.basename(posixpath.dirname(path)).removeprefix("scored_date=")
        table = pq.read_table(io.BytesIO(store.read(path)), schema=IMAGE_SCHEMA)
        table = table.filter(pc.equal(table["model_id"], model_id))
        tables.append(table.append_column("scored_date", pa.array([date] * table.num_rows, pa.string())))
    if not tables:
        return IMAGE_SCHEMA.append(pa.field("scored_date", pa.string())).empty_table()
    return pa.concat_tables(tables)


def already_scored(history: pa.Table) -> set[tuple[str, int, int | None]]:
    """(path, size, mtime) of every file this model has scored: what an incremental run skips."""
    return set(zip(history["path"].to_pylist(), history["size"].to_pylist(), history["mtime_ns"].to_pylist()))


def latest_per_path(history: pa.Table, new_rows: pa.Table) -> pa.Table:
    """The newest row of each file: tonight's rows win, then the latest date."""
    older = history.sort_by([("scored_date", "descending")]).select(IMAGE_SCHEMA.names)
    combined = pa.concat_tables([new_rows.select(IMAGE_SCHEMA.names), older])
    seen: set[str] = set()
    keep = []
    for index, path in enumerate(combined["path"].to_pylist()):
        if path not in seen:
            seen.add(path)
            keep.append(index)
    return combined.take(pa.array(keep, pa.int64()))


def aggregate_studies(
    images: pa.Table, study_ids: set[str], threshold: float, aggregate: str, model_id: str, run_id: str
) -> pa.Table:
    """One row per study in `study_ids`, over all of its images in `images` (only `ok` ones score)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    groups: dict[str, list[tuple[str, float | None]]] = {}
    for study, status, prob in zip(images["study_id"].to_pylist(), images["status"].to_pylist(), images["prob"].to_pylist()):
        if study in study_ids:
            groups.setdefault(study, []).append((status, prob))
    rows = []
    for study in sorted(groups):
        probs = [prob for status, prob in groups[study] if status == "ok" and prob is not None]
        study_prob = (max(probs) if aggregate == "max" else float(np.mean(probs))) if probs else None
        rows.append(
            {
                "study_id": study,
                "n_images": len(groups[study]),
                "n_errors": sum(1 for status, _ in groups[study] if status == "error"),
                "n_skipped": sum(1 for status, _ in groups[study] if status == "skipped"),
                "prob": study_prob,
                "flagged": study_prob is not None and study_prob >= threshold,
                "threshold": threshold,
                "aggregate": aggregate,
                "model_id": model_id,
                "run_id": run_id,
                "explain_path": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=STUDY_SCHEMA)


def replace_rows(existing: pa.Table, new_rows: pa.Table, keys: list[str]) -> pa.Table:
    """`existing` without the rows whose key columns match a new row, plus the new rows."""
    if existing.num_rows == 0:
        return new_rows
    new_keys = set(zip(*(new_rows[key].to_pylist() for key in keys)))
    keep = [key not in new_keys for key in zip(*(existing[key].to_pylist() for key in keys))]
    return pa.concat_tables([existing.filter(pa.array(keep)), new_rows])


def to_parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()
