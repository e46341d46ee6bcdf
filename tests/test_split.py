"""Patient-level stratified split on constructed cohorts and on the real kermany-224."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from lungray.sources import describe
from lungray.split import SPLITS, assign_splits, split_summary

KERMANY_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany-224"


def splits_of_each_patient(patient_keys: list[str], splits: list[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for key, split in zip(patient_keys, splits):
        found[key].add(split)
    return found


def random_cohort(seed: int, patients: int) -> tuple[list[str], list[int | None]]:
    """Patients with 1-5 images each and mixed known/unknown labels."""
    rng = np.random.default_rng(seed)
    keys: list[str] = []
    labels: list[int | None] = []
    for patient in range(patients):
        label_choices = rng.choice([0, 1, -1], size=int(rng.integers(1, 6)), p=[0.5, 0.3, 0.2])
        for choice in label_choices:
            keys.append(f"p{patient}")
            labels.append(None if choice == -1 else int(choice))
    return keys, labels


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.7, 0.2, 0.2), "sum to 1"),
        ((0.5, 0.5), "need 3 fractions"),
        ((1.1, -0.1, 0.0), "non-negative"),
        ((math.nan, 0.5, 0.5), "finite"),
    ],
)
def test_rejects_bad_fractions(fractions: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_splits(["a", "b"], [0, 1], fractions)  # type: ignore[arg-type]


def test_rejects_mismatched_inputs_and_unknown_labels() -> None:
    with pytest.raises(ValueError, match="2 patient keys but 1 labels"):
        assign_splits(["a", "b"], [0])
    with pytest.raises(ValueError, match="0, 1 or None; got \\['2'\\]"):
        assign_splits(["a", "b"], [0, 2])


def test_accepts_fractions_that_round_to_one() -> None:
    splits = assign_splits(["a", "b", "c"], [0, 0, 1], (1 / 3, 1 / 3, 1 / 3 + 5e-7))
    assert set(splits) <= set(SPLITS)


def test_images_without_patient_are_split_individually() -> None:
    count = 100
    splits = assign_splits([None] * count, [0] * count, seed=3)
    for name, fraction in zip(SPLITS, (0.7, 0.15, 0.15)):
        assert abs(splits.count(name) - fraction * count) <= 1


@pytest.mark.parametrize(
    ("special_labels", "stratum"),
    [
        ([0, 1], "abnormal if any image is"),
        ([None, 1], "known labels only"),
        ([None, None], "unknown"),
    ],
)
def test_patient_stratum_is_max_known_label(
    special_labels: list[int | None], stratum: str
) -> None:
    """Two special and two all-normal patients of equal size, split in half: only correct
    stratification puts exactly one special patient in each half, whatever the seed."""
    keys = ["s1", "s1", "s2", "s2", "n1", "n1", "n2", "n2"]
    labels = special_labels * 2 + [0, 0, 0, 0]
    for seed in range(20):
        splits = assign_splits(keys, labels, (0.5, 0.5, 0.0), seed=seed)
        assert {splits[0], splits[2]} == {"train", "val"}, f"{stratum}, seed {seed}"
        assert {splits[4], splits[6]} == {"train", "val"}, f"{stratum}, seed {seed}"


def test_zero_fraction_split_stays_empty() -> None:
    keys, labels = random_cohort(seed=0, patients=200)
    splits = assign_splits(keys, labels, (0.8, 0.0, 0.2))
    assert "val" not in splits
    assert {"train", "test"} == set(splits)


def test_whole_patients_and_image_fractions_on_uneven_patients() -> None:
    keys, labels = random_cohort(seed=1, patients=600)
    fractions = (0.6, 0.25, 0.15)
    splits = assign_splits(keys, labels, fractions, seed=7)
    assert all(len(found) == 1 for found in splits_of_each_patient(keys, splits).values())
    # each of the three strata may miss each target by at most half a (5-image) patient
    tolerance = 3 * 5 / 2
    for name, fraction in zip(SPLITS, fractions):
        assert abs(splits.count(name) - fraction * len(keys)) <= tolerance


def test_seed_is_deterministic_and_matters() -> None:
    keys, labels = random_cohort(seed=2, patients=300)
    first = assign_splits(keys, labels, seed=11)
    assert assign_splits(keys, labels, seed=11) == first
    assert assign_splits(keys, labels, seed=12) != first


def test_split_summary_counts_images_patients_and_labels() -> None:
    splits = ["train", "train", "train", "test", "test"]
    labels = [0, 1, None, 1, 1]
    keys = ["a", "a", None, None, "b"]
    assert split_summary(splits, labels, keys) == {
        "train": {"images": 3, "patients": 2, "labels": {"normal": 1, "abnormal": 1, "unknown": 1}},
        "val": {"images": 0, "patients": 0, "labels": {"normal": 0, "abnormal": 0, "unknown": 0}},
        "test": {"images": 2, "patients": 2, "labels": {"normal": 0, "abnormal": 2, "unknown": 0}},
    }


def test_split_summary_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        split_summary(["holdout"], [0], ["a"])
    with pytest.raises(ValueError, match="one entry per image"):
        split_summary(["train"], [0, 1], ["a"])


def test_real_kermany_split_keeps_patients_whole_and_balanced() -> None:
    if not KERMANY_ROOT.is_dir():
        pytest.skip(f"real data not present at {KERMANY_ROOT}")
    listing = [path.relative_to(KERMANY_ROOT).as_posix() for path in KERMANY_ROOT.rglob("*.jpeg")]
    described = describe("kermany", listing)
    keys = [described[path].patient_id for path in listing]
    labels = [described[path].label for path in listing]
    assert len(listing) == 5216 and None not in keys and None not in labels

    splits = assign_splits(keys, labels, seed=0)
    patient_splits = splits_of_each_patient(keys, splits)  # type: ignore[arg-type]
    assert all(len(found) == 1 for found in patient_splits.values())

    overall_abnormal = sum(labels) / len(labels)  # type: ignore[arg-type]
    summary = split_summary(splits, labels, keys)
    for name, fraction in zip(SPLITS, (0.7, 0.15, 0.15)):
        images = summary[name]["images"]
        assert abs(images / len(listing) - fraction) <= 0.02, name
        abnormal = summary[name]["labels"]["abnormal"]  # type: ignore[index]
        assert abs(abnormal / images - overall_abnormal) <= 0.03, name
    assert sum(summary[name]["patients"] for name in SPLITS) == len(patient_splits)

    assert assign_splits(keys, labels, seed=0) == splits
    assert assign_splits(keys, labels, seed=1) != splits


def test_holdout_sends_whole_cohorts_and_their_patients_to_test() -> None:
    from lungray.split import assign_with_holdout

    patients = [f"p{i // 2}" for i in range(200)]  # two images per patient
    labels = [int(i % 3 == 0) for i in range(200)]
    held_out = [i in (10, 51) or i >= 180 for i in range(200)]  # one image of p5 and p25, and a cohort
    splits = assign_with_holdout(patients, labels, held_out, (0.7, 0.15, 0.15), seed=0)
    assert splits[10] == splits[11] == "test" and splits[50] == splits[51] == "test"
    assert all(split == "test" for split in splits[180:])
    rest = [split for index, split in enumerate(splits) if index not in (10, 11, 50, 51) and index < 180]
    assert set(rest) == {"train", "val"}
    assert abs(rest.count("train") / len(rest) - 0.7 / 0.85) < 0.05
    by_patient: dict[str, set[str]] = {}
    for patient, split in zip(patients, splits):
        by_patient.setdefault(patient, set()).add(split)
    assert all(len(names) == 1 for names in by_patient.values())
