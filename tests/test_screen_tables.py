"""The screening tables at archive scale: the ledger, the study sync, leases and resume, readers, concurrency."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import SAMPLES
from deltalake import CommitProperties, DeltaTable, write_deltalake
from model_factory import untrained_model_dir

from lungray.io.decode import DecodeOptions
from lungray.io.listing import ListingReport, create_exclusive, iter_listing, read_bytes, write_whole
from lungray.io.rows import process_file
from lungray.raysession import free_port
from lungray.preprocess import PreprocessConfig
from lungray.screen import keying
from lungray.screen import lease as lease_module
from lungray.privacy import Pseudonymizer
from lungray.screen.keying import check_keying
from lungray.screen.lease import ConcurrentRunError, Lease
from lungray.screen.ledger import LedgerRule, plan
from lungray.screen.pipeline import ScreenConfig, resume_settings, run_screen
from lungray.screen.studies import driving_images, legacy_overlay_name, overlay_name, study_images, sync_studies, watermark, watermark_key
from lungray.screen.tables import IMAGE_SCHEMA, aggregate_studies, ensure_table, merge, open_table, read_table

DATE = "2026-11-29"
MODEL = "cnn-0123456789ab"


def image_rows(rows: list[dict]) -> pa.Table:
    defaults = {name: None for name in IMAGE_SCHEMA.names}
    defaults.update(model_id=MODEL, status="ok", tries=1, run_id="r0", scored_date=DATE)
    return pa.Table.from_pylist([{**defaults, **row} for row in rows], schema=IMAGE_SCHEMA)


def listing(rows: list[tuple[str, int, int | None, str | None]]) -> pa.Table:
    return pa.table(
        {
            "uri": [row[0] for row in rows],
            "relpath": [row[0] for row in rows],
            "size": pa.array([row[1] for row in rows], pa.int64()),
            "listed_mtime_ns": pa.array([row[2] for row in rows], pa.int64()),
            "etag": pa.array([row[3] for row in rows], pa.string()),
            "path": [row[0] for row in rows],
            "mtime_ns": pa.array([row[2] for row in rows], pa.int64()),
        }
    )


def test_ledger_decides_from_the_last_row_of_each_file(tmp_path: Path) -> None:
    ensure_table(str(tmp_path), "images")
    history = image_rows(
        [
            {"path": "/a/same", "size": 10, "mtime_ns": 1},
            {"path": "/a/grown", "size": 10, "mtime_ns": 1},
            {"path": "/a/touched", "size": 10, "mtime_ns": 1},
            {"path": "/a/retag", "size": 10, "mtime_ns": 1, "etag": "x"},
            {"path": "/a/error-once", "size": 10, "mtime_ns": 1, "status": "error", "tries": 1},
            {"path": "/a/error-max", "size": 10, "mtime_ns": 1, "status": "error", "tries": 3},
            {"path": "/a/resumed", "size": 10, "mtime_ns": 1, "run_id": "interrupted"},
            {"path": "/a/other-model", "size": 10, "mtime_ns": 1, "model_id": "cnn_lstm-ffffffffffff"},
        ]
    )
    write_deltalake(str(tmp_path / "images"), history, mode="append", partition_by=["scored_date"])
    listed = listing(
        [
            ("/a/same", 10, 1, None), ("/a/grown", 11, 1, None), ("/a/touched", 10, 2, None), ("/a/retag", 10, 1, "y"),
            ("/a/error-once", 10, 1, None), ("/a/error-max", 10, 1, None), ("/a/resumed", 10, 1, None),
            ("/a/other-model", 10, 1, None), ("/a/new", 5, 1, None),
        ]
    )
    images = open_table(str(tmp_path), "images")

    def decided(rule: LedgerRule) -> dict[str, tuple]:
        planned = plan(listed, images, MODEL, rule)
        return {row["path"]: (row["score"], row["replaces"], row["tries"]) for row in planned.to_pylist()}

    incremental = decided(LedgerRule(incremental=True, max_retries=3, resumed_runs=frozenset({"interrupted"})))
    assert incremental == {
        "/a/same": (False, True, 1),
        "/a/grown": (True, True, 1),
        "/a/touched": (True, True, 1),
        "/a/retag": (True, True, 1),
        "/a/error-once": (True, True, 2),  # a transient failure is tried again...
        "/a/error-max": (False, True, 4),  # ...until --max-retries
        "/a/resumed": (False, True, 1),
        "/a/other-model": (True, False, 1),  # another model's row is not this model's ledger
        "/a/new": (True, False, 1),
    }
    full = decided(LedgerRule(incremental=False, max_retries=3, resumed_runs=frozenset({"interrupted"})))
    assert [path for path, (score, _, _) in full.items() if not score] == ["/a/resumed"]  # a rerun of the same command resumes
    planned = plan(listed, images, MODEL, LedgerRule(incremental=True, max_retries=3))
    assert pc.sum(planned["given_up"]).as_py() == 1 and pc.sum(planned["resumed"]).as_py() == 0


def test_ledger_with_no_table_yet_scores_everything() -> None:
    planned = plan(listing([("/x", 1, 1, None)]), None, MODEL, LedgerRule(incremental=True, max_retries=3))
    assert planned["score"].to_pylist() == [True] and planned["replaces"].to_pylist() == [False]


def corrupt_partition(table_dir: Path, date: str) -> None:
    """Overwrite the partition's data files with bytes no Parquet reader accepts."""
    for data_file in (table_dir / f"scored_date={date}").glob("*.parquet"):
        data_file.write_bytes(b"not parquet")


