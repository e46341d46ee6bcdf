"""Ray Data ingest: labelled archives -> sharded tensor Parquet with a patient-level split.

Two passes, because a patient-level stratified split needs every patient before any row
can be labelled with its split:
1. decode: list -> one row per file (read, check scope, decode, preprocess; errors and
   out-of-scope objects as values) -> `OUTPUT/_staging/` Parquet;
2. split: read the staging metadata (a few small columns), assign splits by patient
   (images that are byte-identical after preprocessing are kept with each other, so a
   duplicate cannot leak across splits), then stream the ok rows with their split into
   `OUTPUT/data/`, write `OUTPUT/errors.parquet`, `OUTPUT/skipped.parquet` and last
   `OUTPUT/summary.json`.

With `pseudonymize`, identifying columns are keyed as they are written (data, errors,
skipped), so the split is the same as without; only the staging of a run that has not
finished holds the raw values, and the next run removes it.

`summary.json` is written last and marks a complete ingest: a crashed run leaves none,
and a rerun replaces what it left.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lungray import sources, split
from lungray.io.base import decode_record
from lungray.io.decode import DecodeOptions, patient_key
from lungray.io.listing import FileEntry, delete_dir, delete_file, exists, filesystem_for, join_uri, list_files, read_bytes, resolved, write_bytes
from lungray.io.parquet import read_parquet
from lungray.io.rows import dataset_of_blocks, rows_table
from lungray.io.scope import Scope
from lungray.preprocess import PreprocessConfig
from lungray.privacy import Pseudonymizer, require_salt, resolve_salt

log = logging.getLogger(__name__)

DEFAULT_LABEL_FILES = {"chestxray14": "Data_Entry_2017.csv", "csv": "labels.csv"}
# Written before an ingest deletes or writes anything in OUTPUT, removed once summary.json is:
# a data/ folder without it (or _staging/) is not an unfinished ingest's, and is left alone.
STARTED_MARKER = "_lungray_ingest_started"


@dataclass(frozen=True)
class SourceSpec:
    """One archive to ingest and how to label it."""

    uri: str
    dataset: str | None = None
    labels: str | None = None  # labels CSV (local or s3://); defaults to a well-known name inside `uri`


@dataclass(frozen=True)
class IngestConfig:
    sources: tuple[SourceSpec, ...]
    output: str
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    holdout: tuple[str, ...] = ()  # relpath globs whose patients all go to test (cohort holdout)
    shard_rows: int = 1024
    files_per_task: int = 32
    max_file_bytes: int = 1 << 30
    scope: Scope = field(default_factory=Scope)
    pseudonymize: bool = False  # key every identifying column, for outputs that leave the site
    throwaway_salt: bool = False  # without LUNGRAY_PATIENT_SALT, a random salt for this run (else refused)

    def __post_init__(self) -> None:
        require_salt(self.throwaway_salt)
        split.check_fractions(self.fractions)  # before the decode, not after it


@dataclass
class ListedFile:
    entry: FileEntry
    source: str
    label: int | None
    patient_key: str | None


def labels_text(spec: SourceSpec) -> str | None:
    """The labels CSV of a source, read from wherever it lives."""
    uri = spec.labels
    if uri is None and spec.dataset in DEFAULT_LABEL_FILES:
        candidate = join_uri(spec.uri, DEFAULT_LABEL_FILES[spec.dataset])
        uri = candidate if exists(candidate) else None
    if uri is None:
        if spec.dataset in ("chestxray14", "csv"):
            raise ValueError(f"--dataset {spec.dataset} needs a labels CSV (--labels) for {spec.uri}")
        return None
    return read_bytes(uri).decode("utf-8-sig")


def list_sources(specs: tuple[SourceSpec, ...], salt: str | None) -> list[ListedFile]:
    """List every source, label each file by its adapter, and hash patient IDs at once
    (salt None: no patient keys, for callers that write none)."""
    listed: list[ListedFile] = []
    source_of: dict[str, str] = {}
    for spec in specs:
        entries = list_files(spec.uri)
        # A file is the file its path resolves to: a source reached through a link is the same files.
        files = [resolved(entry.uri) for entry in entries]
        overlap = [file for file in files if file in source_of]
        if overlap:  # each file once: a second row would be a second training image, maybe labelled otherwise
            raise ValueError(
                f"{len(overlap)} file(s) of source {spec.uri} are also in source {source_of[overlap[0]]}: "
                "give sources that do not overlap (a folder and one of its subfolders do, through a link too)"
            )
        source_of.update((file, spec.uri) for file in files)
        infos = sources.describe(spec.dataset, [entry.relpath for entry in entries], labels_text(spec))
        for entry in entries:
            info = infos.get(entry.relpath)
            listed.append(
                ListedFile(
                    entry=entry,
                    source=info.source if info else (spec.dataset or "archive"),
                    label=info.label if info else None,
                    # Namespaced by source: patient "1" of two datasets are different people.
                    patient_key=patient_key(f"{info.source}/{info.patient_id}", salt) if info and info.patient_id else None,
                )
            )
    return listed


def decode_block(batch: pa.Table, config: IngestConfig, salt: str) -> pa.Table:
    """Ray Data map_batches function: listed files -> decoded rows with their labels."""
    table = rows_table(
        batch["uri"].to_pylist(), batch["relpath"].to_pylist(), batch["size"].to_pylist(),
        config.preprocess, config.decode, config.max_file_bytes, config.scope, salt,
    )
    # A patient known from the dataset's adapter wins over the DICOM header's PatientID.
    merged_keys = pc.coalesce(batch["patient_key"].combine_chunks(), table["patient_key"].combine_chunks())
    table = table.set_column(table.schema.get_field_index("patient_key"), "patient_key", merged_keys)
    for name in ("label", "source", "relpath"):
        table = table.append_column(name, batch[name])
    return table


# A DICOM UID (PS3.5 9.1): dot-separated numbers without leading zeros under a root arc of 0, 1 or 2,
# so that a folder named by a date (2026.11.30) is not taken for a study.
STUDY_UID = re.compile(r"[012](\.(0|[1-9][0-9]*))+")


def split_groups(patient_keys: list[str | None], content_hashes: list[str | None], paths: list[str], study_ids: list[str | None]) -> list[str]:
    """Grouping key per image: a patient, joined with every patient that shares an identical
    image or a study. A study counts where it is a UID (a header's StudyInstanceUID, or a folder
    named by one, as exports lay studies out), not where it is any other folder
    (`study_from_relpath`, often a class folder such as NORMAL/): a film without a PatientID is
    its own patient, and the other films of its study must not land in another split."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    nodes = []
    for key, digest, path, study in zip(patient_keys, content_hashes, paths, study_ids):
        node = f"p:{key}" if key is not None else f"f:{path}"
        nodes.append(node)
        if digest is not None:
            parent[find(node)] = find(f"h:{digest}")
        if study is not None and STUDY_UID.fullmatch(study):
            parent[find(node)] = find(f"s:{study}")
    return [find(node) for node in nodes]


