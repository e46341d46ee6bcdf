"""Nightly screening: an archive in, per-image and per-study predictions out, nothing lost.

list -> (incremental: drop files this model already scored at the same size and mtime)
-> CPU decode tasks (the ingest's read/scope check/decode/preprocess, driven by the model's
recorded decode options and preprocessing; a model whose decode this lungray cannot
reproduce is refused before anything is read) -> model actors (GPU when there are GPUs)
-> small result rows streamed to the driver -> (`pseudonymize`: identifying columns keyed)
-> one images and one studies Parquet file per date, published atomically with the run
summary (see `lungray.screen.commit`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from lungray import __version__
from lungray.io.base import DecodeOptions, decode_record, options_from_record
from lungray.io.listing import FileEntry, join_uri, list_files
from lungray.io.rows import dataset_of_blocks
from lungray.io.scope import Scope
from lungray.modeldir import load_model_dir, read_meta
from lungray.pacs import dicomweb, source
from lungray.preprocess import PreprocessConfig
from lungray.privacy import Pseudonymizer, require_salt, resolve_salt
from lungray.screen import commit
from lungray.screen.decode import SCREEN_COLUMNS, decode_for_screening
from lungray.screen.explain import driving_images, explain, overlay_name
from lungray.screen.predictor import Predictor, local_model_dir
from lungray.screen.writeback import REPORT_CHOICES, store_reports
from lungray.screen.tables import (
    IMAGE_SCHEMA,
    STUDY_SCHEMA,
    aggregate_studies,
    already_scored,
    latest_per_path,
    partition_file,
    read_all_images,
    read_partition,
    replace_rows,
    to_parquet_bytes,
)

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        require_salt(self.throwaway_salt)
        dt.date.fromisoformat(self.date)  # a clear error for a malformed --date
        for name in ("since", "until"):
            if getattr(self, name) is not None:
                dt.date.fromisoformat(getattr(self, name))
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
        for name in ("actors", "batch_size", "files_per_task"):
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
    """How the model actors run: how many at most, what each asks of Ray, the batch they score."""

    max_actors: int
    resources: dict[str, float]
    batch_size: int


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
    tasks always find one (a 2-CPU machine deadlocked when they did).
    """
    gpus, cpus = int(cluster.get("GPU", 0)), float(cluster.get("CPU", 1.0))
    if gpus or config.gpu:
        return ActorPlan(config.actors or max(1, gpus), {"num_gpus": 1}, config.batch_size or 512)
    actors = config.actors or max(1, int(cpus // 2))
    return ActorPlan(actors, {"num_cpus": min(0.5, cpus / 2 / actors)}, config.batch_size or 32)


def score_files(entries: list[FileEntry], config: ScreenConfig, preprocess: PreprocessConfig, decode: DecodeOptions) -> pa.Table:
    """Stream the files through decode tasks and model actors; returns one small row per file."""
    listing = pa.table(
        {
            "uri": pa.array([entry.uri for entry in entries], pa.string()),
            "relpath": pa.array([entry.relpath for entry in entries], pa.string()),
            "size": pa.array([entry.size for entry in entries], pa.int64()),
            "mtime_ns": pa.array([entry.mtime_ns for entry in entries], pa.int64()),
        }
    )
    cluster = ray.cluster_resources()
    plan = plan_actors(config, cluster)
    per_task = config.files_per_task or files_per_task(len(entries), cluster.get("CPU", 1.0))
    decoded = dataset_of_blocks(listing, per_task).map_batches(
        decode_for_screening,
        fn_kwargs={"preprocess": preprocess, "decode": decode, "max_file_bytes": config.max_file_bytes, "scope": config.scope},
        batch_format="pyarrow",
        batch_size=None,
    )
    scored = decoded.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_uri": config.model, "threads": 1},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors),
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        **plan.resources,
    )
    columns = [*SCREEN_COLUMNS, "prob", "size", "mtime_ns"]
    parts = [batch.select(columns) for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None)]
    return pa.concat_tables(parts) if parts else IMAGE_SCHEMA.empty_table().select(columns)