def test_ledger_study_sync_and_merge_read_only_history_their_range_can_hold(tmp_path: Path) -> None:
    """A night under new folders must not read earlier nights: their files are corrupted here,
    so any read of them fails the test. A listing that reaches into them shows they would."""
    old, new = "2026-10-01", DATE
    output = str(tmp_path)
    ensure_table(output, "images")
    ensure_table(output, "studies")
    for date in (old, new):
        rows = image_rows(
            [{"path": f"/archive/{date}/s{i}/{i}.dcm", "study_id": f"{date}/s{i}", "size": 10, "mtime_ns": 1, "prob": 0.1, "scored_date": date} for i in range(4)]
            + [{"path": f"/archive/{date}/O'Brien/x.dcm", "study_id": f"{date}/O'Brien", "size": 10, "mtime_ns": 1, "prob": 0.9, "scored_date": date}]
        )
        write_deltalake(str(tmp_path / "images"), rows, mode="append", partition_by=["scored_date"])
        write_deltalake(str(tmp_path / "studies"), aggregate_studies(rows, 0.5, "max", MODEL, "r0", date), mode="append", partition_by=["scored_date"])
    corrupt_partition(tmp_path / "images", old)
    corrupt_partition(tmp_path / "studies", old)
    images = open_table(output, "images")

    tonight = listing([(f"/archive/{new}/O'Brien/x.dcm", 10, 1, None), (f"/archive/{new}/s1/1.dcm", 10, 1, None), (f"/archive/{new}/s9/9.dcm", 10, 1, None)])
    planned = plan(tonight, images, MODEL, LedgerRule(incremental=True, max_retries=3))
    assert planned["score"].to_pylist() == [False, False, True]  # the quoted path found, the new file to score

    found = study_images(images, MODEL, pa.array([f"{new}/O'Brien", f"{new}/s2"]))
    assert sorted(found["path"].to_pylist()) == [f"/archive/{new}/O'Brien/x.dcm", f"/archive/{new}/s2/2.dcm"]

    rescored = image_rows([{"path": f"/archive/{new}/s2/2.dcm", "study_id": f"{new}/s2", "prob": 0.8, "scored_date": new}])
    merge(open_table(output, "studies"), "studies", aggregate_studies(rescored, 0.5, "max", MODEL, "r1", new))
    studies = pa.Table.from_batches(open_table(output, "studies").to_pyarrow_dataset(partitions=[("scored_date", "=", new)]).to_batches())
    assert studies.num_rows == 5 and studies.filter(pc.equal(studies["study_id"].cast(pa.string()), f"{new}/s2"))["run_id"].to_pylist() == ["r1"]

    with pytest.raises(Exception):  # noqa: B017 - whichever error the reader gives for a corrupt file
        plan(listing([(f"/archive/{old}/s1/1.dcm", 10, 1, None)]), images, MODEL, LedgerRule(incremental=True, max_retries=3))


def test_study_aggregation_matches_a_pandas_groupby() -> None:
    rows = image_rows(
        [
            {"path": "1", "study_id": "s1", "prob": 0.2},
            {"path": "2", "study_id": "s1", "prob": 0.9},
            {"path": "3", "study_id": "s1", "status": "error"},
            {"path": "4", "study_id": "s2", "status": "skipped"},
            {"path": "5", "study_id": "s3", "prob": 0.3},
            {"path": "6", "study_id": "s3", "prob": 0.6},
        ]
    )
    frame = rows.to_pandas()
    for how in ("max", "mean"):
        studies = aggregate_studies(rows, 0.5, how, MODEL, "r1", DATE).to_pandas().set_index("study_id")
        usable = frame[frame["status"] == "ok"].groupby("study_id")["prob"].agg(how)
        expected = frame.groupby("study_id").agg(n_images=("path", "size"))
        assert studies["n_images"].to_dict() == expected["n_images"].to_dict()
        assert studies["n_errors"].to_dict() == {"s1": 1, "s2": 0, "s3": 0}
        assert studies["n_skipped"].to_dict() == {"s1": 0, "s2": 1, "s3": 0}
        assert studies["prob"].dropna().to_dict() == pytest.approx(usable.to_dict())
        assert pd.isna(studies.loc["s2", "prob"]) and not studies.loc["s2", "flagged"]
        assert studies["flagged"].to_dict() == {"s1": True, "s2": False, "s3": how == "max"}


def test_study_sync_catches_up_exactly_the_studies_whose_images_changed(tmp_path: Path) -> None:
    output = str(tmp_path)
    ensure_table(output, "images")
    first = image_rows([{"path": "1", "study_id": "s1", "prob": 0.2}, {"path": "2", "study_id": "s2", "prob": 0.7}])
    write_deltalake(str(tmp_path / "images"), first, mode="append", partition_by=["scored_date"])
    written = sync_studies(output, MODEL, 0.5, "max", "r1", DATE)
    assert sorted(written["study_id"].to_pylist()) == ["s1", "s2"]
    assert watermark(open_table(output, "studies"), MODEL).version == open_table(output, "images").version()
    assert sync_studies(output, MODEL, 0.5, "max", "r2", DATE).num_rows == 0  # nothing changed since

    # An images commit whose run was killed before its studies MERGE: the next sync finds it.
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "3", "study_id": "s1", "prob": 0.95}]), mode="append", partition_by=["scored_date"])
    written = sync_studies(output, MODEL, 0.5, "max", "r3", DATE)
    assert written["study_id"].to_pylist() == ["s1"]
    studies = {row["study_id"]: row for row in read_table(output, "studies").to_pylist()}
    assert (studies["s1"]["n_images"], studies["s1"]["prob"], studies["s1"]["run_id"]) == (2, 0.95, "r3")
    assert studies["s2"]["run_id"] == "r1" and len(studies) == 2


def test_a_study_whose_counts_stand_keeps_its_row_night_and_overlay(tmp_path: Path) -> None:
    """A rewritten data file (a MERGE of replaced rows, a compaction) made every study in it
    touched: each was upserted again under tonight's run and date and counted again as
    flagged, and under --pseudonymize a study whose driving image an earlier run scored lost
    its overlay. Only a study whose counts, probability, flag or settings change is written."""
    output = str(tmp_path)
    ensure_table(output, "images")
    first = image_rows(
        [{"path": "a1", "study_id": "a", "prob": 0.9}, {"path": "a2", "study_id": "a", "prob": 0.1}, {"path": "b1", "study_id": "b", "prob": 0.7}]
    )
    write_deltalake(str(tmp_path / "images"), first, mode="append", partition_by=["scored_date"])

    def overlay(night: str) -> Callable[[pa.Table, pa.Table], pa.Table]:
        def decorate(studies: pa.Table, images: pa.Table) -> pa.Table:
            """As --explain --pseudonymize names overlays, and on night 1 only (later nights
            cannot read the files an earlier night scored)."""
            driving = driving_images(images, studies["study_id"].to_pylist())
            paths = [
                f"{night}/{overlay_name(MODEL, driving[study])}" if night == "n1" and held is None and study in driving else held
                for study, held in zip(studies["study_id"].to_pylist(), studies["explain_path"].to_pylist())
            ]
            return studies.set_column(studies.schema.get_field_index("explain_path"), "explain_path", pa.array(paths, pa.string()))

        return decorate

    sync_studies(output, MODEL, 0.5, "max", "r1", "2026-11-28", overlay("n1"))
    # Night 2: a2 rescored lower (its row replaced: the file holding a1 and b1 is rewritten too).
    merge(open_table(output, "images"), "images", image_rows([{"path": "a2", "study_id": "a", "prob": 0.05, "run_id": "r2"}]))
    written = sync_studies(output, MODEL, 0.5, "max", "r2", DATE, overlay("n2"))
    assert written.num_rows == 0  # a's max and counts stand, b is untouched: nothing to write or count
    # Night 3: a new image in study a, below its max: a's count changes, its probability does not.
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "a3", "study_id": "a", "prob": 0.2}]), mode="append", partition_by=["scored_date"])
    written = sync_studies(output, MODEL, 0.5, "max", "r3", "2026-11-30", overlay("n3"))
    assert written["study_id"].to_pylist() == ["a"]
    studies = {row["study_id"]: row for row in read_table(output, "studies").to_pylist()}
    a1_overlay, b1_overlay = (f"n1/{overlay_name(MODEL, {'path': path, 'run_id': 'r0'})}" for path in ("a1", "b1"))
    assert (studies["a"]["n_images"], studies["a"]["run_id"], studies["a"]["scored_date"], studies["a"]["explain_path"]) == (3, "r3", "2026-11-30", a1_overlay)
    assert (studies["b"]["run_id"], studies["b"]["scored_date"], studies["b"]["explain_path"]) == ("r1", "2026-11-28", b1_overlay)
    # Night 4: a new top image in study a; the overlay of a1 no longer shows what flags it, and
    # this night cannot make one: none, rather than the wrong image's.
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "a4", "study_id": "a", "prob": 0.99}]), mode="append", partition_by=["scored_date"])
    sync_studies(output, MODEL, 0.5, "max", "r4", "2026-12-01", overlay("n4"))
    studies = {row["study_id"]: row for row in read_table(output, "studies").to_pylist()}
    assert studies["a"]["prob"] == 0.99 and studies["a"]["explain_path"] is None and studies["b"]["explain_path"] == b1_overlay


