"""Screening at archive scale (issue #17): does a night cost what is new, and does a killed run resume? Prints JSON.

    python bench/screen_scale.py [history|archive|resume|all] [--quick] [--model DIR] [--profile-dir DIR]

Every screen runs in a fresh subprocess (its own Ray), so its memory is that run's own.
Peak memory is sampled every 0.2 s as the summed RSS of the whole process tree (driver,
raylet, GCS, dashboard, Ray workers: the subprocess and all its descendants), and also for
the driver alone (sampled, and its own high-water mark, VmHWM). Summed RSS counts shared pages
(the object store, shared libraries) once per process that maps them; the summed PSS is
reported beside it. Wall times are run_screen's own `wall_seconds` (the bars are judged on
these; the subprocess's wall, Python and Ray start included, is reported too). Each run also
reports where its driver spent its time (`stages`: the lungray functions it called, timed by
wrapping them in the benchmark's subprocess; lungray itself is not changed).

1. history: synthetic histories of 50k and 5M image rows of the model (`--quick`: 10k and
   500k), written straight into OUTPUT/images with deltalake (IMAGE_SCHEMA, partitioned by
   `scored_date`, ten dates, files of at most 100k rows; ~74-character paths of files that do
   not exist; 1% errors at `tries` = `--max-retries`, so never retried), with their study
   rows in OUTPUT/studies and the studies' watermark (the images version they reflect, as the
   screen's own study sync records it). Then the same `--incremental` run scoring 1,000 new
   real films (`--quick`: 200; copies of lungray/samples under new names) into each. The
   small history is screened before and after the large one (each into a fresh copy of its
   output), and the large run is compared with their mean: a shared VM's speed drifts.
   Bars: wall(5M) / wall(50k) <= 1.3; peak memory(5M) / peak memory(50k) <= 1.2, judged on
   the process tree's peak RSS (the driver's own ratio is reported too).
2. archive: 20k vs 200k listed files (`--quick`: 2k vs 20k), of which 1,000 (200) are new
   real films and the rest are 1-byte files (listed, never opened) whose rows are in the
   images table with their path, size and mtime, so the ledger skips them. Each archive is
   screened `--incremental` twice: with its new films, then again unchanged (nothing to
   score: listing, ledger and study sync only). Bar: peak memory ratio (large / small) <= 1.2
   on the process tree's RSS. Reported: the cost of skipping an already-scored file,
   (wall(200k) - wall(20k)) / 180k in microseconds, from the unchanged reruns (no scoring
   noise in the difference), and from the runs with new films (where the same 1,000 films'
   scoring time, varying by seconds between runs on a shared VM, is in the difference too).
3. resume: `python -m lungray.cli screen` of 20k small real films (`--quick`: 2k) with
   `--chunk-files` set for about ten chunks, SIGKILLed (its process group, then any Ray
   process of it still alive) once at least half the files are committed in OUTPUT/images,
   then the same command again. Bar: the rerun scores (its runs/<run>.json `files_scored`)
   at most 0.55 of the files; checked: the final table has exactly one row per file, and
   the rerun scored nothing the killed run had committed.
4. end to end against a plain PyTorch script: bench/screen.py (not repeated here).

The 2-core VM of docs/results.md runs the full benchmark in about 20-30 minutes, `--quick`
in about 5. Scratch data lives in a temporary folder under /tmp, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from proctree import TreeSampler  # noqa: E402 - beside this script

SAMPLES = REPO / "lungray" / "samples"
DEFAULT_MODEL = REPO / "out" / "demo" / "models" / "cnn"
RUN_DATE = "2026-11-30"  # the benchmark's screens; the synthetic history is dated before it
HISTORY_DATES = [f"2026-10-{day:02d}" for day in range(1, 11)]
ROWS_PER_FILE = 100_000
BARS = {
    "history_wall_ratio_max": 1.3,
    "history_peak_memory_ratio_max": 1.2,
    "archive_peak_memory_ratio_max": 1.2,
    "resume_rerun_fraction_max": 0.55,
}
SIZES = {
    False: {"history": (50_000, 5_000_000), "history_new": 1_000, "archive": (20_000, 200_000), "archive_new": 1_000, "resume": 20_000},
    True: {"history": (10_000, 500_000), "history_new": 200, "archive": (2_000, 20_000), "archive_new": 200, "resume": 2_000},
}


# --------------------------------------------------------------------------------------
# The subprocess: one screen, its driver instrumented (timings of lungray functions).


def child_main(raw: str) -> None:
    """`screen_scale.py _child CONFIG_JSON`: run_screen as the CLI runs it; prints one JSON line."""
    import cProfile
    import functools
    import logging

    started = time.perf_counter()
    spec = json.loads(raw)
    profile_path = spec.pop("profile", None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING)

    from lungray.raysession import init_ray, quiet_ray
    from lungray.screen import ledger, pipeline, studies
    from lungray.screen.pipeline import ScreenConfig, run_screen

    stages: dict[str, list[float]] = {}

    def timed(module: Any, name: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            begun = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                entry = stages.setdefault(f"{module.__name__.rsplit('.', 1)[-1]}.{name}", [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - begun

        setattr(module, name, wrapper)

    def timed_generator(module: Any, name: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            entry = stages.setdefault(f"{module.__name__.rsplit('.', 1)[-1]}.{name}", [0, 0.0])
            iterator = iter(original(*args, **kwargs))
            while True:
                begun = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    entry[1] += time.perf_counter() - begun
                    return
                entry[0] += 1
                entry[1] += time.perf_counter() - begun
                yield item

        setattr(module, name, wrapper)

    timed_generator(pipeline, "listing_batches")
    for name in ("plan", "previous_rows"):
        timed(ledger, name)
    for name in ("score_and_commit", "commit_blocks", "check_chunk", "commit_chunk", "sync", "ensure_table", "open_table"):
        timed(pipeline, name)
    for name in ("watermark", "changed_files", "touched_studies", "study_images", "aggregate_studies", "merge"):
        timed(studies, name)

    init_ray(progress_bars=False)
    quiet_ray(False)
    ray_up = time.perf_counter()
    config = ScreenConfig(**spec)
    profiler = cProfile.Profile() if profile_path else None
    if profiler:
        profiler.enable()
    summary = run_screen(config)
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile_path)
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "summary": summary,
                # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so
                # the child would report this benchmark's own peak whenever it was larger.
                "driver_hwm_rss_mb": high_water_mark_mb(),
                "child_start_to_ray_up_s": round(ray_up - started, 2),
                "run_screen_s": round(done - ray_up, 2),
                "stages": {key: {"calls": int(calls), "seconds": round(seconds, 3)} for key, (calls, seconds) in sorted(stages.items())},
            }
        ),
        flush=True,
    )


def high_water_mark_mb() -> float | None:
    """This process's peak RSS (VmHWM) since its exec."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def child_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # always a local Ray of its own
    return env


