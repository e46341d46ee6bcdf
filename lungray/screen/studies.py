"""Keeping `OUTPUT/studies` in step with `OUTPUT/images`, whatever point a run was killed at.

Each studies MERGE records, in its Delta commit, the images-table version it reflects for
its model (`lungray.images_version.<model_id>`). A sync re-aggregates exactly the studies
of the image files added or removed since that version (the difference of two versions'
file lists: no scan of the history) and upserts them. A run syncs after every chunk it
commits, so a run killed between an images commit and its studies MERGE is caught up by
the next run's first sync.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import DeltaTable

from lungray.io.listing import delete_file, filesystem_for
from lungray.screen.tables import (
    IMAGE_SCHEMA,
    STUDY_SCHEMA,
    aggregate_studies,
    ensure_table,
    equal_or_both_null,
    merge,
    model_rows,
    open_table,
    sql_string,
)

log = logging.getLogger(__name__)

WATERMARK = "lungray.images_version"
# The threshold and aggregate of the last sync: studies are re-aggregated, all of them, when they change.
SETTINGS = "lungray.study_settings"
COMPARED = ["n_images", "n_errors", "n_skipped", "prob", "flagged", "threshold", "aggregate"]
STUDY_IMAGE_COLUMNS = ["path", "study_id", "sop_uid", "status", "prob", "size", "run_id"]
# A decoration of the new study rows (the Grad-CAM overlays of flagged studies without one) from them and their image rows.
Decorate = Callable[[pa.Table, pa.Table], pa.Table]
STUDY_IMAGES_SCHEMA = pa.schema([IMAGE_SCHEMA.field(name) for name in STUDY_IMAGE_COLUMNS])


def watermark_key(model_id: str) -> str:
    return f"{WATERMARK}.{model_id}"


def settings_key(model_id: str) -> str:
    return f"{SETTINGS}.{model_id}"


class Watermark(NamedTuple):
    """What the model's last studies sync recorded: the images version its rows reflect, and
    the threshold and aggregate it used (None in syncs from before they were recorded)."""

    version: int
    settings: str | None


def watermark(studies: DeltaTable, model_id: str) -> Watermark | None:
    """The model's last studies sync (None: never synced).

    Read from the newest commits first, in windows growing 16-fold: the model's last sync
    is almost always among the latest few, so a long-lived table's whole log is not read.
    """
    key = watermark_key(model_id)
    limit = 16
    while True:
        commits = studies.history(limit=limit)  # newest first
        for commit in commits:
            if key in commit:
                return Watermark(int(commit[key]), commit.get(settings_key(model_id)))
        if len(commits) < limit:
            return None
        limit *= 16


def changed_files(output: str, images: DeltaTable, since: int | None) -> list[str] | None:
    """Data files added or removed between version `since` and now; None when `since` is
    no longer in the log (then every study of the model is re-aggregated)."""
    now = set(images.file_uris())
    if since is None:
        return sorted(now)
    try:
        then = set(open_table(output, "images", version=since).file_uris())
    except Exception:  # noqa: BLE001 - that version's log was cleaned up
        log.warning("images version %d is no longer in the log: re-aggregating every study", since)
        return None
    changed = sorted(now ^ then)
    if changed:
        fs, paths = on_filesystem(changed)
        infos = fs.get_file_info(paths)
        if any(info.type == pafs.FileType.NotFound for info in infos):  # a removed file already vacuumed
            log.warning("files of images version %d were vacuumed: re-aggregating every study", since)
            return None
    return changed


def on_filesystem(uris: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem of a table's data files (all on one), and their paths in it."""
    fs, _ = filesystem_for(uris[0])
    return fs, [filesystem_for(uri)[1] for uri in uris]


def touched_studies(files: list[str], model_id: str) -> pa.Array:
    if not files:
        return pa.array([], pa.string())
    fs, paths = on_filesystem(files)
    dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    table = dataset.to_table(columns=["study_id", "model_id"])  # no pushed-down filter: delta-rs may write string_view
    ids = table["study_id"].cast(pa.string()).filter(pc.equal(table["model_id"].cast(pa.string()), model_id))
    return pc.unique(pc.drop_null(ids.combine_chunks()))