def test_a_mean_that_moves_keeps_the_overlay_of_the_image_that_still_drives_it(tmp_path: Path) -> None:
    """Under --aggregate mean every new image moves its study's probability. The overlay shows
    the study's top image, which a run with keyed paths cannot read again once an earlier
    chunk committed it: it was dropped because the probability moved, though the image it
    shows still drives the study."""
    output = str(tmp_path)
    ensure_table(output, "images")
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "a1", "study_id": "a", "prob": 0.9}]), mode="append", partition_by=["scored_date"])

    def first_chunk_only(studies: pa.Table, images: pa.Table) -> pa.Table:
        made = [held or f"n1/{overlay_name(MODEL, {'path': 'a1', 'run_id': 'r0'})}" for held in studies["explain_path"].to_pylist()]
        return studies.set_column(studies.schema.get_field_index("explain_path"), "explain_path", pa.array(made, pa.string()))

    sync_studies(output, MODEL, 0.5, "mean", "r1", DATE, first_chunk_only)
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "a2", "study_id": "a", "prob": 0.7}]), mode="append", partition_by=["scored_date"])
    written = sync_studies(output, MODEL, 0.5, "mean", "r1", DATE, lambda studies, images: studies)
    assert written["prob"].to_pylist() == [pytest.approx(0.8)]
    assert written["explain_path"].to_pylist() == [f"n1/{overlay_name(MODEL, {'path': 'a1', 'run_id': 'r0'})}"]


def test_an_overlay_named_as_before_is_kept_while_its_study_probability_stands(tmp_path: Path) -> None:
    """Outputs screened before overlays were named by their image hold names by study: kept
    by the rule they were made under (the probability stands), not dropped at the next
    change of the study's counts by a run that cannot draw them again."""
    output = str(tmp_path)
    ensure_table(output, "images")
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "a1", "study_id": "a", "prob": 0.9}]), mode="append", partition_by=["scored_date"])
    old_name = f"explain/scored_date=2026-11-28/{hashlib.sha256(b'a').hexdigest()[:24]}.png"

    def named_as_before(studies: pa.Table, images: pa.Table) -> pa.Table:
        return studies.set_column(studies.schema.get_field_index("explain_path"), "explain_path", pa.array([old_name], pa.string()))

    sync_studies(output, MODEL, 0.5, "max", "r1", DATE, named_as_before)
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "a2", "study_id": "a", "status": "error"}]), mode="append", partition_by=["scored_date"])
    written = sync_studies(output, MODEL, 0.5, "max", "r2", DATE)  # a run without --explain: counts change, max stands
    assert written["n_errors"].to_pylist() == [1] and written["explain_path"].to_pylist() == [old_name]
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "a3", "study_id": "a", "prob": 0.95}]), mode="append", partition_by=["scored_date"])
    assert sync_studies(output, MODEL, 0.5, "max", "r3", DATE)["explain_path"].to_pylist() == [None]  # it no longer shows the top image


def test_an_overlay_the_table_no_longer_names_is_deleted_after_the_commit(tmp_path: Path) -> None:
    """An overlay is a derived image of a patient's film: once the study is unflagged, or
    another image drives it, no row names it, and it was left on disk for good. Files named by
    study alone (before overlays were named by image) are left: two models' rows can share one."""
    output = str(tmp_path)
    ensure_table(output, "images")
    rows = [{"path": "a1", "study_id": "a", "prob": 0.9}, {"path": "b1", "study_id": "b", "prob": 0.8}, {"path": "c1", "study_id": "c", "prob": 0.7}]
    write_deltalake(str(tmp_path / "images"), image_rows(rows), mode="append", partition_by=["scored_date"])

    def drawing(studies: pa.Table, images: pa.Table) -> pa.Table:
        driving = driving_images(images, studies["study_id"].to_pylist())
        paths = []
        for study, flagged, held in zip(studies["study_id"].to_pylist(), studies["flagged"].to_pylist(), studies["explain_path"].to_pylist()):
            if flagged and held is None:
                name = legacy_overlay_name(study) if study == "c" else overlay_name(MODEL, driving[study])
                held = str(tmp_path / "explain" / name)
                Path(held).parent.mkdir(exist_ok=True)
                Path(held).write_bytes(b"overlay of " + study.encode())
            paths.append(held)
        return studies.set_column(studies.schema.get_field_index("explain_path"), "explain_path", pa.array(paths, pa.string()))

    def overlays() -> dict[str, str | None]:
        return {row["study_id"]: row["explain_path"] for row in read_table(output, "studies").to_pylist()}

    sync_studies(output, MODEL, 0.5, "max", "r1", DATE, drawing)
    first = overlays()
    assert all(Path(path).is_file() for path in first.values())
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": "a2", "study_id": "a", "prob": 0.95}]), mode="append", partition_by=["scored_date"])
    sync_studies(output, MODEL, 0.5, "max", "r2", DATE, drawing)  # a2 drives study a now
    second = overlays()
    assert second["a"] != first["a"] and Path(second["a"]).is_file() and not Path(first["a"]).exists()
    sync_studies(output, MODEL, 0.99, "max", "r3", DATE, drawing)  # a new threshold unflags all three
    assert set(overlays().values()) == {None}
    assert not Path(second["a"]).exists() and not Path(first["b"]).exists() and Path(first["c"]).is_file()