def add_split_column(table: pa.Table, split_by_path: dict[str, str], pseudonymizer: Pseudonymizer | None) -> pa.Table:
    splits = [split_by_path[path] for path in table["path"].to_pylist()]
    table = table.drop_columns(["status", "error", "skip_reason"]).append_column("split", pa.array(splits, pa.string()))
    return pseudonymizer.table(table) if pseudonymizer else table


def data_fingerprint(meta: pa.Table) -> str:
    """SHA-256 over (path, content, label, split) of every usable image: what a model was trained on."""
    digest = hashlib.sha256()
    for path, content, label, split_name in sorted(
        zip(*(meta[c].to_pylist() for c in ("path", "content_hash", "label", "split")))
    ):
        digest.update(f"{path}\t{content}\t{label}\t{split_name}\n".encode())
    return digest.hexdigest()


def write_table(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue())


def read_staging_metadata(staging: str) -> pa.Table:
    fs, path = filesystem_for(staging)
    columns = [
        "path", "relpath", "status", "error", "skip_reason", "label", "patient_key", "study_id", "source", "content_hash", "format",
        "modality", "body_part", "view_position",
    ]
    return pq.read_table(path, columns=columns, filesystem=fs)


def count_by(values: list[Any]) -> dict[str, int]:
    return {str(key): count for key, count in sorted(Counter(values).items(), key=lambda item: str(item[0]))}