def sync_studies(
    output: str,
    model_id: str,
    threshold: float,
    aggregate: str,
    run_id: str,
    date: str,
    decorate: Decorate | None = None,
    before_commit: Callable[[pa.Table], None] | None = None,
) -> pa.Table:
    """Re-aggregate and upsert the model's studies touched since the last sync.

    `before_commit` gets the study rows to be written before the commit that also moves the
    watermark past them (the write-back queue: once the watermark has moved, no later sync
    would see those studies again). Returns the study rows written.
    """
    images = open_table(output, "images")
    if images is None:  # nothing committed yet
        return STUDY_SCHEMA.empty_table()
    studies = ensure_table(output, "studies")
    version = images.version()
    synced = watermark(studies, model_id)
    since = None if synced is None else synced.version
    settings = json.dumps({"threshold": threshold, "aggregate": aggregate})
    resettled = synced is not None and synced.settings is not None and synced.settings != settings
    if since == version and not resettled:
        return STUDY_SCHEMA.empty_table()
    files = None if resettled else changed_files(output, images, since)
    touched = None if files is None else touched_studies(files, model_id)
    rows = study_images(images, model_id, touched)
    aggregated = aggregate_studies(rows, threshold, aggregate, model_id, run_id, date)
    current = current_studies(studies, model_id, aggregated["study_id"])
    new = with_kept_overlays(changed_studies(aggregated, current), current, rows, model_id)
    if decorate is not None and new.num_rows:
        new = decorate(new, rows)
    emptied = emptied_studies(studies, model_id, touched, aggregated["study_id"])
    if new.num_rows or since is None or files or emptied or resettled:
        if before_commit is not None and new.num_rows:
            before_commit(new)
        metadata = {watermark_key(model_id): str(version), settings_key(model_id): settings}
        merge(studies, "studies", new, metadata, delete=studies_predicate(model_id, emptied))
        for overlay in replaced_overlays(current, new):
            delete_file(overlay)  # after the commit: a run killed before it leaves a file no row names, never a row naming no file
    return new


def replaced_overlays(current: pa.Table, new: pa.Table) -> list[str]:
    """Overlays the table named before `new` was committed and no longer does (the study was
    unflagged, or another image drives it now): each a derived image of a patient's film,
    kept nowhere else. Overlays named by study alone (before `overlay_name`) are left: two
    models' rows can name one such file."""
    now = dict(zip(new["study_id"].to_pylist(), new["explain_path"].to_pylist()))
    return [
        held
        for study, held in zip(current["study_id"].to_pylist(), current["explain_path"].to_pylist())
        if held and study in now and now[study] != held and held.rsplit("/", 1)[-1] != legacy_overlay_name(study)
    ]


def current_studies(studies: DeltaTable, model_id: str, study_ids: pa.Array) -> pa.Table:
    """The model's study rows of `study_ids` as the table holds them (read within their range)."""
    columns = ["study_id", *COMPARED, "explain_path"]
    kept = [rows.filter(pc.is_in(rows["study_id"], study_ids)) for rows in model_rows(studies, columns, model_id, within=("study_id", study_ids), name="studies")]
    return pa.concat_tables(kept) if kept else pa.schema([STUDY_SCHEMA.field(name) for name in columns]).empty_table()


def changed_studies(aggregated: pa.Table, current: pa.Table) -> pa.Table:
    """The aggregated rows that are new or differ from the table's in a counted value: a
    study whose counts, probability, flag and settings stand keeps its row, its run and its
    `scored_date` (the night it last changed), and is not counted or reported again."""
    if current.num_rows == 0:
        return aggregated
    held = current.select(["study_id", *COMPARED]).rename_columns(["study_id", *(f"held_{name}" for name in COMPARED)])
    joined = aggregated.join(held, "study_id", join_type="left outer")  # a new study: held values null, n_images differs
    differs = [pc.invert(equal_or_both_null(joined[name], joined[f"held_{name}"])) for name in COMPARED]
    return joined.filter(functools.reduce(pc.or_, differs)).select(STUDY_SCHEMA.names).sort_by("study_id")