def test_the_driving_image_and_its_overlay_name_depend_on_nothing_but_the_image_and_the_model() -> None:
    """Of equal top probabilities the smallest path drives the study, in any row order; two
    models' overlays of one image, or one model's of two scorings of it, are different files."""
    rows = image_rows([{"path": path, "study_id": "s", "prob": 0.8} for path in ("b", "a", "c")])
    assert driving_images(rows, ["s"])["s"]["path"] == driving_images(rows.take([2, 1, 0]), ["s"])["s"]["path"] == "a"
    image = {"path": "a", "run_id": "r1"}
    assert len({overlay_name("m1", image), overlay_name("m2", image), overlay_name("m1", {**image, "run_id": "r2"})}) == 3


def test_a_study_mean_is_the_same_to_the_last_bit_in_any_row_order() -> None:
    """A scan may return a study's rows in another order after a MERGE rewrote its files; the
    mean's last bit followed the order, and the study was written, counted and reported again."""
    probs = np.random.default_rng(3).random(60)
    rows = image_rows([{"path": f"{index:03d}", "study_id": "s", "prob": float(prob)} for index, prob in enumerate(probs)])
    means = {
        aggregate_studies(rows.take(np.random.default_rng(seed).permutation(rows.num_rows)), 0.5, "mean", MODEL, "r1", DATE)["prob"][0].as_py()
        for seed in range(40)
    }
    assert len(means) == 1 and means.pop() == pytest.approx(probs.mean(), rel=1e-15)


def test_a_new_threshold_or_aggregate_reaggregates_every_study(tmp_path: Path) -> None:
    """Under --incremental only touched studies were aggregated again: after a threshold edit
    or --aggregate mean, the table mixed studies flagged under the old setting and the new."""
    output = str(tmp_path)
    ensure_table(output, "images")
    rows = image_rows([{"path": "a1", "study_id": "a", "prob": 0.9}, {"path": "a2", "study_id": "a", "prob": 0.5}, {"path": "b1", "study_id": "b", "prob": 0.6}])
    write_deltalake(str(tmp_path / "images"), rows, mode="append", partition_by=["scored_date"])
    sync_studies(output, MODEL, 0.5, "max", "r1", DATE)
    written = sync_studies(output, MODEL, 0.65, "max", "r2", DATE)  # nothing new in the images table
    assert sorted(written["study_id"].to_pylist()) == ["a", "b"]
    assert {row["study_id"]: row["flagged"] for row in read_table(output, "studies").to_pylist()} == {"a": True, "b": False}
    written = sync_studies(output, MODEL, 0.65, "mean", "r3", DATE)
    assert sorted(written["study_id"].to_pylist()) == ["a", "b"]  # each row records its aggregate
    studies = {row["study_id"]: row for row in read_table(output, "studies").to_pylist()}
    assert (studies["a"]["prob"], studies["a"]["flagged"], studies["a"]["aggregate"]) == (pytest.approx(0.7), True, "mean")
    assert sync_studies(output, MODEL, 0.65, "mean", "r4", DATE).num_rows == 0


@pytest.mark.parametrize("vacuumed", [False, True], ids=["since-the-watermark", "every-study-again"])
def test_a_study_left_without_images_is_deleted_with_the_sync(tmp_path: Path, vacuumed: bool) -> None:
    """A file unreadable one night is counted in its folder's study; read on a retry, it moves
    to its header's study. The folder's study has no image left and must go, not stay as a
    failed study on the worklist; another model's study of the same id stays."""
    output = str(tmp_path)
    ensure_table(output, "images")
    night_one = image_rows(
        [
            {"path": "/n/P1/a.dcm", "study_id": "P1", "status": "error", "error": "could not read file"},
            {"path": "/n/P1/b.dcm", "study_id": "1.2.3", "prob": 0.2},
            {"path": "/n/P1/a.dcm", "study_id": "P1", "prob": 0.4, "model_id": "cnn_lstm-ffffffffffff"},
        ]
    )
    write_deltalake(str(tmp_path / "images"), night_one, mode="append", partition_by=["scored_date"])
    sync_studies(output, MODEL, 0.5, "max", "r1", DATE)
    sync_studies(output, "cnn_lstm-ffffffffffff", 0.5, "max", "r1", DATE)
    retried = image_rows([{"path": "/n/P1/a.dcm", "study_id": "1.2.3", "prob": 0.9, "tries": 2, "run_id": "r2"}])
    merge(open_table(output, "images"), "images", retried)
    if vacuumed:  # the replaced rows' file vacuumed: every study of the model is aggregated again
        open_table(output, "images").vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    sync_studies(output, MODEL, 0.5, "max", "r2", DATE)
    studies = {(row["model_id"], row["study_id"]): row for row in read_table(output, "studies").to_pylist()}
    assert sorted(studies) == [("cnn-0123456789ab", "1.2.3"), ("cnn_lstm-ffffffffffff", "P1")]
    assert (studies[(MODEL, "1.2.3")]["n_images"], studies[(MODEL, "1.2.3")]["n_errors"]) == (2, 0)
    assert studies[(MODEL, "1.2.3")]["flagged"]


def test_a_models_watermark_is_found_behind_many_commits_of_another_model(tmp_path: Path) -> None:
    table = str(tmp_path / "studies")
    one = pa.table({"n": [1]})
    write_deltalake(table, one, commit_properties=CommitProperties(custom_metadata={watermark_key("old-model"): "7"}))
    for version in range(40):  # more than the first window of the newest commits
        write_deltalake(table, one, mode="append", commit_properties=CommitProperties(custom_metadata={watermark_key(MODEL): str(version)}))
    studies = DeltaTable(table)
    assert (watermark(studies, "old-model").version, watermark(studies, MODEL).version, watermark(studies, "never-synced")) == (7, 39, None)


def marker(tmp_path: Path, **changes) -> Path:
    now = time.time()
    fields = {
        "run_id": "old-run", "model_id": MODEL, "fingerprint": "f1", "host": socket.gethostname(), "pid": os.getpid(),
        "started_at": now - 60, "heartbeat_at": now, "state": "running", "resumes": [],
    }
    fields.update(changes)
    folder = tmp_path / lease_module.ACTIVE / MODEL
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fields['run_id']}.json"
    path.write_text(json.dumps(fields))
    return path


def dead_pid() -> int:
    pid = 4_000_000
    while lease_module.pid_alive(pid):
        pid -= 1
    return pid


