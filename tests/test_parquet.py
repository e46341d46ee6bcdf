"""Parquet datasets read into Ray Data: the rows pyarrow reads, and no process pool started for it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from ray.util.state import list_actors

from lungray.io.parquet import read_parquet


def footer_reader_actors() -> int:
    """FooterReader actors of the tests' Ray, named by its address: without one, the state API
    refuses to guess while another Ray runs on the machine (a benchmark, a second suite)."""
    address = ray.get_runtime_context().gcs_address
    return len(list_actors(address=address, filters=[("class_name", "=", "FooterReader")], limit=1000, raise_on_missing_output=False))


@pytest.mark.timeout(300)
def test_a_sharded_dataset_reads_as_pyarrow_reads_it_without_footer_reader_actors(ray_session: None, tmp_path: Path) -> None:
    for shard in range(4):
        rows = range(shard * 50, shard * 50 + 50)
        pq.write_table(pa.table({"id": list(rows), "split": ["train" if i % 3 else "val" for i in rows]}), tmp_path / f"{shard}.parquet")
    started = footer_reader_actors()
    context = ray.data.DataContext.get_current()
    chosen = context.use_datasource_v2

    dataset = read_parquet(str(tmp_path), pafs.LocalFileSystem(), columns=["id"])
    read = dataset.to_arrow_refs()

    assert context.use_datasource_v2 == chosen  # put back for the rest of the process
    expected = pads.dataset(tmp_path).to_table(columns=["id"])
    assert sorted(pa.concat_tables(ray.get(read))["id"].to_pylist()) == sorted(expected["id"].to_pylist())
    assert dataset.schema().names == ["id"]
    assert footer_reader_actors() == started
