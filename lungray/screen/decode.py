"""The screening job's decode task, in a module of its own so that decode workers stay light.

A Ray worker imports the module of the function it runs. This one needs only the
foundation's decode and preprocessing, not torch or the model code, which would add
seconds to the start of every decode worker process.
"""

from __future__ import annotations

import pyarrow as pa

from lungray.io.decode import DecodeOptions
from lungray.io.rows import rows_table
from lungray.io.scope import Scope
from lungray.preprocess import PreprocessConfig

SCREEN_COLUMNS = ["path", "study_id", "sop_uid", "status", "error", "skip_reason"]


def decode_for_screening(
    batch: pa.Table, preprocess: PreprocessConfig, decode: DecodeOptions, max_file_bytes: int, scope: Scope
) -> pa.Table:
    """Ray Data task: listed files -> the columns screening needs, plus the image tensors.

    No salt: screening writes no patient key, so decode workers compute none.
    """
    table = rows_table(
        batch["uri"].to_pylist(), batch["relpath"].to_pylist(), batch["size"].to_pylist(), preprocess, decode, max_file_bytes, scope, None
    )
    return table.select([*SCREEN_COLUMNS, "image"]).append_column("size", batch["size"]).append_column("mtime_ns", batch["mtime_ns"])