def run_ingest(config: IngestConfig) -> dict[str, Any]:
    """Run the whole ingest on the current Ray cluster; returns the summary it wrote."""
    started = time.time()
    output = config.output
    summary_uri = join_uri(output, "summary.json")
    staging = join_uri(output, "_staging")
    data_uri = join_uri(output, "data")
    marker = join_uri(output, STARTED_MARKER)
    if exists(summary_uri):
        raise FileExistsError(f"{output} already holds a finished ingest (summary.json); choose another output")
    if exists(data_uri) and not (exists(marker) or exists(staging)):
        raise FileExistsError(f"{output} holds a data/ folder that no lungray ingest started; choose another output")
    salt = resolve_salt(config.throwaway_salt)
    pseudonymizer = Pseudonymizer(salt) if config.pseudonymize else None

    def written(table: pa.Table) -> pa.Table:
        return pseudonymizer.table(table) if pseudonymizer else table

    listed = list_sources(config.sources, salt)  # a mistyped input fails here, before anything is deleted
    if not listed:
        raise ValueError("no files found in the input")
    write_bytes(marker, b"an unfinished lungray ingest: its next run starts it again\n")
    delete_dir(staging)  # an unfinished ingest's, started again
    delete_dir(data_uri)
    log.info("listed %d files", len(listed))
    listing = pa.table(
        {
            "uri": pa.array([item.entry.uri for item in listed], pa.string()),
            "relpath": pa.array([item.entry.relpath for item in listed], pa.string()),
            "size": pa.array([item.entry.size for item in listed], pa.int64()),
            "source": pa.array([item.source for item in listed], pa.string()),
            "label": pa.array([item.label for item in listed], pa.int8()),
            "patient_key": pa.array([item.patient_key for item in listed], pa.string()),
        }
    )
    decoded = dataset_of_blocks(listing, config.files_per_task).map_batches(
        decode_block, fn_kwargs={"config": config, "salt": salt}, batch_format="pyarrow", batch_size=None
    )
    fs, staging_path = filesystem_for(staging)
    decoded.write_parquet(staging_path, filesystem=fs, compression="zstd")
    decode_seconds = time.time() - started

    meta = read_staging_metadata(staging)
    if meta.num_rows != len(listed):
        raise RuntimeError(f"decode produced {meta.num_rows} rows for {len(listed)} files")
    ok_mask = pc.equal(meta["status"], "ok")
    ok_meta = meta.filter(ok_mask).sort_by("path")  # the split depends on order: make it the listing's
    groups = split_groups(*(ok_meta[name].to_pylist() for name in ("patient_key", "content_hash", "path", "study_id")))
    labels = ok_meta["label"].to_pylist()
    if config.holdout:
        held_out = [any(fnmatch.fnmatchcase(relpath, pattern) for pattern in config.holdout) for relpath in ok_meta["relpath"].to_pylist()]
        assigned = split.assign_with_holdout(groups, labels, held_out, config.fractions, config.seed)
    else:
        assigned = split.assign_splits(groups, labels, config.fractions, config.seed)
    split_by_path = dict(zip(ok_meta["path"].to_pylist(), assigned))
    ok_meta = ok_meta.append_column("split", pa.array(assigned, pa.string()))

    read_parquet(staging_path, fs).filter(
        expr="status == 'ok'"
    ).map_batches(
        add_split_column, fn_kwargs={"split_by_path": split_by_path, "pseudonymizer": pseudonymizer}, batch_format="pyarrow"
    ).write_parquet(
        filesystem_for(data_uri)[1],
        filesystem=fs,
        min_rows_per_file=config.shard_rows,
        max_rows_per_file=config.shard_rows,
        compression="zstd",
    )
    errors = written(meta.filter(pc.equal(meta["status"], "error")).select(["path", "error", "format", "source"]))
    write_table(join_uri(output, "errors.parquet"), errors)
    skipped = meta.filter(pc.equal(meta["status"], "skipped"))
    skipped = written(skipped.select(["path", "skip_reason", "format", "source", "modality", "body_part", "view_position"]))
    write_table(join_uri(output, "skipped.parquet"), skipped)

    wall = time.time() - started
    summary = {
        "files": len(listed),
        "by_status": count_by(meta["status"].to_pylist()),
        "by_source": count_by(meta["source"].to_pylist()),
        "by_label": count_by(ok_meta["label"].to_pylist()),
        "by_format": count_by(meta["format"].to_pylist()),
        "errors_by_reason": count_by([str(e).split(":")[0] for e in errors["error"].to_pylist()]),
        "skipped_by_reason": count_by(skipped["skip_reason"].to_pylist()),
        "splits": split.split_summary(assigned, labels, ok_meta["patient_key"].to_pylist()),
        "preprocess": config.preprocess.to_dict(),
        "decode": {**asdict(config.decode), **decode_record(config.decode)},  # with the decoder version
        "scope": asdict(config.scope),
        "pseudonymized": config.pseudonymize,
        "fractions": list(config.fractions),
        "holdout": list(config.holdout),
        "seed": config.seed,
        "fingerprint": data_fingerprint(written(ok_meta)),
        "sources": [asdict(spec) for spec in config.sources],
        "decode_seconds": round(decode_seconds, 2),
        "wall_seconds": round(wall, 2),
        "images_per_second": round(len(listed) / decode_seconds, 2) if decode_seconds > 0 else None,
        "layout": {"data": "data/*.parquet", "errors": "errors.parquet", "skipped": "skipped.parquet"},
    }
    delete_dir(staging)
    write_bytes(summary_uri, json.dumps(summary, indent=2).encode())
    delete_file(marker)
    return summary


def load_summary(data_dir: str) -> dict[str, Any]:
    """The summary.json of a finished ingest (its preprocessing, split and fingerprint)."""
    uri = join_uri(data_dir, "summary.json")
    if not exists(uri):
        raise FileNotFoundError(f"{data_dir} is not a finished lungray ingest (no summary.json)")
    return json.loads(read_bytes(uri))


def ingest_rows(data_dir: str, columns: list[str], where: pads.Expression | None = None) -> pa.Table:
    """`columns` of the rows of a finished ingest's data/ that `where` keeps (all: None), read by
    Arrow without Ray, in no particular order."""
    filesystem, path = filesystem_for(images_uri(data_dir))
    return pads.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=columns, filter=where)


def images_uri(data_dir: str) -> str:
    """The data/ folder of a finished ingest; one of no usable file has none, and says so here
    rather than as a reader's bare "not found"."""
    uri = join_uri(data_dir, "data")
    if not exists(uri) and exists(join_uri(data_dir, "summary.json")):
        by_status = load_summary(data_dir).get("by_status", {})
        raise ValueError(f"{data_dir} holds no usable images (its ingest found {by_status or 'no files'}; see its summary.json)")
    return uri