def list_input(config: ScreenConfig) -> list[FileEntry]:
    """The files below a folder or prefix, or the instances a PACS query finds (streamed, paged).

    A PACS instance has no size or mtime: its `uri` names its SOP Instance UID, the
    incremental key. Its relpath STUDY/SOP gives an unreadable instance its study.
    """
    if not source.is_pacs_uri(config.input):
        return list_files(config.input)
    entries = {
        record.path: FileEntry(uri=record.path, relpath=f"{record.study_uid}/{record.sop_uid}", size=None, mtime_ns=None)
        for record in source.search_instances(config.input, config.since, config.until, config.modalities)
    }
    return list(entries.values())


def check_complete(scored: pa.Table, entries: list[FileEntry]) -> None:
    """Nothing lost, nothing duplicated: exactly one row per listed file, or no publish at all."""
    paths = scored["path"].to_pylist()
    if len(paths) != len(set(paths)) or set(paths) != {entry.uri for entry in entries}:
        raise RuntimeError(f"screening produced {len(paths)} rows ({len(set(paths))} distinct) for {len(entries)} files")


def as_written(entry: FileEntry, pseudonymizer: Pseudonymizer | None) -> tuple[str, int, int | None]:
    """A listed file's (path, size, mtime_ns) as the images table holds them, the incremental
    ledger's key: keyed when pseudonymized."""
    if pseudonymizer is None:
        return entry.uri, entry.size, entry.mtime_ns
    return pseudonymizer.key("path", entry.uri), entry.size, pseudonymizer.mtime(entry.mtime_ns)


def add_overlays(
    studies: pa.Table,
    images: pa.Table,
    config: ScreenConfig,
    decode: DecodeOptions,
    model_path: Path,
    store: commit.Store,
    staging: str,
    moves: dict[str, str],
    listed_paths: dict[str, str],
) -> pa.Table:
    """Stage a Grad-CAM overlay for every flagged study and record its final URI in `explain_path`.

    `listed_paths` maps the `path` written in the images table (keyed when pseudonymized)
    to the file to read.
    """
    flagged = [study for study, is_flagged in zip(studies["study_id"].to_pylist(), studies["flagged"].to_pylist()) if is_flagged]
    if not flagged:
        return studies
    model = load_model_dir(model_path)
    paths: dict[str, str] = {}
    for study, row in driving_images(images, flagged).items():
        png = explain({**row, "path": listed_paths.get(row["path"], row["path"])}, model, decode, config.max_file_bytes)
        if png is None:
            continue
        name = overlay_name(study)
        staged = f"{staging}/explain/{name}"
        store.write(staged, png)
        moves[staged] = store.path("explain", f"scored_date={config.date}", name)
        paths[study] = join_uri(config.output, "explain", f"scored_date={config.date}", name)
    column = pa.array([paths.get(study) for study in studies["study_id"].to_pylist()], pa.string())
    return studies.set_column(studies.schema.get_field_index("explain_path"), "explain_path", column)