def test_a_live_run_refuses_a_second_one_and_leaves_no_claim(tmp_path: Path) -> None:
    marker(tmp_path)  # this very process, heartbeat now: live
    with pytest.raises(ConcurrentRunError, match="run old-run on .* Nothing was written"):
        Lease(str(tmp_path), MODEL, "new-run", "f1").acquire()
    assert [path.name for path in (tmp_path / lease_module.ACTIVE / MODEL).iterdir()] == ["old-run.json"]
    other_host = marker(tmp_path, run_id="remote", host="another-node", pid=1)
    os.remove(tmp_path / lease_module.ACTIVE / MODEL / "old-run.json")
    with pytest.raises(ConcurrentRunError, match="another-node"):
        Lease(str(tmp_path), MODEL, "new-run", "f1").acquire()
    other_host.unlink()
    other_model = Lease(str(tmp_path), "cnn_lstm-ffffffffffff", "x", "f1")
    assert other_model.acquire() == ()  # another model's runs do not conflict
    other_model.release(failed=False)


class WriteInterrupted:
    """A filesystem whose writes run `during` first: the moment between a heartbeat's open
    of its output and its bytes, when a reader must still find the whole marker."""

    def __init__(self, fs, during) -> None:
        self.fs, self.during = fs, during

    def __getattr__(self, name: str):
        return getattr(self.fs, name)

    def open_output_stream(self, path: str):
        stream, during = self.fs.open_output_stream(path), self.during

        class Paused:
            def __enter__(self):
                return self

            def write(self, data: bytes) -> None:
                during()
                stream.write(data)

            def __exit__(self, *exc) -> None:
                stream.close()

        return Paused()


def test_a_run_caught_mid_heartbeat_still_holds_its_claim(tmp_path: Path) -> None:
    live = Lease(str(tmp_path), MODEL, "live-run", "f1")
    live.acquire()
    refused = []

    def second_run() -> None:
        with pytest.raises(ConcurrentRunError, match="live-run"):
            Lease(str(tmp_path), MODEL, "second-run", "f1").acquire()
        refused.append(True)

    live.fs = WriteInterrupted(live.fs, second_run)
    live._write(replace(live.marker, heartbeat_at=time.time()))  # what the heartbeat thread does
    live.fs = live.fs.fs
    assert refused == [True]
    assert [path.name for path in (tmp_path / lease_module.ACTIVE / MODEL).iterdir()] == ["live-run.json"]
    live.release(failed=False)


@pytest.mark.parametrize(
    "interrupted",
    [
        {"pid": None},  # the driver was killed: its pid is gone
        {"host": "another-node", "heartbeat_at": time.time() - 10 * lease_module.STALE_AFTER_SECONDS},  # silent for too long
        {"state": "failed"},  # the run raised and left its marker for the rerun
    ],
)
def test_an_interrupted_run_of_the_same_command_is_resumed(tmp_path: Path, interrupted: dict) -> None:
    marker(tmp_path, run_id="older", pid=dead_pid(), state="failed", started_at=1.0, heartbeat_at=1.0)
    marker(tmp_path, **{**interrupted, "pid": interrupted.get("pid") or dead_pid(), "resumes": ["older"]})
    marker(tmp_path, run_id="other-command", fingerprint="f2", pid=dead_pid())
    run = Lease(str(tmp_path), MODEL, "new-run", "f1")
    assert run.acquire() == ("older", "old-run")
    names = sorted(path.name for path in (tmp_path / lease_module.ACTIVE / MODEL).iterdir())
    assert names == ["new-run.json", "other-command.json"]  # another command's marker is left for its own rerun
    assert json.loads((tmp_path / lease_module.ACTIVE / MODEL / "new-run.json").read_text())["resumes"] == ["older", "old-run"]
    run.release(failed=True)
    assert json.loads((tmp_path / lease_module.ACTIVE / MODEL / "new-run.json").read_text())["state"] == "failed"


def test_a_rerun_after_midnight_is_the_same_command() -> None:
    """The date stamps rows only: a run killed at 23:50 UTC and rerun at 00:10 (the cron line's
    `--date` moved on) resumes; another input or model is another command."""
    before = ScreenConfig(model="m", input="/archive", output="/out", date="2026-12-07")
    assert lease_module.fingerprint(resume_settings(before, MODEL)) == lease_module.fingerprint(
        resume_settings(replace(before, date="2026-12-08"), MODEL)
    )
    assert lease_module.fingerprint(resume_settings(before, MODEL)) != lease_module.fingerprint(
        resume_settings(replace(before, input="/archive/2026"), MODEL)
    )
    assert lease_module.fingerprint(resume_settings(before, MODEL)) != lease_module.fingerprint(resume_settings(before, "cnn_lstm-ffffffffffff"))


def test_listing_streams_in_bounded_sorted_batches(tmp_path: Path) -> None:
    for index in range(23):
        folder = tmp_path / f"d{index % 3}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{index:02d}.bin").write_bytes(b"x" * index)
    batches = list(iter_listing(str(tmp_path), batch_rows=5))
    assert [batch.num_rows for batch in batches] == [5, 5, 5, 5, 3]
    relpaths = [path for batch in batches for path in batch["relpath"].to_pylist()]
    assert relpaths == sorted(relpaths) and len(set(relpaths)) == 23
    sizes = {row["relpath"]: row["size"] for batch in batches for row in batch.to_pylist()}
    assert sizes["d1/f22.bin"] == 22 and all(row["etag"] is None for batch in batches for row in batch.to_pylist())
    with pytest.raises(FileNotFoundError):
        list(iter_listing(str(tmp_path / "missing")))


@pytest.mark.timeout(60)
def test_each_file_is_listed_once_under_one_path_whatever_links_point_at_it(tmp_path: Path) -> None:
    """A link back up the tree listed the same file again under ever longer paths (41 rows for one
    file with `study/up -> ..`; with a second loop, exponentially many: the listing never ended),
    and a rotating link inside the root (`_latest -> 2026-11-27`) moved a file to another path."""
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "1.dcm").write_bytes(b"x")
    (tmp_path / "study" / "up").symlink_to("..")
    (tmp_path / "study" / "same").symlink_to(".")
    (tmp_path / "_latest").symlink_to("study")
    outside = tmp_path.parent / f"{tmp_path.name}-shared"
    outside.mkdir()
    (outside / "2.dcm").write_bytes(b"y")
    (outside / "back").symlink_to(tmp_path)  # from outside back into the root: its files are there already
    (tmp_path / "shared").symlink_to(outside)  # a linked folder outside the root is listed, once
    (tmp_path / "shared-again").symlink_to(outside)
    relpaths = [path for batch in iter_listing(str(tmp_path)) for path in batch["relpath"].to_pylist()]
    assert relpaths == ["shared/2.dcm", "study/1.dcm"]