def data_files(output: str) -> int:
    from lungray.screen.tables import open_table

    table = open_table(output, "images")
    return len(table.file_uris()) if table is not None else 0


def run_child(spec: dict[str, Any], scratch: Path, label: str) -> dict[str, Any]:
    """One screen in a fresh subprocess, its tree's memory sampled; its result and figures."""
    log = scratch / f"{label}.stderr"
    files_before = data_files(spec["output"])
    with open(log, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, __file__, "_child", json.dumps(spec)],
            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
        )
        sampler = TreeSampler(process.pid).start()
        try:
            stdout, _ = process.communicate()
        except BaseException:  # interrupted: leave no screen of ours running
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            wall = time.perf_counter() - started
            sampler.stop()
            survivors = sampler.kill_survivors(grace_s=3.0)
    if process.returncode != 0:
        raise RuntimeError(f"{label}: exit {process.returncode}\n{log.read_text()[-4000:]}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    summary = result.pop("summary")
    stages = result["stages"]
    scoring = stages.get("pipeline.score_and_commit", {}).get("seconds", 0.0) - stages.get("pipeline.commit_blocks", {}).get("seconds", 0.0)
    return {
        "label": label,
        "process_wall_s": round(wall, 2),
        "run_wall_s": summary["wall_seconds"],
        # the run less decoding and scoring (score_and_commit less its commits): listing, ledger, commits, study sync
        "run_wall_outside_scoring_s": round(summary["wall_seconds"] - scoring, 2),
        "images_data_files_added": data_files(spec["output"]) - files_before,
        "files_listed": summary["files_listed"],
        "files_scored": summary["files_scored"],
        "files_skipped": summary["files_skipped"],
        "chunks": summary["chunks"],
        "by_status": summary["by_status"],
        **sampler.figures(),
        **result,
        "survivors_killed": survivors,
    }


# --------------------------------------------------------------------------------------
# Synthetic tables and archives.


def prepare_model(source: Path, target: Path) -> tuple[Path, str]:
    """A copy of the model for this benchmark (a `make demo` running beside it rewrites out/demo).

    A model whose decode record this lungray refuses (made with an older decoder version) is
    copied with its trained weights and today's decode record instead: screening then runs
    the same network at the same speed, which is all this benchmark measures; its
    probabilities are not those of a model trained on today's decode, and none is reported.
    """
    from safetensors.torch import load_file

    from lungray.io.base import DecodeOptions, decode_record, options_from_record
    from lungray.modeldir import FORMAT_KEYS, read_meta, save_model_dir

    meta = read_meta(source)
    try:
        options_from_record(meta.get("decode"), f"model {source}")
    except ValueError as exc:
        fresh = {key: value for key, value in meta.items() if key not in FORMAT_KEYS}
        fresh["decode"] = decode_record(DecodeOptions())
        save_model_dir(target, load_file(str(source / "model.safetensors")), fresh)
        return target, f"{source}: restamped with this lungray's decode record for the benchmark ({exc.args[0].split(';')[0]})"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("_ray"))
    return target, f"{source}: copied as is"