def driving_images(images: pa.Table, flagged_studies: list[str]) -> dict[str, dict]:
    """For each flagged study, its usable image with the highest probability (of equals, the
    smallest path, so that the choice does not depend on the order rows are read in)."""
    best: dict[str, dict] = {}
    if not flagged_studies:  # every sync asks (for the overlays it keeps): no Python rows when none can be kept
        return best
    usable = pc.and_(pc.is_in(images["study_id"], pa.array(flagged_studies, pa.string())), pc.equal(images["status"], "ok"))
    candidates = images.filter(pc.and_(usable, pc.is_valid(images["prob"])))
    for row in candidates.select(["path", "study_id", "status", "prob", "size", "run_id"]).to_pylist():
        held = best.get(row["study_id"])
        if held is None or (row["prob"], held["path"]) > (held["prob"], row["path"]):
            best[row["study_id"]] = row
    return best


def overlay_name(model_id: str, image: dict) -> str:
    """The file name of one model's overlay of one scored image: a hash of the model, the
    image's path as written (keyed with --pseudonymize) and the run that scored it. Two models'
    overlays of a study never share a file, and a study's overlay stands while the image that
    drives it does, whatever else in the study changes."""
    return hashlib.sha256("\x1f".join((model_id, image["path"], image["run_id"])).encode()).hexdigest()[:24] + ".png"


def legacy_overlay_name(study_id: str) -> str:
    """The name overlays had before `overlay_name` (by study alone), which outputs still hold."""
    return hashlib.sha256(study_id.encode()).hexdigest()[:24] + ".png"


def with_kept_overlays(new: pa.Table, current: pa.Table, images: pa.Table, model_id: str) -> pa.Table:
    """`new` with each flagged study's overlay kept where the table's shows tonight's driving
    image: not made again, and kept where the image cannot be read again (a run whose paths
    are keyed, --pseudonymize, cannot read a file an earlier run or chunk scored)."""
    if new.num_rows == 0 or current.num_rows == 0:
        return new
    held = {study: path for study, path in zip(current["study_id"].to_pylist(), current["explain_path"].to_pylist()) if path}
    held_prob = dict(zip(current["study_id"].to_pylist(), current["prob"].to_pylist()))
    flagged = [study for study in pc.filter(new["study_id"], new["flagged"]).to_pylist() if study in held]
    prob = dict(zip(new["study_id"].to_pylist(), new["prob"].to_pylist()))
    kept = {
        study: held[study]
        for study, image in driving_images(images, flagged).items()
        if held[study].rsplit("/", 1)[-1] == overlay_name(model_id, image)
        # an overlay named as before this naming (by its study) is kept by the rule it was made under
        or (held[study].rsplit("/", 1)[-1] == legacy_overlay_name(study) and prob[study] == held_prob[study])
    }
    paths = [kept.get(study, path) for study, path in zip(new["study_id"].to_pylist(), new["explain_path"].to_pylist())]
    return new.set_column(new.schema.get_field_index("explain_path"), "explain_path", pa.array(paths, pa.string()))


def emptied_studies(studies: DeltaTable, model_id: str, touched: pa.Array | None, kept: pa.Array) -> list[str]:
    """Studies that had image rows and have none now: a file that failed to read was counted
    in its folder's study and, read on a retry, moved to its header's; a changed file moved.
    Among the touched studies, or among all the model's study rows when every study was
    re-aggregated (`touched` None)."""
    if touched is None:
        held = [rows["study_id"] for rows in model_rows(studies, ["study_id"], model_id, name="studies")]
        touched = pa.chunked_array(held, pa.string())
    return sorted(set(touched.to_pylist()) - set(kept.to_pylist()) - {None})


def studies_predicate(model_id: str, study_ids: list[str]) -> str | None:
    """SQL for the model's study rows of `study_ids` (None for none)."""
    if not study_ids:
        return None
    return f"t.model_id = {sql_string(model_id)} AND t.study_id IN ({', '.join(sql_string(study) for study in study_ids)})"


def study_images(images: DeltaTable, model_id: str, studies: pa.Array | None) -> pa.Table:
    """The model's current image rows of `studies` (all of its studies when None), streamed
    batch by batch; only data files whose study ids can fall in the studies' range are read."""
    kept = []
    for rows in model_rows(images, STUDY_IMAGE_COLUMNS, model_id, within=None if studies is None else ("study_id", studies)):
        kept.append(rows if studies is None else rows.filter(pc.is_in(rows["study_id"], studies)))
    return pa.concat_tables(kept) if kept else STUDY_IMAGES_SCHEMA.empty_table()