def run_screen(config: ScreenConfig) -> dict[str, Any]:
    """Score the archive and publish the run; returns the run summary (also in runs/<run>.json)."""
    started = time.time()
    store = commit.Store.open(config.output)
    commit.recover(store)
    model_path = local_model_dir(config.model)
    meta = read_meta(model_path)
    preprocess = PreprocessConfig.from_dict(meta["preprocess"])
    decode = replace(options_from_record(meta.get("decode"), f"model {config.model}"), max_pixels=config.max_pixels)
    model_id, threshold = meta["model_id"], float(meta["threshold"])
    run_id = f"{config.date}_{dt.datetime.now(dt.timezone.utc):%H%M%S}_{uuid.uuid4().hex[:8]}"
    pseudonymizer = Pseudonymizer(resolve_salt(config.throwaway_salt)) if config.pseudonymize else None

    entries = list_input(config)
    written = {entry.uri: as_written(entry, pseudonymizer) for entry in entries}
    history = read_all_images(store, model_id)
    if config.incremental:
        seen = already_scored(history)
        to_score = [entry for entry in entries if written[entry.uri] not in seen]
    else:
        to_score = entries
    log.info("run %s: %d files listed, %d to score", run_id, len(entries), len(to_score))

    scoring_started = time.time()
    scored = score_files(to_score, config, preprocess, decode) if to_score else IMAGE_SCHEMA.empty_table().select([*SCREEN_COLUMNS, "prob", "size", "mtime_ns"])
    scoring_seconds = time.time() - scoring_started
    check_complete(scored, to_score)
    if pseudonymizer:
        scored = pseudonymizer.table(scored)
    new_images = (
        scored.append_column("model_id", pa.array([model_id] * scored.num_rows, pa.string()))
        .append_column("run_id", pa.array([run_id] * scored.num_rows, pa.string()))
        .select(IMAGE_SCHEMA.names)
        .cast(IMAGE_SCHEMA)
    )
    affected = set(new_images["study_id"].to_pylist())
    current_images = latest_per_path(history, new_images)
    new_studies = aggregate_studies(current_images, affected, threshold, config.aggregate, model_id, run_id)
    staging = commit.staging_dir(store, run_id)
    moves: dict[str, str] = {}
    if config.explain or config.report_overlay:
        listed_paths = {path: uri for uri, (path, _, _) in written.items()}
        new_studies = add_overlays(new_studies, current_images, config, decode, model_path, store, staging, moves, listed_paths)

    statuses = new_images["status"].to_pylist()
    summary = {
        "run_id": run_id,
        "model_id": model_id,
        "input": config.input,
        "output": config.output,
        "scored_date": config.date,
        "incremental": config.incremental,
        "files_listed": len(entries),
        "files_skipped": len(entries) - len(to_score),
        "files_scored": len(to_score),
        "by_status": {status: statuses.count(status) for status in ("ok", "error", "skipped")},
        "studies_written": new_studies.num_rows,
        "studies_flagged": int(pc.sum(new_studies["flagged"]).as_py() or 0),
        "threshold": threshold,
        "aggregate": config.aggregate,
        "decode": decode_record(decode),
        "images_per_second": round(len(to_score) / scoring_seconds, 2) if to_score and scoring_seconds > 0 else None,
        "wall_seconds": None,
        "reports": None,  # with --report-to: SRs (and overlays) stored / already present / failed
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "lungray_version": __version__,
        "config": {key: value for key, value in asdict(config).items() if key not in ("model", "input", "output")},
    }

    if new_images.num_rows:
        for table_name, new_rows, schema, keys in (
            ("images", new_images, IMAGE_SCHEMA, ["path", "model_id"]),
            ("studies", new_studies, STUDY_SCHEMA, ["study_id", "model_id"]),
        ):
            merged = replace_rows(read_partition(store, table_name, config.date, schema), new_rows, keys)
            staged = f"{staging}/{table_name}.parquet"
            store.write(staged, to_parquet_bytes(merged))
            moves[staged] = partition_file(store, table_name, config.date)
    summary["wall_seconds"] = round(time.time() - started, 2)
    staged_run = f"{staging}/run.json"
    store.write(staged_run, json.dumps(summary, indent=2).encode())
    moves[staged_run] = store.path("runs", f"{run_id}.json")
    commit.publish(store, run_id, moves)
    if config.report_to:
        summary["reports"] = store_reports(
            config.report_to, config.report, config.report_overlay, new_studies, current_images, threshold, model_id
        )
        log.info("run %s: reports to the PACS %s", run_id, summary["reports"])
        store.write(staged_run, json.dumps(summary, indent=2).encode())  # the committed summary, now with the counts
        store.fs.move(staged_run, moves[staged_run])
        store.fs.delete_dir(staging)
    return summary

