"""The screening job's worker-side steps (the decode task, a chunk's image rows), in a module
of their own so that the workers stay light.

A Ray worker imports the module of the function it runs. This one needs only the
foundation's decode and preprocessing, not torch or the model code, which would add
seconds to the start of every decode worker process.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from lungray.io.decode import DecodeOptions
from lungray.io.rows import rows_table
from lungray.io.scope import Scope
from lungray.preprocess import PreprocessConfig
from lungray.privacy import Pseudonymizer
from lungray.screen.tables import IMAGE_SCHEMA

SCREEN_COLUMNS = ["path", "study_id", "sop_uid", "status", "error", "skip_reason"]
# Planned columns that travel with each file through decode and scoring to its row.
CARRIED = ["size", "mtime_ns", "etag", "tries", "replaces"]


def decode_for_screening(
    batch: pa.Table, preprocess: PreprocessConfig, decode: DecodeOptions, max_file_bytes: int, scope: Scope
) -> pa.Table:
    """Ray Data task: listed files -> the columns screening needs, plus the image tensors.

    No salt: screening writes no patient key, so decode workers compute none.
    """
    table = rows_table(
        batch["uri"].to_pylist(), batch["relpath"].to_pylist(), batch["size"].to_pylist(), preprocess, decode, max_file_bytes, scope, None
    )
    table = table.select([*SCREEN_COLUMNS, "image"])
    for name in CARRIED:
        table = table.append_column(name, batch[name])
    return table


def as_image_rows(batch: pa.Table, model_id: str, run_id: str, date: str, pseudonymizer: Pseudonymizer | None) -> pa.Table:
    """Scored rows -> rows of the images table (keyed here, on the worker, with
    `--pseudonymize`), plus `replaces` for the commit to route them."""
    if pseudonymizer is not None:
        batch = pseudonymizer.table(batch)
    rows = batch.num_rows
    for name, value in (("model_id", model_id), ("run_id", run_id), ("scored_date", date)):
        batch = batch.append_column(name, pa.array([value] * rows, pa.string()))
    return batch.select([*IMAGE_SCHEMA.names, "replaces"]).cast(IMAGE_SCHEMA.append(pa.field("replaces", pa.bool_())))


def chunk_rows(
    model_id: str, run_id: str, date: str, pseudonymizer: Pseudonymizer | None, *scored: pa.Table
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Ray task: a chunk's scored blocks -> (its new image rows, its rows that replace earlier
    ones, and their `path, status, replaces` for the driver's check).

    One task per chunk, not a Ray Data pass per block: the chunk's check then needs no pass
    of its own, its new rows go to the table as one Parquet file instead of several, and no
    block needs a metadata task before the write.
    """
    rows = pa.concat_tables([as_image_rows(block, model_id, run_id, date, pseudonymizer) for block in scored])
    replacing = rows["replaces"]
    return (
        rows.filter(pc.invert(replacing)).drop_columns(["replaces"]),
        rows.filter(replacing).drop_columns(["replaces"]),
        rows.select(["path", "status", "replaces"]),
    )