def model_meta(model_dir: Path) -> dict[str, Any]:
    from lungray.modeldir import read_meta

    return read_meta(model_dir)


def image_rows(paths: Any, study_ids: Any, sizes: Any, mtimes: Any, model_id: str, date: str, index: Any, max_retries: int) -> Any:
    """Image-table rows (IMAGE_SCHEMA) for these files: ok with a probability, 1% errors at max tries."""
    import numpy as np
    import pyarrow as pa

    from lungray.screen.tables import IMAGE_SCHEMA

    rows = len(paths)
    rng = np.random.default_rng(int(index[0]) if rows else 0)
    error = (np.asarray(index) % 100) == 7
    status = np.where(error, "error", "ok")
    prob = rng.random(rows)
    run_id = f"{date}_020000_{zlib.crc32(date.encode()):08x}"
    columns = {
        "path": paths,
        "study_id": study_ids,
        "sop_uid": pa.array([None] * rows, pa.string()),
        "status": pa.array(status, pa.string()),
        "error": pa.array(np.where(error, "cannot decode: truncated pixel data", None), pa.string()),
        "skip_reason": pa.array([None] * rows, pa.string()),
        "prob": pa.array(prob, pa.float64(), mask=error),
        "model_id": pa.array([model_id] * rows, pa.string()),
        "size": pa.array(sizes, pa.int64()),
        "mtime_ns": pa.array(mtimes, pa.int64()),
        "etag": pa.array([None] * rows, pa.string()),
        "tries": pa.array(np.where(error, max_retries, 1).astype(np.int32), pa.int32()),
        "run_id": pa.array([run_id] * rows, pa.string()),
        "scored_date": pa.array([date] * rows, pa.string()),
    }
    return pa.table(columns, schema=IMAGE_SCHEMA)