def test_a_link_to_nothing_is_listed_and_its_row_says_why(tmp_path: Path) -> None:
    """A dangling symlink (a film moved away under its link) was left out without a row or a count."""
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "1.dcm").write_bytes(b"x")
    (tmp_path / "study" / "2.dcm").symlink_to(tmp_path / "moved-away.dcm")
    (listed,) = iter_listing(str(tmp_path))
    rows = {row["relpath"]: row for row in listed.to_pylist()}
    assert sorted(rows) == ["study/1.dcm", "study/2.dcm"] and rows["study/2.dcm"]["size"] is None
    row, tensor = process_file(rows["study/2.dcm"]["uri"], "study/2.dcm", None, PreprocessConfig(), DecodeOptions(), 1 << 30, None, None)
    assert tensor is None and row["error"] == "could not read file: FileNotFoundError: No such file or directory"


def test_s3_keys_that_pyarrow_refuses_are_listed_and_read(s3_bucket: str) -> None:
    """S3 keys may hold empty and dot segments; pyarrow's S3 filesystem cannot open them, so such
    files were error rows every night until given up, counted in a folder study."""
    import boto3

    from lungray.io.listing import filesystem_for

    client = boto3.client("s3")
    keys = ["odd//a.dcm", "odd/./b.dcm", "odd/../c.dcm", "plain/d.dcm"]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=f"archive/{key}", Body=key.encode())
    (listed,) = iter_listing(f"s3://{s3_bucket}/archive")
    assert sorted(listed["relpath"].to_pylist()) == sorted(keys)
    for row in listed.to_pylist():
        assert read_bytes(row["uri"]) == row["relpath"].encode()
    fs, path = filesystem_for(f"s3://{s3_bucket}/archive/odd//a.dcm")
    with pytest.raises(Exception, match="[Ee]mpty path component"):  # the case: pyarrow's own reading
        fs.open_input_stream(path).read()


