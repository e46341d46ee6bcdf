"""Nightly screening: an archive in, per-image and per-study predictions out, nothing lost.

listing, streamed in batches -> the ledger (`lungray.screen.ledger`: a join against the
images table's key columns decides what to score) -> windows of at most `chunk_files`
files, each one Ray Data execution: CPU decode tasks (the ingest's read/scope check/
decode/preprocess, driven by the model's recorded decode options and preprocessing; a
model whose decode this lungray cannot reproduce is refused before anything is read) ->
model actors (GPU when there are GPUs). The scored rows stream out of the execution as
block references and are committed in chunks: whenever `chunk_minutes` have passed since
the last commit, and at the window's end. A chunk's blocks become its image rows in one
task (keyed there with `--pseudonymize`); its new rows are one Delta commit written by a
worker (`Dataset.write_delta`), the rows that replace earlier ones (retried errors,
changed files) one MERGE -> the studies the chunk touched re-aggregated and upserted
(`lungray.screen.studies`). A killed run loses at most its uncommitted chunk; its rerun
resumes (`lungray.screen.lease`). `runs/<run>.json` is written last.

Why windows rather than one execution per chunk: an execution starts its model actors (a
process, torch, the model) and fills and drains its pipeline, 3.7 s on 2 cores; chunk
commits from the stream cost none of that, and the minutes bound holds however slow the
archive is, without first learning its rate.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import SaveMode

from lungray import __version__
from lungray.io.base import DecodeOptions, decode_record, options_from_record
from lungray.io.listing import ListedRow, ListingReport, filesystem_for, is_s3, iter_listing, join_uri, listing_tables, write_whole
from lungray.io.rows import dataset_of_blocks
from lungray.io.scope import Scope
from lungray.modeldir import ModelDir, load_model_dir, read_meta
from lungray.pacs import dicomweb, source
from lungray.preprocess import PreprocessConfig
from lungray.privacy import Pseudonymizer, require_salt, resolve_salt
from lungray.progress import Progress
from lungray.screen import ledger
from lungray.screen.decode import chunk_rows, decode_for_screening
from lungray.screen.explain import explain
from lungray.screen.keying import check_keying
from lungray.screen.lease import Lease, fingerprint
from lungray.screen.predictor import Predictor, local_model_dir
from lungray.screen.studies import Decorate, driving_images, overlay_name, sync_studies
from lungray.screen.tables import ensure_table, merge, open_table, run_study_counts, storage_options, table_uri
from lungray.screen.writeback import REPORT_CHOICES, flush_reports, queue_reports

log = logging.getLogger(__name__)
T = TypeVar("T")
chunk_rows_task = ray.remote(num_returns=3)(chunk_rows)


@dataclass(frozen=True)
class ScreenConfig:
    model: str
    input: str
    output: str
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).date().isoformat())
    incremental: bool = False
    aggregate: str = "max"
    explain: bool = False  # Grad-CAM overlay PNG for each flagged study
    batch_size: int | None = None  # default: 32 on CPU, 512 on GPU
    actors: int | None = None  # default: one per GPU, else one per two CPUs
    gpu: bool = False  # GPU actors even if no GPU is up yet: the autoscaler starts GPU nodes for them
    files_per_task: int | None = None  # default: `files_per_task()`
    max_pixels: int = DecodeOptions.max_pixels  # decompression bomb limit; the other decode options are the model's
    max_file_bytes: int = 1 << 30
    scope: Scope = field(default_factory=Scope)
    pseudonymize: bool = False  # key every identifying column, for outputs that leave the site
    throwaway_salt: bool = False  # without LUNGRAY_PATIENT_SALT, a random salt for this run (else refused)
    # PACS input (`dicomweb+http(s)://`, `dimse://`): the query's StudyDate range and modalities
    since: str | None = None
    until: str | None = None
    modalities: tuple[str, ...] = dicomweb.DEFAULT_MODALITIES
    report_to: str | None = None  # a DICOMweb service to store an SR per reported study into, after the commit
    report: str = "flagged"  # which studies get an SR: flagged, or all scored
    report_overlay: bool = False  # also the Grad-CAM overlay of each flagged study, as a Secondary Capture
    max_retries: int = 3  # --incremental scores a file whose last row is an error again, up to this many tries in all
    chunk_files: int = 10_000  # a chunk (one commit) holds at most this many files (and one execution scores them)...
    chunk_minutes: float = 10.0  # ...and at most about this much work
    listing_batch: int = 100_000  # listed files joined to the ledger at a time

    def __post_init__(self) -> None:
        require_salt(self.throwaway_salt)
        for name in ("date", "since", "until"):  # a clear error for a malformed date; 20261207 written as 2026-12-07
            if getattr(self, name) is not None:
                object.__setattr__(self, name, dt.date.fromisoformat(getattr(self, name)).isoformat())
        pacs = source.is_pacs_uri(self.input)
        if not pacs and (self.since or self.until or tuple(self.modalities) != dicomweb.DEFAULT_MODALITIES):
            raise ValueError("--since, --until and --modality filter a PACS query: the input must be dicomweb+http(s):// or dimse://")
        if self.report not in REPORT_CHOICES:
            raise ValueError(f"report must be one of {REPORT_CHOICES}, got {self.report!r}")
        if self.report_to is not None:
            dicomweb.service_url(self.report_to)  # a clear error for a malformed URI, before anything is scored
            if not pacs:
                raise ValueError("--report-to stores SRs referencing the screened instances: the input must be a PACS")
            if self.pseudonymize:
                raise ValueError("--report-to writes the real study and instance UIDs into the PACS; --pseudonymize is for outputs that leave the site")
        elif self.report_overlay:
            raise ValueError("--report-overlay needs --report-to")
        if self.chunk_minutes <= 0:
            raise ValueError(f"chunk_minutes must be positive, got {self.chunk_minutes}")
        for name in ("actors", "batch_size", "files_per_task", "max_retries", "chunk_files", "listing_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


# Bounds of the files one decode task reads. Each task costs a scheduling round trip and an
# output block; on 2 cores, 600 files scored 1.5-1.8x faster at 64-128 files per task than
# at 16 (scripted probe, Ray 2.60). The upper bound keeps a task's block (about 50 KB per
# 224 px image) small and a retried task cheap.
MIN_FILES_PER_TASK, MAX_FILES_PER_TASK = 16, 256


def files_per_task(files: int, cpus: float) -> int:
    """About four decode tasks per CPU, each reading MIN..MAX files: enough tasks to keep
    every CPU busy and to balance slow files, few enough that per-task cost stays small."""
    return int(min(MAX_FILES_PER_TASK, max(MIN_FILES_PER_TASK, math.ceil(files / (4 * max(cpus, 1.0))))))


@dataclass(frozen=True)
class ActorPlan:
    """How the model actors run: how many at most, what each asks of Ray, the batch they
    score, and torch's threads in each (CPU actors)."""

    max_actors: int
    resources: dict[str, float]
    batch_size: int
    threads: int = 1