def write_history(output: Path, pieces: Any, model_id: str, threshold: float) -> dict[str, Any]:
    """Append each piece (an IMAGE_SCHEMA table) to OUTPUT/images, its studies to OUTPUT/studies,
    each study commit carrying the watermark the screen's study sync reads."""
    from deltalake import CommitProperties, DeltaTable, write_deltalake

    from lungray.screen.studies import watermark_key
    from lungray.screen.tables import aggregate_studies

    started = time.perf_counter()
    images_uri, studies_uri = str(output / "images"), str(output / "studies")
    study_pieces, rows = [], 0
    for piece in pieces:
        write_deltalake(images_uri, piece, partition_by=["scored_date"], mode="append")
        date = piece["scored_date"][0].as_py()
        study_pieces.append(aggregate_studies(piece, threshold, "max", model_id, piece["run_id"][0].as_py(), date))
        rows += piece.num_rows
    version = DeltaTable(images_uri).version()
    mark = CommitProperties(custom_metadata={watermark_key(model_id): str(version)})
    for studies in study_pieces:
        write_deltalake(studies_uri, studies, partition_by=["scored_date"], mode="append", commit_properties=mark)
    return {
        "image_rows": rows,
        "study_rows": sum(piece.num_rows for piece in study_pieces),
        "images_commits": version + 1,
        "images_files": len(DeltaTable(images_uri).file_uris()),
        "seconds_to_write": round(time.perf_counter() - started, 1),
    }