def test_an_s3_input_that_cannot_be_listed_is_not_found_with_its_reason(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket that is not there, or credentials S3 refuses, gave botocore's traceback (exit 1);
    it is the input-not-found error a local folder gives (exit 2), with S3's reason."""
    with pytest.raises(FileNotFoundError, match=r"input cannot be listed: s3://no-such-bucket-here/tonight \(NoSuchBucket\)"):
        list(iter_listing("s3://no-such-bucket-here/tonight"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: botocore's own error
    with pytest.raises(FileNotFoundError, match=r"input cannot be listed: s3://any-bucket \(EndpointConnectionError\)"):
        list(iter_listing("s3://any-bucket"))


def test_two_writers_of_one_whole_file_do_not_trip_over_each_other(tmp_path: Path) -> None:
    """Two first runs into one OUTPUT both record its keying: with one temporary name, the second
    rename found the first had taken it (FileNotFoundError) and that run failed."""
    target = str(tmp_path / "_lungray" / "keying.json")
    errors: list[BaseException] = []

    def write(index: int) -> None:
        try:
            for _ in range(200):
                write_whole(target, json.dumps({"writer": index}).encode())
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and json.loads(Path(target).read_text())["writer"] in (0, 1)
    assert [path.name for path in (tmp_path / "_lungray").iterdir()] == ["keying.json"]


def test_an_unreadable_root_is_an_error_not_an_empty_night(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale mount or a permission change listed nothing, exit 0: a quiet night to monitoring."""
    real_scandir = os.scandir

    def refuse(path: object) -> object:
        if os.fspath(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(FileNotFoundError, match="input cannot be listed: .*Permission denied"):
        list(iter_listing(str(tmp_path)))


def test_an_unreadable_subfolder_is_counted_and_warned_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Its files can have no row; they were left out without a word."""
    for folder in ("DOE_JANE", "open"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1.dcm").write_bytes(b"x")
    real_scandir = os.scandir

    def refuse(path: object) -> object:
        if os.fspath(path).endswith("DOE_JANE"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    report = ListingReport()
    relpaths = [path for batch in iter_listing(str(tmp_path), report=report) for path in batch["relpath"].to_pylist()]
    assert relpaths == ["open/1.dcm"] and report.unlisted_folders == 1
    assert "could not be listed (PermissionError)" in caplog.text and "DOE_JANE" not in caplog.text  # the name may be a patient's

def test_a_name_that_is_no_utf8_is_listed_once_and_read(tmp_path: Path) -> None:
    """A Latin-1 folder and file name (an old SMB share) cannot be an Arrow string: it is
    listed as a file:// URI of its bytes and read back, beside names that stay as they are."""
    picture = (SAMPLES / "kermany-mini" / "NORMAL").glob("*.jpeg").__next__().read_bytes()
    latin1_folder = os.path.join(os.fsencode(tmp_path), b"M\xfcller^Hans")
    os.mkdir(latin1_folder)
    with open(os.path.join(latin1_folder, b"1.jpeg"), "wb") as file:
        file.write(picture)
    (tmp_path / "Zoë 50%").mkdir()
    (tmp_path / "Zoë 50%" / "2.jpeg").write_bytes(picture)
    (listed,) = iter_listing(str(tmp_path))
    rows = {row["relpath"]: row for row in listed.to_pylist()}
    assert sorted(rows) == ["M%FCller%5EHans/1.jpeg", "Zoë 50%/2.jpeg"]
    assert rows["M%FCller%5EHans/1.jpeg"]["uri"] == f"file://{tmp_path}/M%FCller%5EHans/1.jpeg"
    assert rows["Zoë 50%/2.jpeg"]["uri"] == str(tmp_path / "Zoë 50%" / "2.jpeg")
    for row in rows.values():
        assert read_bytes(row["uri"]) == picture
        scored, tensor = process_file(row["uri"], row["relpath"], row["size"], PreprocessConfig(), DecodeOptions(), 1 << 30, None, None)
        assert scored["status"] == "ok" and tensor is not None


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label.lower()).mkdir()
        for path in sorted((SAMPLES / "kermany-mini" / label).glob("*.jpeg"))[:5]:
            shutil.copy(path, root / label.lower() / path.name)
    return root


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(600)
def test_tables_read_back_with_pandas_polars_and_duckdb(tmp_path: Path, archive: Path) -> None:
    model = untrained_model_dir(tmp_path / "model", threshold=0.5)
    output = tmp_path / "out"
    run_screen(ScreenConfig(model=str(model), input=str(archive), output=str(output), date=DATE))
    expected = read_table(str(output), "images")

    with_pandas = DeltaTable(str(output / "images")).to_pandas()
    with_polars = pl.read_delta(str(output / "images"))
    images = DeltaTable(str(output / "images")).to_pyarrow_dataset()  # DuckDB scans the Arrow dataset: no extension download
    with_duckdb = duckdb.sql("select path, prob from images order by path").fetchall()
    assert sorted(with_pandas["path"]) == sorted(with_polars["path"].to_list()) == sorted(expected["path"].to_pylist())
    assert [path for path, _ in with_duckdb] == sorted(expected["path"].to_pylist())
    assert dict(with_duckdb) == pytest.approx(dict(zip(expected["path"].to_pylist(), expected["prob"].to_pylist())))
    studies = pl.read_delta(str(output / "studies")).sort("study_id")
    assert studies["study_id"].to_list() == ["normal", "pneumonia"] and studies["n_images"].to_list() == [5, 5]
    counts = DeltaTable(str(output / "studies")).to_pyarrow_dataset()
    assert duckdb.sql("select sum(n_images) from counts").fetchall() == [(10,)]


def readme_readers() -> dict[str, str]:
    """The README's table readers (its Output contract), each as a script of its own: the lines
    its comment names, after the block's imports that it uses."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    contract = readme[readme.index("### Output contract") :]
    block = contract[contract.index("```python\n") + len("```python\n") : contract.index("```\n", contract.index("```python"))]
    lines = block.splitlines()
    return {
        "pandas": "\n".join([lines[0], *(line for line in lines if line.endswith("# pandas"))]),
        "Polars": "\n".join(line for line in lines if line.endswith("# Polars")),
        "DuckDB": "\n".join([lines[0], *(line for line in lines if "duckdb" in line)]),
        "Arrow": "\n".join([lines[0], *(line for line in lines if "QueryBuilder()" in line or line.endswith("# Arrow"))]),
        "read_table": 'from lungray.screen.tables import read_table; images = read_table("OUTPUT", "images")',
    }


@pytest.mark.parametrize(
    ("reader", "check"),
    [("pandas", "len(images)"), ("Polars", "studies.height"), ("DuckDB", "flagged.count_rows()"), ("Arrow", "table.num_rows"), ("read_table", "images.num_rows")],
)
def test_each_readme_reader_runs_alone_and_exits_cleanly(tmp_path: Path, reader: str, check: str) -> None:
    """Each reader the README shows, and lungray's own, pasted alone into a script, reads the
    tables and exits 0, in 4 fresh interpreters: on a partitioned table deltalake 1.6.6's
    `to_pyarrow_table()` and `to_pyarrow_dataset().to_table()` return the table and then abort
    the interpreter at exit (code 134) in about half the runs, which no in-process test sees."""
    output, n = tmp_path / "OUTPUT", 200
    images = image_rows([{"path": f"{index}.dcm", "prob": 0.5} for index in range(n)])
    studies = pa.table({"study_id": [f"s{index}" for index in range(n)], "prob": [0.5] * n, "flagged": [True] * n, "scored_date": [DATE] * n})
    for name, table in (("images", images), ("studies", studies)):  # partitioned as lungray's are
        write_deltalake(str(output / name), table, partition_by=["scored_date"])
    script = readme_readers()[reader].replace('"OUTPUT', f'"{output}') + f"\nprint({check})\n"
    for _ in range(4):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == str(n)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(600)
def test_a_window_commits_chunks_as_its_rows_stream_out(tmp_path: Path, archive: Path) -> None:
    """Windows of 8 files (two executions for 10 files), a commit whenever the minutes bound has
    passed (here: at every block of 2 files, decoded and scored 2 at a time): more chunks than windows, each its own Delta
    commit of at most a window's files, and one row per file in the end."""
    model = untrained_model_dir(tmp_path / "model", threshold=0.5)
    output = tmp_path / "out"
    summary = run_screen(
        ScreenConfig(model=str(model), input=str(archive), output=str(output), date=DATE, chunk_files=8, chunk_minutes=1e-9, files_per_task=2, batch_size=2)
    )
    writes = [entry for entry in DeltaTable(str(output / "images")).history() if entry["operation"] == "WRITE"]
    assert summary["chunks"] == len(writes) >= 3
    rows_at = [DeltaTable(str(output / "images"), version=entry["version"]).to_pyarrow_table().num_rows for entry in writes]
    added = [after - before for before, after in zip([0, *sorted(rows_at)], sorted(rows_at))]
    assert all(0 < rows <= 8 for rows in added) and sum(added) == 10
    images = read_table(str(output), "images")
    assert images.num_rows == 10 and len(set(images["path"].to_pylist())) == 10
    assert sum(read_table(str(output), "studies")["n_images"].to_pylist()) == 10


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(600)
def test_a_file_unreadable_then_readable_again_is_retried_and_its_row_replaced(tmp_path: Path, archive: Path) -> None:
    model = untrained_model_dir(tmp_path / "model", threshold=0.5)
    local = tmp_path / "archive"
    shutil.copytree(archive, local)
    film = sorted((local / "normal").iterdir())[0]
    good, stat = film.read_bytes(), film.stat()
    film.write_bytes(b"\0" * len(good))  # a transient failure: unreadable, same size and mtime
    os.utime(film, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    output = tmp_path / "out"
    config = ScreenConfig(model=str(model), input=str(local), output=str(output), date=DATE, incremental=True)
    run_screen(config)
    row = read_table(str(output), "images", filter=pc.field("path") == str(film)).to_pylist()
    assert [(r["status"], r["tries"]) for r in row] == [("error", 1)]

    film.write_bytes(good)
    os.utime(film, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    healed = run_screen(replace(config, date="2026-11-30"))
    assert (healed["files_scored"], healed["files_retried"], healed["files_replaced"]) == (1, 1, 1)
    images = read_table(str(output), "images")
    assert images.num_rows == 10 and len(set(images["path"].to_pylist())) == 10
    row = images.filter(pc.equal(images["path"], str(film))).to_pylist()[0]
    assert (row["status"], row["tries"], row["scored_date"]) == ("ok", 2, "2026-11-30") and 0 <= row["prob"] <= 1
    normal = read_table(str(output), "studies", filter=pc.field("study_id") == "normal").to_pylist()[0]
    assert (normal["n_errors"], normal["n_images"], normal["scored_date"]) == (0, 5, "2026-11-30")


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(600)
def test_runs_of_two_models_at_once_both_commit_and_a_second_run_of_one_is_refused(tmp_path: Path, archive: Path) -> None:
    models = [untrained_model_dir(tmp_path / name, threshold=0.5, arch=name) for name in ("cnn", "cnn_lstm")]
    output = tmp_path / "out"
    configs = [ScreenConfig(model=str(model), input=str(archive), output=str(output), date=DATE, chunk_files=4) for model in models]
    results: list[object] = []

    def screen(config: ScreenConfig) -> None:
        try:
            results.append(run_screen(config))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            results.append(exc)

    threads = [threading.Thread(target=screen, args=(config,)) for config in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=500)
    assert all(isinstance(result, dict) for result in results), results
    images = read_table(str(output), "images")
    assert images.num_rows == 20 and images.group_by("model_id").aggregate([("path", "count_distinct")])["path_count_distinct"].to_pylist() == [10, 10]
    studies = read_table(str(output), "studies")
    assert sorted(zip(studies["model_id"].to_pylist(), studies["n_images"].to_pylist())) == sorted(
        (result["model_id"], 5) for result in results for _ in range(2)
    )

    cnn_id = next(result["model_id"] for result in results if result["model_id"].startswith("cnn-"))  # configs[0]'s model
    holder = Lease(str(output), cnn_id, "someone-else", "f")
    holder.acquire()
    try:
        version = open_table(str(output), "images").version()
        with pytest.raises(ConcurrentRunError, match="run someone-else"):
            run_screen(configs[0])
        assert open_table(str(output), "images").version() == version  # refused before anything was written
    finally:
        holder.release(failed=False)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_two_first_runs_keyed_otherwise_cannot_both_record_their_keying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage: str, request: pytest.FixtureRequest
) -> None:
    """Two first runs into one new OUTPUT at once, one pseudonymized and one not, both found no
    record and both recorded theirs, the last one winning: the other run went on keying rows as
    the record no longer said. Now the record is created only where none is, so exactly one
    run goes ahead and the other is refused, whichever comes second."""
    output = str(tmp_path) if storage == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    both_looked = threading.Barrier(2)

    def no_rows_once_both_have_looked(output: str) -> None:
        both_looked.wait(timeout=30)  # neither writes before both have seen no record and no rows
        return None

    monkeypatch.setattr(keying, "keying_of_rows", no_rows_once_both_have_looked)
    outcomes: dict[str, BaseException | None] = {}

    def run(name: str, pseudonymizer: Pseudonymizer | None) -> None:
        try:
            check_keying(output, pseudonymizer)
            outcomes[name] = None
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions below
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=args) for args in (("keyed", Pseudonymizer("site-secret")), ("raw", None))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (went_ahead,) = [name for name, error in outcomes.items() if error is None]
    (refused,) = [error for error in outcomes.values() if error is not None]
    assert isinstance(refused, ValueError) and "pseudonymize" in str(refused)
    recorded = json.loads(read_bytes(f"{output}/_lungray/keying.json"))
    assert recorded["pseudonymized"] is (went_ahead == "keyed")


def test_an_exclusive_create_leaves_the_first_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "_lungray" / "record.json"
    assert create_exclusive(str(target), b"first") and not create_exclusive(str(target), b"second")
    assert target.read_bytes() == b"first" and [path.name for path in target.parent.iterdir()] == ["record.json"]

    for number in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):  # how FAT, CIFS and FUSE mounts refuse a hard link

        def no_hard_links(source: str, destination: str, number: int = number) -> None:
            raise OSError(number, os.strerror(number))

        monkeypatch.setattr(os, "link", no_hard_links)  # a file system without hard links: O_EXCL instead
        other = tmp_path / "_lungray" / f"other-{number}.json"
        assert create_exclusive(str(other), b"first") and not create_exclusive(str(other), b"second")
        assert other.read_bytes() == b"first"
    assert sorted(path.name for path in target.parent.iterdir()) == sorted(["record.json", *(f"other-{n}.json" for n in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS))])

    def full_disk(source: str, destination: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", full_disk)  # any other failure is the caller's to see
    with pytest.raises(OSError, match="No space left"):
        create_exclusive(str(tmp_path / "_lungray" / "third.json"), b"x")


def test_a_keying_record_read_while_it_is_written_is_read_again(tmp_path: Path) -> None:
    """Without hard links the record is created empty and then filled: a second first run that
    read it in between crashed on the empty JSON instead of reading the record once written."""
    record = tmp_path / "_lungray" / "keying.json"
    record.parent.mkdir()
    record.write_bytes(b"")
    timer = threading.Timer(0.15, lambda: record.write_text(json.dumps({"pseudonymized": False, "key_check": None})))
    timer.start()
    with pytest.raises(ValueError, match="rows that are not pseudonymized"):
        check_keying(str(tmp_path), Pseudonymizer("site-secret"))
    timer.join()


def test_an_s3_store_without_conditional_writes_records_last_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that answers If-None-Match with NotImplemented crashed the first run into a new OUTPUT."""
    from botocore.exceptions import ClientError

    from lungray.io import listing

    class OldStore:
        def put_object(self, **kwargs: object) -> None:
            if "IfNoneMatch" in kwargs:
                raise ClientError({"Error": {"Code": "NotImplemented", "Message": "A header you provided implies functionality that is not implemented"}}, "PutObject")

    written: list[tuple[str, bytes]] = []
    monkeypatch.setattr(listing, "s3_client", lambda endpoint: OldStore())
    monkeypatch.setattr(listing, "write_bytes", lambda uri, data: written.append((uri, data)))
    assert create_exclusive("s3://bucket/out/_lungray/keying.json", b"record")
    assert written == [("s3://bucket/out/_lungray/keying.json", b"record")]


@pytest.mark.parametrize("pseudonymized", [True, False])
def test_an_output_of_before_the_keying_record_is_judged_by_its_rows(tmp_path: Path, pseudonymized: bool) -> None:
    """Without keying.json, the first run of either keying recorded itself and went ahead: a
    pseudonymized run into an older raw output added a row per file beside the raw ones."""
    path = "0123456789abcdef0123456789abcdef" if pseudonymized else "/archive/study/1.dcm"
    ensure_table(str(tmp_path), "images")
    write_deltalake(str(tmp_path / "images"), image_rows([{"path": path}]), mode="append", partition_by=["scored_date"])
    keyed, raw = Pseudonymizer("site-secret"), None
    with pytest.raises(ValueError, match="pass --pseudonymize" if pseudonymized else "leave out --pseudonymize"):
        check_keying(str(tmp_path), raw if pseudonymized else keyed)
    assert not (tmp_path / "_lungray" / "keying.json").exists()
    check_keying(str(tmp_path), keyed if pseudonymized else raw)  # the same keying: recorded from now on
    recorded = json.loads((tmp_path / "_lungray" / "keying.json").read_text())
    assert recorded["pseudonymized"] is pseudonymized
