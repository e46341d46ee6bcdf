"""Parquet datasets read into Ray Data without a process pool per read.

Ray 2.60's default Parquet reader (its "datasource V2") lists a dataset by starting a pool
of `FooterReader` actors, each a new Python process, for every `read_parquet`; they are
killed when the listing ends. lungray's datasets are tens of shards, so each read paid
more for starting those processes than for reading the footers: a training run reads its
train and val splits, an evaluation its test split (figures in docs/results.md, "Tenth
session"). The V1 reader, which Ray 2.60 still ships and selects by
`DataContext.use_datasource_v2`, reads the footers in the driver or in its read tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow.fs as pafs
import ray.data


def read_parquet(path: str, filesystem: pafs.FileSystem, columns: Sequence[str] | None = None) -> ray.data.Dataset:
    """`ray.data.read_parquet` through the reader that starts no actors.

    Ray chooses the reader when the dataset is created, from the calling process's
    DataContext, so it is switched for this call alone and put back.
    """
    context = ray.data.DataContext.get_current()
    chosen = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(path, filesystem=filesystem, columns=None if columns is None else list(columns))
    finally:
        context.use_datasource_v2 = chosen
