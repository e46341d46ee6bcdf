"""Patient-level, label-stratified train/val/test split.

Images of one patient are near-duplicates for a model, so a patient in two splits leaks
training data into evaluation; the split therefore assigns whole patients, stratified by
patient label so every split sees the same normal/abnormal mix.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

SPLITS = ("train", "val", "test")
NO_PATIENT_PREFIX = "image:"  # `patient_array`'s stand-in for an image without a patient key
_STRATA: tuple[int | None, ...] = (0, 1, None)
_LABEL_NAMES = {0: "normal", 1: "abnormal", None: "unknown"}


def assign_splits(
    patient_keys: Sequence[str | None],
    labels: Sequence[int | None],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> list[str]:
    """Return the split name of each image (inputs are one entry per image).

    A patient's stratum is the max of its known labels (abnormal if any image is,
    unknown if none is labelled). Within a stratum, patients are shuffled with
    `numpy.random.default_rng(seed)` and laid end to end by image count; each patient
    goes to the split whose share of the stratum contains its middle image. This greedy
    fill puts each bound between splits within half a patient (the one it cuts) of where the
    fractions put it, so a split's image count is off by at most half a patient at each of
    its bounds (the middle split: up to a whole patient's images), without any search; a
    split with fraction 0 stays empty.
    """
    check_fractions(fractions)
    if len(patient_keys) != len(labels):
        raise ValueError(f"{len(patient_keys)} patient keys but {len(labels)} labels")
    _check_labels(labels)

    images_of: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(_patient_groups(patient_keys)):
        images_of[key].append(index)
    patients_by_stratum: dict[int | None, list[Hashable]] = defaultdict(list)
    for key, images in images_of.items():
        known = [labels[index] for index in images if labels[index] is not None]
        patients_by_stratum[max(known) if known else None].append(key)

    rng = np.random.default_rng(seed)
    split_bounds = np.cumsum(fractions)[:-1]
    assigned = [""] * len(labels)
    for stratum in _STRATA:
        patients = patients_by_stratum.get(stratum, [])
        if not patients:
            continue
        shuffled = [patients[index] for index in rng.permutation(len(patients))]
        counts = np.array([len(images_of[key]) for key in shuffled])
        middles = (np.cumsum(counts) - counts / 2) / counts.sum()
        for key, split_index in zip(shuffled, np.searchsorted(split_bounds, middles, "right")):
            for index in images_of[key]:
                assigned[index] = SPLITS[split_index]
    return assigned


def split_summary(
    splits: Sequence[str], labels: Sequence[int | None], patient_keys: Sequence[str | None]
) -> dict[str, dict[str, int | dict[str, int]]]:
    """Images, distinct patients and label counts per split, for the ingest summary JSON."""
    if not len(splits) == len(labels) == len(patient_keys):
        raise ValueError("splits, labels and patient_keys must have one entry per image")
    _check_labels(labels)
    patients: dict[str, set[Hashable]] = {name: set() for name in SPLITS}
    label_counts = {name: {label: 0 for label in _LABEL_NAMES.values()} for name in SPLITS}
    for split, label, key in zip(splits, labels, _patient_groups(patient_keys)):
        if split not in patients:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        patients[split].add(key)
        label_counts[split][_LABEL_NAMES[label]] += 1
    return {
        name: {
            "images": sum(label_counts[name].values()),
            "patients": len(patients[name]),
            "labels": label_counts[name],
        }
        for name in SPLITS
    }


def _patient_groups(patient_keys: Sequence[str | None]) -> list[Hashable]:
    """Grouping key per image; an image without a patient becomes its own patient.

    The surrogate is a tuple, so it can never collide with a real (string) patient key.
    """
    return [
        key if key is not None else ("no-patient", index) for index, key in enumerate(patient_keys)
    ]


def patient_array(patient_keys: Sequence[str | None], paths: Sequence[str]) -> np.ndarray:
    """Patient key per image as an object array for grouped statistics (bootstrap, folds);
    an image without a patient becomes its own, named by its path."""
    return np.array([key if key is not None else f"{NO_PATIENT_PREFIX}{path}" for key, path in zip(patient_keys, paths)], dtype=object)


def check_fractions(fractions: Sequence[float]) -> None:
    """Reject fractions that are not three finite non-negative numbers summing to 1."""
    if len(fractions) != len(SPLITS):
        raise ValueError(f"need {len(SPLITS)} fractions for {SPLITS}, got {len(fractions)}")
    if not all(math.isfinite(value) and value >= 0 for value in fractions):
        raise ValueError(f"split fractions must be finite and non-negative, got {fractions}")
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions)})")


def _check_labels(labels: Sequence[int | None]) -> None:
    """Reject labels other than 0, 1 and None, which would otherwise form extra strata."""
    unexpected = {repr(label) for label in labels if label not in _LABEL_NAMES}
    if unexpected:
        raise ValueError(f"labels must be 0, 1 or None; got {sorted(unexpected)}")


def assign_with_holdout(
    patient_keys: Sequence[str | None],
    labels: Sequence[int | None],
    held_out: Sequence[bool],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> list[str]:
    """Hold whole cohorts out as the test split, then split the rest train/val.

    A random patient split of one archive flatters a model: train and test share scanners,
    sites and periods. Holding out whole acquisition cohorts (a site, a period, a batch of
    files) imitates the shift a deployed model meets. Every patient with a held-out image
    goes to test with all of its images; the others split train/val in the ratio of
    `fractions[0]:fractions[1]`.
    """
    check_fractions(fractions)
    if not len(patient_keys) == len(labels) == len(held_out):
        raise ValueError("patient_keys, labels and held_out must have one entry per image")
    groups = list(_patient_groups(patient_keys))
    test_groups = {group for group, out in zip(groups, held_out) if out}
    rest = [index for index, group in enumerate(groups) if group not in test_groups]
    train, val = fractions[0], fractions[1]
    if train + val <= 0:
        raise ValueError("a holdout split needs a non-zero train or val fraction")
    rest_splits = assign_splits(
        [patient_keys[index] for index in rest], [labels[index] for index in rest], (train / (train + val), val / (train + val), 0.0), seed
    )
    result = ["test"] * len(groups)
    for index, name in zip(rest, rest_splits):
        result[index] = name
    return result