def plan_actors(config: ScreenConfig, cluster: dict[str, float]) -> ActorPlan:
    """GPU actors (one per GPU) when the cluster has GPUs or `config.gpu` asks for them, else
    single-threaded CPU actors, one per two CPUs, that together ask for at most half the CPUs.

    On CPU, scoring an image (about 6 ms for the default CNN, BatchNorm folded) costs about as
    much as decoding it (about 4 ms for a 512 px file), so about half the CPUs decode and half
    score. On 2 CPUs one actor scored 1000 files 1.1-1.2x faster than two (and 4000 files
    1.15-1.25x): a second actor costs a fresh torch import (about 2 s of a core) and shares
    the cores with the decode task. An actor asks for half a CPU, not the whole one it keeps
    busy: with the decode tasks' 1 CPU, Ray Data would fuse decoding into the actor, which
    then decodes and scores in turn on one core. Actors never hold every CPU, so decode
    tasks always find one (a 2-CPU machine deadlocked when they did). Each CPU actor runs
    torch on the two CPUs it stands for (fewer when `config.actors` asks for more actors
    than that): the actor is the pipeline's serial stage, and its second thread takes the
    core time the decode tasks leave idle. On 2 CPUs, 4,000 files in alternating runs:
    197 files/s with two threads against 184 with one.
    """
    gpus, cpus = int(cluster.get("GPU", 0)), float(cluster.get("CPU", 1.0))
    if gpus or config.gpu:
        return ActorPlan(config.actors or max(1, gpus), {"num_gpus": 1}, config.batch_size or 512)
    actors = config.actors or max(1, int(cpus // 2))
    threads = int(min(2, max(1, cpus // actors)))
    return ActorPlan(actors, {"num_cpus": min(0.5, cpus / 2 / actors)}, config.batch_size or 32, threads)


def listing_batches(config: ScreenConfig, report: ListingReport) -> Iterator[pa.Table]:
    """The input's files in Arrow batches (uri, relpath, size, mtime_ns, etag): a folder or
    prefix as listed, or the instances a PACS query finds (streamed, paged).

    A PACS instance has no size, mtime or ETag: its `uri` names its SOP Instance UID, the
    incremental key. Its relpath STUDY/SOP gives an unreadable instance its study.
    """
    if not source.is_pacs_uri(config.input):
        return iter_listing(config.input, config.listing_batch, report)
    return listing_tables(pacs_rows(config), config.listing_batch)


def flag_last(items: Iterator[T]) -> Iterator[tuple[T, bool]]:
    """Each item with whether it is the last: the next is fetched before the current is yielded."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def pacs_rows(config: ScreenConfig) -> Iterator[ListedRow]:
    """The instances the PACS query finds. A query that fails on its first page is a PacsError
    (the PACS cannot be queried: exit 2, nothing done); one that fails part-way is a failed run
    (exit 1), whose committed chunks the same command resumes from."""
    seen: set[str] = set()  # a study can come back on two pages of a query; one night's instances
    try:
        for record in source.search_instances(config.input, config.since, config.until, config.modalities):
            if record.path not in seen:
                seen.add(record.path)
                yield record.path, f"{record.study_uid}/{record.sop_uid}", None, None, None
    except source.PacsError as exc:
        if not seen:
            raise
        raise RuntimeError(f"the PACS listing failed after {len(seen)} instances: {exc}; the same command resumes the run") from exc


def as_written(listing: pa.Table, pseudonymizer: Pseudonymizer | None) -> pa.Table:
    """`listing` with the ledger's key as the images table holds it: `path` (the URI, keyed
    with --pseudonymize) and `mtime_ns` keyed too; the real mtime stays in `listed_mtime_ns`."""
    path, mtime = listing["uri"], listing["mtime_ns"]
    if pseudonymizer is not None:
        path = pa.array([pseudonymizer.key("path", uri) for uri in path.to_pylist()], pa.string())
        mtime = pa.array([pseudonymizer.mtime(value) for value in mtime.to_pylist()], pa.int64())
    return listing.rename_columns(["uri", "relpath", "size", "listed_mtime_ns", "etag"]).append_column("path", path).append_column("mtime_ns", mtime)


@dataclass
class Counts:
    """What the run did, for its summary."""

    listed: int = 0
    already_done: int = 0
    resumed: int = 0
    given_up: int = 0
    scored: int = 0
    replaced: int = 0
    retried: int = 0
    chunks: int = 0
    scoring_seconds: float = 0.0
    by_status: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0, "skipped": 0})
    studies_written: int = 0
    studies_flagged: int = 0
    reports: dict[str, dict[str, int]] | None = None
    listing: ListingReport = field(default_factory=ListingReport)


@dataclass(frozen=True)
class Run:
    """What every chunk of one run shares."""

    config: ScreenConfig
    run_id: str
    model_id: str
    threshold: float
    preprocess: PreprocessConfig
    decode: DecodeOptions
    pseudonymizer: Pseudonymizer | None
    model_path: Path


def score_window(run: Run, window: pa.Table) -> ray.data.Dataset:
    """Decode and score a window's files: a lazy dataset of scored rows, whose blocks stay in
    the object store (never in the driver) until their chunk's commit makes them image rows."""
    config = run.config
    cluster = ray.cluster_resources()
    plan = plan_actors(config, cluster)
    per_task = config.files_per_task or files_per_task(window.num_rows, cluster.get("CPU", 1.0))
    files = window.select(["uri", "relpath", "size", "listed_mtime_ns", "etag", "tries", "replaces"]).rename_columns(
        ["uri", "relpath", "size", "mtime_ns", "etag", "tries", "replaces"]
    )
    decoded = dataset_of_blocks(files, per_task).map_batches(
        decode_for_screening,
        fn_kwargs={"preprocess": run.preprocess, "decode": run.decode, "max_file_bytes": config.max_file_bytes, "scope": config.scope},
        batch_format="pyarrow",
        batch_size=None,
    )
    return decoded.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_uri": config.model, "threads": plan.threads},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors),
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        **plan.resources,
    )


def check_chunk(checked: pa.Table, window: pa.Table, committed: set[str]) -> set[str]:
    """Nothing lost, nothing duplicated: a chunk's rows (their `path, status, replaces`) are
    distinct files of the window that no earlier chunk of it committed, or nothing is
    committed. Returns their paths."""
    paths = checked["path"].to_pylist()
    distinct = set(paths)
    if len(distinct) != len(paths) or distinct & committed or not pc.all(pc.is_in(checked["path"], window["path"])).as_py():
        raise RuntimeError(
            f"screening produced {len(paths)} rows ({len(distinct)} distinct, {len(distinct & committed)} already committed) "
            "that are not distinct files of the window: this chunk is not committed"
        )
    return distinct


def commit_chunk(run: Run, new_rows: ray.ObjectRef, replacing_rows: ray.ObjectRef, checked: pa.Table) -> int:
    """The chunk's new rows appended by a worker in one Delta commit; the rows that replace
    earlier ones (a retried error, a changed file, a rescored file) upserted in one MERGE.
    Returns how many rows were replaced."""
    uri = table_uri(run.config.output, "images")
    replacing = int(pc.sum(checked["replaces"]).as_py() or 0)
    images = ensure_table(run.config.output, "images")  # created with its schema and partitioning, once, whoever commits first
    if replacing < checked.num_rows:
        ray.data.from_arrow_refs([new_rows]).write_delta(
            uri,
            mode=SaveMode.APPEND,
            partition_by=["scored_date"],
            storage_options=storage_options(uri),
            filesystem=filesystem_for(uri)[0] if is_s3(uri) else None,
        )
    if replacing:
        images.update_incremental()  # past the append just committed
        merge(images, "images", ray.get(replacing_rows))
    return replacing


def overlays(run: Run, chunk_uris: dict[str, str]) -> Decorate:
    """The study sync's decoration for --explain: a Grad-CAM overlay per flagged study, written
    to OUTPUT/explain/scored_date=D/ before the study rows that name it are committed.

    `chunk_uris` maps the chunk's written (keyed, with --pseudonymize) paths to the files.
    """
    model: list[ModelDir] = []

    def decorate(studies: pa.Table, images: pa.Table) -> pa.Table:
        unexplained = pc.filter(studies["study_id"], pc.and_(studies["flagged"], pc.is_null(studies["explain_path"]))).to_pylist()
        paths: dict[str, str] = {}
        for study, row in driving_images(images, unexplained).items():
            location = chunk_uris.get(row["path"], None if run.pseudonymizer else row["path"])
            if location is None:
                continue  # a keyed path from an earlier run: this run cannot read its file
            model or model.append(load_model_dir(run.model_path))
            png = explain({**row, "path": location}, model[0], run.decode, run.config.max_file_bytes)
            if png is None:
                continue
            target = join_uri(run.config.output, "explain", f"scored_date={run.config.date}", overlay_name(run.model_id, row))
            write_whole(target, png)
            paths[study] = target
        held = studies["explain_path"].to_pylist()  # the overlays kept (studies.with_kept_overlays)
        column = pa.array([paths.get(study, kept) for study, kept in zip(studies["study_id"].to_pylist(), held)], pa.string())
        return studies.set_column(studies.schema.get_field_index("explain_path"), "explain_path", column)

    return decorate


def sync(run: Run, chunk_uris: dict[str, str] | None = None) -> None:
    """Bring the model's studies up to date with the images table, and queue the changed ones for the PACS."""
    config = run.config
    decorate = overlays(run, chunk_uris or {}) if config.explain or config.report_overlay else None
    queue = functools.partial(queue_reports, config.output, run.model_id, config.report, run_id=run.run_id) if config.report_to else None
    sync_studies(config.output, run.model_id, run.threshold, config.aggregate, run.run_id, config.date, decorate, queue)


def report_back(run: Run, counts: Counts) -> None:
    """With --report-to, store the queued studies (this run's and any an earlier run left) in the PACS;
    the summary says what was stored, also when nothing was."""
    config = run.config
    if config.report_to:
        counts.reports = flush_reports(
            config.output, run.model_id, config.report_to, config.report, config.report_overlay, run.threshold, config.max_retries
        )


def score_and_commit(run: Run, window: pa.Table, counts: Counts, progress: Progress) -> None:
    """Score a window in one execution and commit its rows as they stream out: a chunk
    whenever `chunk_minutes` have passed since the last commit, and the rest at the end.
    Ends with exactly one committed row per file of the window, or raises."""
    started = last_commit = time.time()
    committed: set[str] = set()
    blocks: list[ray.ObjectRef] = []
    for bundle in score_window(run, window).iter_internal_ref_bundles():
        blocks.extend(bundle.block_refs)
        progress.done += bundle.num_rows()
        if time.time() - last_commit >= run.config.chunk_minutes * 60:
            committed |= commit_blocks(run, blocks, window, committed, counts)
            blocks, last_commit = [], time.time()
            progress.report()
    if blocks:
        committed |= commit_blocks(run, blocks, window, committed, counts)
    counts.scoring_seconds += time.time() - started
    if len(committed) != window.num_rows:
        raise RuntimeError(f"screening produced rows for {len(committed)} of {window.num_rows} files; the run can be rerun to score the rest")
    progress.report()


def commit_blocks(run: Run, blocks: list[ray.ObjectRef], window: pa.Table, committed: set[str], counts: Counts) -> set[str]:
    """One chunk: the checked rows of `blocks` committed, counted and synced; returns their paths."""
    new_rows, replacing_rows, keys = chunk_rows_task.remote(run.model_id, run.run_id, run.config.date, run.pseudonymizer, *blocks)
    checked = ray.get(keys)
    paths = check_chunk(checked, window, committed)
    counts.replaced += commit_chunk(run, new_rows, replacing_rows, checked)
    counts.chunks += 1
    counts.scored += checked.num_rows
    files = window.filter(pc.is_in(window["path"], checked["path"]))
    counts.retried += int(pc.sum(pc.greater(files["tries"], 1)).as_py() or 0)
    for status in counts.by_status:
        counts.by_status[status] += int(pc.sum(pc.equal(checked["status"], status)).as_py() or 0)
    needs_uris = run.pseudonymizer is not None and (run.config.explain or run.config.report_overlay)
    sync(run, dict(zip(files["path"].to_pylist(), files["uri"].to_pylist())) if needs_uris else None)
    return paths


def resume_settings(config: ScreenConfig, model_id: str) -> dict[str, Any]:
    """What makes a rerun "the same command": which files it lists and which rows it writes.

    Not the date, which only stamps the rows (`scored_date`) and the run id: a nightly run
    killed before midnight UTC and rerun after it (its cron line recomputes `--date`) resumes.
    """
    settings = asdict(config)
    for name in ("batch_size", "actors", "gpu", "files_per_task", "chunk_files", "chunk_minutes", "listing_batch", "report_to", "report", "report_overlay", "date"):
        settings.pop(name)
    return {**settings, "model_id": model_id}


def write_summary(output: str, summary: dict[str, Any]) -> None:
    """runs/<run>.json, in one write."""
    write_whole(join_uri(output, "runs", f"{summary['run_id']}.json"), json.dumps(summary, indent=2).encode())


def run_screen(config: ScreenConfig) -> dict[str, Any]:
    """Score the archive chunk by chunk, each committed; returns the run summary (also in runs/<run>.json)."""
    started = time.time()
    model_path = local_model_dir(config.model)
    meta = read_meta(model_path)
    decode = replace(options_from_record(meta.get("decode"), f"model {config.model}"), max_pixels=config.max_pixels)
    run_id = f"{config.date}_{dt.datetime.now(dt.timezone.utc):%H%M%S}_{uuid.uuid4().hex[:8]}"
    pseudonymizer = Pseudonymizer(resolve_salt(config.throwaway_salt)) if config.pseudonymize else None
    run = Run(config, run_id, meta["model_id"], float(meta["threshold"]), PreprocessConfig.from_dict(meta["preprocess"]), decode, pseudonymizer, model_path)

    check_keying(config.output, pseudonymizer)
    lease = Lease(config.output, run.model_id, run_id, fingerprint(resume_settings(config, run.model_id)))
    resumes = lease.acquire()
    try:
        counts = Counts()
        sync(run)  # studies an interrupted run committed images for but did not reach
        rescore_skipped = ledger.scope_changed(config.output, run.model_id, config.scope)
        rule = ledger.LedgerRule(config.incremental, config.max_retries, frozenset(resumes), rescore_skipped)
        progress = Progress()
        pending: list[pa.Table] = []
        for listed, last in flag_last(listing_batches(config, counts.listing)):
            images = open_table(config.output, "images")  # created by the first commit; this batch's ledger reads the latest version
            planned = ledger.plan(as_written(listed, pseudonymizer), images, run.model_id, rule)
            counts.listed += planned.num_rows
            for name in ("already_done", "resumed", "given_up"):
                setattr(counts, name, getattr(counts, name) + int(pc.sum(planned[name]).as_py() or 0))
            pending.append(planned.filter(planned["score"]))
            progress.listed, progress.to_score = counts.listed, progress.to_score + pending[-1].num_rows
            progress.listing_done = last  # known before this batch's windows are scored, so their lines say the time left
            pending = score_full_windows(run, pending, counts, progress, final=False)
        progress.listing_done = True
        score_full_windows(run, pending, counts, progress, final=True)
        log.info("run %s: %d files listed, %d scored in %d chunk(s)", run_id, counts.listed, counts.scored, counts.chunks)
        report_back(run, counts)
        counts.studies_written, counts.studies_flagged = run_study_counts(config.output, run.model_id, run_id, config.date)
        ledger.record_scope(config.output, run.model_id, config.scope)
        summary = summarize(run, counts, resumes, started)
        write_summary(config.output, summary)
    except BaseException:
        lease.release(failed=True)
        raise
    lease.release(failed=False)
    return summary


def score_full_windows(run: Run, pending: list[pa.Table], counts: Counts, progress: Progress, final: bool) -> list[pa.Table]:
    """Score windows of `chunk_files` files while that many are pending (all of them when `final`); returns the rest."""
    table = pa.concat_tables(pending) if pending else None
    size = run.config.chunk_files
    while table is not None and table.num_rows and (final or table.num_rows >= size):
        window, table = table.slice(0, size), table.slice(size)
        score_and_commit(run, window, counts, progress)
    return [table] if table is not None and table.num_rows else []


def summarize(run: Run, counts: Counts, resumes: tuple[str, ...], started: float) -> dict[str, Any]:
    config = run.config
    return {
        "run_id": run.run_id,
        "model_id": run.model_id,
        "input": config.input,
        "output": config.output,
        "scored_date": config.date,
        "incremental": config.incremental,
        "files_listed": counts.listed,
        "files_skipped": counts.listed - counts.scored,  # not scored by this run: current, given up, or resumed
        "files_scored": counts.scored,
        "files_resumed": counts.resumed,  # committed by the interrupted run(s) this one resumes
        "files_replaced": counts.replaced,  # rows that replaced an earlier row of the same file
        "files_retried": counts.retried,  # of those, files whose last row was an error
        "files_given_up": counts.given_up,  # errors not retried: --max-retries reached
        "folders_unlisted": counts.listing.unlisted_folders,  # folders below the input that could not be listed: their files have no row
        "resumes": list(resumes),
        "chunks": counts.chunks,
        "by_status": counts.by_status,
        "studies_written": counts.studies_written,
        "studies_flagged": counts.studies_flagged,
        "threshold": run.threshold,
        "aggregate": config.aggregate,
        "decode": decode_record(run.decode),
        "images_per_second": round(counts.scored / counts.scoring_seconds, 2) if counts.scored and counts.scoring_seconds > 0 else None,
        "wall_seconds": round(time.time() - started, 2),
        "reports": counts.reports,  # with --report-to: SRs (and overlays) stored / already present / failed
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "lungray_version": __version__,
        "config": {key: value for key, value in asdict(config).items() if key not in ("model", "input", "output")},
    }