def synthetic_history(rows: int, model_id: str, max_retries: int) -> Any:
    """Pieces of at most ROWS_PER_FILE rows over HISTORY_DATES: two images per study, ~74-char paths."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    per_date = -(-rows // len(HISTORY_DATES))
    start = 0
    for date in HISTORY_DATES:
        end_of_date = min(rows, start + per_date)
        while start < end_of_date:
            stop = min(end_of_date, start + ROWS_PER_FILE)  # even sizes: a study's two images in one piece
            index = np.arange(start, stop)
            study = pc.utf8_lpad(pc.cast(pa.array(index // 2), pa.string()), 9, "0")
            study_id = pc.binary_join_element_wise("1.2.826.0.1.3680043.8.498.", study, "")
            name = pc.utf8_lpad(pc.cast(pa.array(index), pa.string()), 9, "0")
            path = pc.binary_join_element_wise(f"/archive/pacs/{date}/", study_id, "/", name, ".dcm", "")
            rng = np.random.default_rng(start)
            sizes = rng.integers(200_000, 30_000_000, len(index))
            mtimes = 1_790_000_000_000_000_000 + index * 1_000_003
            yield image_rows(path, study_id, sizes, mtimes, model_id, date, index, max_retries)
            start = stop
        if start >= rows:
            return


def sample_films() -> list[Path]:
    films = sorted(path for path in SAMPLES.rglob("*") if path.is_file() and path.suffix.lower() in (".jpeg", ".jpg", ".png", ".dcm"))
    if not films:
        raise SystemExit(f"no sample films under {SAMPLES}")
    return films


def new_films(root: Path, count: int, films: list[Path], per_study: int = 4) -> Path:
    """`count` real films (copies of the samples, in turn) under new names, `per_study` to a folder."""
    for index in range(count):
        source = films[index % len(films)]
        folder = root / f"study{index // per_study:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / f"new{index:06d}{source.suffix.lower()}")
    return root


def scored_stubs(root: Path, count: int, model_id: str, max_retries: int, per_folder: int = 100) -> Any:
    """`count` 1-byte files (listed, never opened) and their image rows, as an earlier run wrote them."""
    import numpy as np
    import pyarrow as pa

    mtime = 1_790_000_000_000_000_000
    for start in range(0, count, 20 * per_folder):
        stop = min(count, start + 20 * per_folder)
        paths, studies = [], []
        for index in range(start, stop):
            folder = root / f"f{index // per_folder:05d}"
            if index % per_folder == 0:
                folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"old{index:07d}.dcm"
            with open(path, "wb") as handle:
                handle.write(b"\0")
            os.utime(path, ns=(mtime, mtime))
            paths.append(str(path))
            studies.append(f"old/{folder.name}")
        index = np.arange(start, stop)
        date = HISTORY_DATES[(start // (20 * per_folder)) % len(HISTORY_DATES)]
        yield image_rows(pa.array(paths, pa.string()), pa.array(studies, pa.string()), np.ones(len(paths), np.int64), np.full(len(paths), mtime), model_id, date, index, max_retries)


def screen_spec(model: Path, archive: Path, output: Path, profile_dir: Path | None, label: str, **extra: Any) -> dict[str, Any]:
    spec = {"model": str(model), "input": str(archive), "output": str(output), "date": RUN_DATE, "throwaway_salt": True, **extra}
    if profile_dir is not None:
        spec["profile"] = str(profile_dir / f"{label}.pstats")
    return spec


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


# --------------------------------------------------------------------------------------
# The three measurements.


def bench_history(scratch: Path, model: Path, quick: bool, profile_dir: Path | None) -> dict[str, Any]:
    meta = model_meta(model)
    model_id, threshold = meta["model_id"], float(meta["threshold"])
    small_rows, large_rows = SIZES[quick]["history"]
    new = SIZES[quick]["history_new"]
    max_retries = 3
    archive = new_films(scratch / "history-archive", new, sample_films())
    histories = {}
    for label, rows in (("small", small_rows), ("large", large_rows)):
        histories[label] = write_history(scratch / f"history-{label}", synthetic_history(rows, model_id, max_retries), model_id, threshold)
    shutil.copytree(scratch / "history-small", scratch / "history-small-again")

    def run(label: str, output: Path) -> dict[str, Any]:
        spec = screen_spec(model, archive, output, profile_dir, f"history-{label}", incremental=True, max_retries=max_retries)
        result = run_child(spec, scratch, f"history-{label}")
        if result["files_scored"] != new or result["files_listed"] != new:
            raise RuntimeError(f"history-{label}: expected {new} files listed and scored, got {result}")
        return result

    before = run("small-before", scratch / "history-small")
    large = run("large", scratch / "history-large")
    after = run("small-after", scratch / "history-small-again")
    small_wall = (before["run_wall_s"] + after["run_wall_s"]) / 2
    small_process_wall = (before["process_wall_s"] + after["process_wall_s"]) / 2
    small_tree = (before["peak_tree_rss_mb"] + after["peak_tree_rss_mb"]) / 2
    small_pss = (before["peak_tree_pss_mb"] + after["peak_tree_pss_mb"]) / 2
    small_driver = (before["driver_hwm_rss_mb"] + after["driver_hwm_rss_mb"]) / 2
    small_outside = (before["run_wall_outside_scoring_s"] + after["run_wall_outside_scoring_s"]) / 2
    driver_ratio = ratio(large["driver_hwm_rss_mb"], small_driver)
    wall_ratio = ratio(large["run_wall_s"], small_wall)
    memory_ratio = ratio(large["peak_tree_rss_mb"], small_tree)
    return {
        "history_rows": {"small": small_rows, "large": large_rows},
        "new_films": new,
        "histories": histories,
        "runs": [before, large, after],
        "wall_ratio": wall_ratio,
        "process_wall_ratio": ratio(large["process_wall_s"], small_process_wall),
        "peak_tree_rss_ratio": memory_ratio,
        "peak_tree_pss_ratio": ratio(large["peak_tree_pss_mb"], small_pss),
        "peak_driver_rss_ratio": driver_ratio,
        "driver_peak_rss_mb_per_million_history_rows": round((large["driver_hwm_rss_mb"] - small_driver) / ((large_rows - small_rows) / 1e6), 1),
        "extra_run_seconds_per_million_history_rows": round((large["run_wall_s"] - small_wall) / ((large_rows - small_rows) / 1e6), 2),
        # outside decoding and scoring, so without their run-to-run noise
        "run_wall_outside_scoring_s": {"small": round(small_outside, 2), "large": large["run_wall_outside_scoring_s"]},
        "extra_seconds_outside_scoring_per_million_history_rows": round(
            (large["run_wall_outside_scoring_s"] - small_outside) / ((large_rows - small_rows) / 1e6), 2
        ),
        "wall_ratio_pass": wall_ratio is not None and wall_ratio <= BARS["history_wall_ratio_max"],
        "peak_memory_ratio_pass": memory_ratio is not None and memory_ratio <= BARS["history_peak_memory_ratio_max"],
        "peak_memory_ratio_pass_driver_alone": driver_ratio is not None and driver_ratio <= BARS["history_peak_memory_ratio_max"],
        "judged_on": "wall: run_screen wall_seconds, large / mean of small before and after; memory: peak summed RSS of the process tree, large / mean of the small runs",
    }


def bench_archive(scratch: Path, model: Path, quick: bool, profile_dir: Path | None) -> dict[str, Any]:
    meta = model_meta(model)
    model_id, threshold = meta["model_id"], float(meta["threshold"])
    new = SIZES[quick]["archive_new"]
    max_retries = 3
    films = sample_films()
    results: dict[str, dict[str, Any]] = {}
    for label, listed in zip(("small", "large"), SIZES[quick]["archive"]):
        root, output = scratch / f"archive-{label}", scratch / f"archive-{label}-out"
        started = time.perf_counter()
        new_films(root / "new", new, films)
        history = write_history(output, scored_stubs(root / "old", listed - new, model_id, max_retries), model_id, threshold)
        history["seconds_to_build_archive_and_rows"] = round(time.perf_counter() - started, 1)
        spec = screen_spec(model, root, output, profile_dir, f"archive-{label}", incremental=True, max_retries=max_retries)
        with_new = run_child(spec, scratch, f"archive-{label}")
        spec = screen_spec(model, root, output, profile_dir, f"archive-{label}-unchanged", incremental=True, max_retries=max_retries)
        unchanged = run_child(spec, scratch, f"archive-{label}-unchanged")
        if with_new["files_listed"] != listed or with_new["files_scored"] != new or unchanged["files_scored"] != 0:
            raise RuntimeError(f"archive-{label}: expected {listed} listed, {new} then 0 scored: {with_new}, {unchanged}")
        results[label] = {"listed": listed, "new": new, "table": history, "with_new_films": with_new, "unchanged": unchanged}
        shutil.rmtree(root)
        shutil.rmtree(output)
    small, large = results["small"], results["large"]
    extra_files = large["listed"] - small["listed"]
    memory_ratio = ratio(large["with_new_films"]["peak_tree_rss_mb"], small["with_new_films"]["peak_tree_rss_mb"])
    driver_ratio = ratio(large["with_new_films"]["driver_hwm_rss_mb"], small["with_new_films"]["driver_hwm_rss_mb"])

    def per_file_us(key: str, wall: str) -> float:
        return round((large[key][wall] - small[key][wall]) / extra_files * 1e6, 1)

    return {
        "listed": {"small": small["listed"], "large": large["listed"]},
        "new_films": new,
        "small": small,
        "large": large,
        "peak_tree_rss_ratio": memory_ratio,
        "peak_tree_pss_ratio": ratio(large["with_new_films"]["peak_tree_pss_mb"], small["with_new_films"]["peak_tree_pss_mb"]),
        "peak_driver_rss_ratio": driver_ratio,
        "unchanged_peak_tree_rss_ratio": ratio(large["unchanged"]["peak_tree_rss_mb"], small["unchanged"]["peak_tree_rss_mb"]),
        # From the unchanged reruns: nothing is scored, so the difference holds no scoring noise
        # (on a shared 2-core VM, scoring the same 1,000 films varies by seconds between runs).
        "skip_cost_us_per_file": per_file_us("unchanged", "run_wall_s"),
        "skip_cost_us_per_file_runs_with_new_films": per_file_us("with_new_films", "run_wall_s"),
        "skip_cost_us_per_file_runs_with_new_films_process_wall": per_file_us("with_new_films", "process_wall_s"),
        "peak_memory_ratio_pass": memory_ratio is not None and memory_ratio <= BARS["archive_peak_memory_ratio_max"],
        "peak_memory_ratio_pass_driver_alone": driver_ratio is not None and driver_ratio <= BARS["archive_peak_memory_ratio_max"],
        "judged_on": "peak summed RSS of the process tree, runs with new films, large / small; skip cost: difference of run_screen wall_seconds / extra listed files",
    }


def images_committed(output: Path) -> int:
    from lungray.screen.tables import read_table

    try:
        return read_table(str(output), "images", columns=["path"]).num_rows
    except Exception:  # noqa: BLE001 - a commit in progress, a log file half there: ask again
        return -1


def bench_resume(scratch: Path, model: Path, quick: bool) -> dict[str, Any]:
    """A CLI screen killed once half its files are committed, then the same command again."""
    import pyarrow.compute as pc

    from lungray.screen.tables import open_table, read_table

    total = SIZES[quick]["resume"]
    films = sorted((path for path in sample_films() if path.suffix.lower() != ".dcm"), key=lambda path: path.stat().st_size)
    archive = new_films(scratch / "resume-archive", total, films)
    output = scratch / "resume-out"
    chunk_files = max(1, total // 10)
    command = [
        sys.executable, "-m", "lungray.cli", "screen", "--model", str(model), "--input", str(archive), "--output", str(output),
        "--date", RUN_DATE, "--throwaway-salt", "--chunk-files", str(chunk_files),
    ]
    with open(scratch / "resume-killed.log", "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(process.pid).start()
        try:
            committed, version, deadline = 0, None, time.time() + 3600
            while process.poll() is None and time.time() < deadline:
                table = open_table(str(output), "images")
                if table is not None and table.version() != version:
                    version = table.version()
                    committed = max(committed, images_committed(output))
                    if committed * 2 >= total:
                        break
                time.sleep(0.25)
            if process.poll() is not None:
                raise RuntimeError(f"the run ended (exit {process.returncode}) before half its files were committed: {committed}")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed_after = time.perf_counter() - started
            sampler.stop()
            survivors = sampler.kill_survivors(grace_s=5.0)
    committed_at_kill = images_committed(output)
    with open(scratch / "resume-rerun.log", "wb") as log:
        started = time.perf_counter()
        rerun = subprocess.run(command, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, timeout=3600)
        rerun_wall = time.perf_counter() - started
    if rerun.returncode != 0:
        raise RuntimeError(f"rerun failed (exit {rerun.returncode}):\n{(scratch / 'resume-rerun.log').read_text()[-4000:]}")
    summaries = [json.loads(path.read_text()) for path in sorted((output / "runs").glob("*.json"))]
    if len(summaries) != 1:
        raise RuntimeError(f"expected the rerun's summary only in runs/, found {len(summaries)}")
    summary = summaries[0]
    final = read_table(str(output), "images", columns=["path", "run_id"])
    listed = {str(path) for path in archive.rglob("*") if path.is_file()}
    distinct = pc.count_distinct(final["path"]).as_py()
    rows_of_killed_run = int(pc.sum(pc.not_equal(final["run_id"], summary["run_id"])).as_py() or 0)
    fraction = round(summary["files_scored"] / total, 4)
    return {
        "files": total,
        "chunk_files": chunk_files,
        "killed_after_s": round(killed_after, 1),
        "committed_at_kill": committed_at_kill,
        "committed_fraction_at_kill": round(committed_at_kill / total, 4),
        "killed_run_peak_tree_rss_mb": sampler.figures()["peak_tree_rss_mb"],
        "killed_run_processes_alive_5s_after": survivors,  # SIGKILLed by the benchmark then
        "rerun": {key: summary[key] for key in ("files_listed", "files_scored", "files_skipped", "files_resumed", "chunks", "by_status", "wall_seconds", "resumes")},
        "rerun_process_wall_s": round(rerun_wall, 1),
        "rerun_scored_fraction": fraction,
        "rerun_rescored_committed_files": summary["files_scored"] - (total - committed_at_kill),
        "final_rows": final.num_rows,
        "final_distinct_paths": distinct,
        "final_rows_from_killed_run": rows_of_killed_run,
        "one_row_per_file": final.num_rows == distinct == total and set(final["path"].to_pylist()) == listed,
        "rerun_fraction_pass": fraction <= BARS["resume_rerun_fraction_max"],
    }


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "_child":
        child_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("history", "archive", "resume", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 5 minutes on 2 cores)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"a trained model directory (default: {DEFAULT_MODEL.relative_to(REPO)})")
    parser.add_argument("--profile-dir", type=Path, default=None, help="write a cProfile of each screen's driver (run_screen) here")
    args = parser.parse_args()
    if not (args.model / "model.json").exists():
        raise SystemExit(f"no model directory at {args.model} (train one, e.g. `make demo`)")
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    import torch

    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "quick": args.quick,
        "model": str(args.model),
        "bars": BARS,
    }
    with tempfile.TemporaryDirectory(prefix="screen_scale-", dir="/tmp") as scratch:
        root = Path(scratch)
        model, report["model_note"] = prepare_model(args.model, root / "model")
        if args.what in ("history", "all"):
            report["history"] = bench_history(root, model, args.quick, args.profile_dir)
        if args.what in ("archive", "all"):
            report["archive"] = bench_archive(root, model, args.quick, args.profile_dir)
        if args.what in ("resume", "all"):
            report["resume"] = bench_resume(root, model, args.quick)
    passes = {
        "history_wall_ratio": report.get("history", {}).get("wall_ratio_pass"),
        "history_peak_memory_ratio": report.get("history", {}).get("peak_memory_ratio_pass"),
        "archive_peak_memory_ratio": report.get("archive", {}).get("peak_memory_ratio_pass"),
        "resume_rerun_fraction": report.get("resume", {}).get("rerun_fraction_pass"),
        "resume_one_row_per_file": report.get("resume", {}).get("one_row_per_file"),
    }
    report["pass"] = {key: value for key, value in passes.items() if value is not None}
    report["all_pass"] = all(report["pass"].values())
    # The memory bars once more on the driver's own peak (VmHWM): the tree's sum is mostly some
    # twenty Ray processes of about fixed size, which dilute what the driver alone adds.
    driver = {
        "history_peak_memory_ratio_driver_alone": report.get("history", {}).get("peak_memory_ratio_pass_driver_alone"),
        "archive_peak_memory_ratio_driver_alone": report.get("archive", {}).get("peak_memory_ratio_pass_driver_alone"),
    }
    report["pass_driver_alone"] = {key: value for key, value in driver.items() if value is not None}
    report["bench_wall_s"] = round(time.perf_counter() - started, 1)
    report["notes"] = [
        "End to end against a plain PyTorch script (and the inference stage against the bare model): bench/screen.py; not repeated here.",
        "Memory bars are judged on the peak summed RSS of the screen's whole process tree (driver + raylet, GCS, dashboard, "
        "Ray workers), sampled every 0.2 s; the driver's own peak (VmHWM; sampled: peak_driver_rss_mb) and the tree's summed PSS "
        "are reported beside it, and pass_driver_alone holds the memory bars judged on the driver's peak.",
        "Wall bars are judged on run_screen's own wall_seconds (the subprocess's wall, with Python and Ray start, is process_wall_s).",
        "stages: driver-side seconds in lungray functions (cumulative; nested calls are counted in both).",
    ]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
