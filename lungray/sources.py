"""Dataset adapters: turn a listed archive into labelled, patient-keyed rows.

The ingest lists the input root (local or S3) into relative POSIX paths and reads any
labels CSV itself, so adapters here are pure functions of path strings and CSV text:
they never touch storage, which keeps them fast to test and identical for both backends.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class SourceInfo:
    """What an adapter knows about one listed file."""

    label: int | None  # 0 normal, 1 abnormal, None unknown
    patient_id: str | None  # raw identifier; the ingest hashes it and never logs it
    source: str  # adapter that produced the entry, or "archive" for unlabelled input


DATASETS: tuple[str, ...] = ("kermany", "shenzhen", "montgomery", "chestxray14", "csv")

_KERMANY_CLASS_FOLDERS = {"normal": 0, "pneumonia": 1}
# personN_bacteria_M / personN_virus_M (one real file adds a further _K suffix).
_KERMANY_PNEUMONIA_NAME = re.compile(r"(person\d+)_(?:bacteria|virus)(?:_\d+)+", re.IGNORECASE)
# IM-0629-0001, IM-0629-0001-0002, NORMAL2-IM-1234-0001: the patient is the IM number.
_KERMANY_NORMAL_NAME = re.compile(r"((?:NORMAL\d+-)?IM-\d+)(?:-\d+)+", re.IGNORECASE)
_TB_NAME = {
    "shenzhen": re.compile(r"(CHNCXR_\d+)_([01])", re.IGNORECASE),
    "montgomery": re.compile(r"(MCUCXR_\d+)_([01])", re.IGNORECASE),
}

_LABEL_WORDS = {
    "0": 0,
    "normal": 0,
    "no finding": 0,
    "1": 1,
    "abnormal": 1,
    "pneumonia": 1,
    "tb": 1,
    "tuberculosis": 1,
}
_CHESTXRAY14_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


def describe(
    dataset: str | None, relpaths: Sequence[str], labels_csv_text: str | None = None
) -> dict[str, SourceInfo]:
    """Label every relpath of an archive laid out as `dataset`.

    Every relpath gets an entry; those the dataset cannot label get label and patient
    None, so `merge` can combine adapters run over the same listing. `dataset=None`
    is an unlabelled archive, or a generic CSV one when `labels_csv_text` is given.
    Configuration errors (unknown dataset, missing or malformed CSV) raise ValueError.
    """
    if dataset is None:
        if labels_csv_text is None:
            return {path: SourceInfo(None, None, "archive") for path in relpaths}
        dataset = "csv"
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if dataset in ("chestxray14", "csv"):
        if labels_csv_text is None:
            raise ValueError(f"dataset {dataset!r} needs a labels CSV")
        if dataset == "chestxray14":
            by_name = _chestxray14_entries(labels_csv_text)
            return {
                path: by_name.get(PurePosixPath(path).name, SourceInfo(None, None, dataset))
                for path in relpaths
            }
        return _match_csv_entries(_generic_csv_entries(labels_csv_text), relpaths)
    if labels_csv_text is not None:
        raise ValueError(f"dataset {dataset!r} takes its labels from file names, not a CSV")
    if dataset == "kermany":
        return {path: _describe_kermany(path) for path in relpaths}
    return {path: _describe_tb(dataset, path) for path in relpaths}


def merge(parts: Sequence[Mapping[str, SourceInfo]]) -> dict[str, SourceInfo]:
    """Combine adapter outputs; for a path claimed twice the entry with a label wins.

    Two different known labels for one path mean the sources contradict each other,
    which is a configuration error rather than something to resolve silently.
    """
    merged: dict[str, SourceInfo] = {}
    for part in parts:
        for path, info in part.items():
            kept = merged.get(path)
            if kept is None or (kept.label is None and info.label is not None):
                merged[path] = info
            elif info.label is not None and info.label != kept.label:
                raise ValueError(
                    f"conflicting labels for {path!r}: {kept.label} from {kept.source}, "
                    f"{info.label} from {info.source}"
                )
    return merged


def parse_label(text: str) -> int | None:
    """Map a CSV label cell to 0/1 (None when empty); unknown words raise ValueError."""
    word = " ".join(text.split()).lower()
    if not word:
        return None
    if word not in _LABEL_WORDS:
        raise ValueError(f"unrecognised label {text!r}; expected one of {sorted(_LABEL_WORDS)}")
    return _LABEL_WORDS[word]


def _describe_kermany(path: str) -> SourceInfo:
    """Label from the nearest NORMAL/PNEUMONIA folder, patient from the file name."""
    pure = PurePosixPath(path)
    label = next(
        (
            _KERMANY_CLASS_FOLDERS[folder.lower()]
            for folder in reversed(pure.parent.parts)
            if folder.lower() in _KERMANY_CLASS_FOLDERS
        ),
        None,
    )
    if label is None:
        return SourceInfo(None, None, "kermany")
    match = _KERMANY_PNEUMONIA_NAME.fullmatch(pure.stem) or _KERMANY_NORMAL_NAME.fullmatch(
        pure.stem
    )
    return SourceInfo(label, match.group(1) if match else None, "kermany")


def _describe_tb(dataset: str, path: str) -> SourceInfo:
    """Shenzhen/Montgomery encode patient and TB status as `PREFIX_NNNN_<0|1>`."""
    match = _TB_NAME[dataset].fullmatch(PurePosixPath(path).stem)
    if match is None:
        return SourceInfo(None, None, dataset)
    return SourceInfo(int(match.group(2)), match.group(1), dataset)


def _csv_rows(text: str, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV with their file line numbers, after checking required columns."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))  # spreadsheet BOM
    columns = [name.strip() for name in reader.fieldnames or ()]
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(f"labels CSV lacks columns {missing}; found {columns}")
    reader.fieldnames = columns
    return [
        (reader.line_num, {key: (value or "").strip() for key, value in row.items() if key})
        for row in reader
    ]


def _chestxray14_entries(text: str) -> dict[str, SourceInfo]:
    """Data_Entry_2017.csv keyed by image file name; any finding counts as abnormal."""
    entries: dict[str, SourceInfo] = {}
    for line, row in _csv_rows(text, _CHESTXRAY14_COLUMNS):
        findings = row["Finding Labels"]
        label = None if not findings else int(findings.lower() != "no finding")
        name = row["Image Index"]
        if name in entries:
            raise ValueError(f"labels CSV line {line}: image {name!r} listed twice")
        entries[name] = SourceInfo(label, row["Patient ID"] or None, "chestxray14")
    return entries


def _generic_csv_entries(text: str) -> dict[str, SourceInfo]:
    """A `path,label[,patient]` CSV keyed by its normalised path column."""
    entries: dict[str, SourceInfo] = {}
    for line, row in _csv_rows(text, ("path", "label")):
        path = row["path"].removeprefix("./")
        if not path:
            raise ValueError(f"labels CSV line {line}: empty path")
        if path in entries:
            raise ValueError(f"labels CSV line {line}: path {path!r} listed twice")
        try:
            label = parse_label(row["label"])
        except ValueError as error:
            raise ValueError(f"labels CSV line {line} ({path}): {error}") from None
        entries[path] = SourceInfo(label, row.get("patient") or None, "csv")
    return entries


def _match_csv_entries(
    entries: Mapping[str, SourceInfo], relpaths: Sequence[str]
) -> dict[str, SourceInfo]:
    """Match CSV rows to listed paths exactly, else by a file name unique on both sides.

    The basename fallback lets a CSV written relative to another folder still apply,
    but only where it cannot pick the wrong file.
    """
    csv_by_name: dict[str, list[str]] = defaultdict(list)
    for path in entries:
        csv_by_name[PurePosixPath(path).name].append(path)
    listed_by_name: dict[str, int] = defaultdict(int)
    for path in relpaths:
        listed_by_name[PurePosixPath(path).name] += 1
    unknown = SourceInfo(None, None, "csv")
    matched: dict[str, SourceInfo] = {}
    for path in relpaths:
        if path in entries:
            matched[path] = entries[path]
            continue
        name = PurePosixPath(path).name
        candidates = csv_by_name.get(name, [])
        unique = len(candidates) == 1 and listed_by_name[name] == 1
        matched[path] = entries[candidates[0]] if unique else unknown
    return matched
