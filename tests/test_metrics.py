"""Specification of lungray.metrics: each result checked against scikit-learn, brute force,
a slow textbook formula or a hand computation."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.special import expit, logit
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from lungray.metrics import (
    RATE_METRICS,
    abnormal_misses_allowed,
    binary_metrics,
    bootstrap_ci,
    calibration_curve_data,
    choose_threshold,
    delong_test,
    mcnemar,
    metrics_with_ci,
    paired_bootstrap_auroc,
    predict_labels,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)


def scored_cases(
    n: int, seed: int, separation: float = 1.0, decimals: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a model that separates the classes by `separation` logits."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    prob = expit(separation * (2 * y - 1) + rng.normal(size=n))
    return y, prob if decimals is None else np.round(prob, decimals)


def patient_cases(n_patients: int, images_per_patient: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images that share their patient's label and almost all of its score."""
    rng = np.random.default_rng(seed)
    patient_label = rng.integers(0, 2, size=n_patients)
    patient_logit = (2 * patient_label - 1) + rng.normal(size=n_patients)
    groups = np.repeat([f"patient-{i}" for i in range(n_patients)], images_per_patient)
    y = np.repeat(patient_label, images_per_patient)
    prob = expit(np.repeat(patient_logit, images_per_patient) + 0.05 * rng.normal(size=y.size))
    return y, prob, groups


# --- binary_metrics -------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.62, 0.9])
def test_binary_metrics_match_sklearn(threshold: float) -> None:
    y, prob = scored_cases(300, seed=1)
    pred = (prob >= threshold).astype(int)
    metrics = binary_metrics(y, prob, threshold)

    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert metrics["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
    assert metrics["recall"] == pytest.approx(recall_score(y, pred))
    assert metrics["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert metrics["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
    assert metrics["auroc"] == pytest.approx(roc_auc_score(y, prob))
    assert metrics["auprc"] == pytest.approx(average_precision_score(y, prob))
    assert metrics["threshold"] == threshold


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_confusion_matrix_is_consistent_with_counts_and_sklearn(threshold: float) -> None:
    y, prob = scored_cases(257, seed=2)
    metrics = binary_metrics(y, prob, threshold)
    tn, fp, fn, tp = confusion_matrix(y, prob >= threshold, labels=[0, 1]).ravel()

    assert metrics["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert (metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"]) == (tn, fp, fn, tp)
    assert metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"] == metrics["n"] == y.size
    assert metrics["recall"] == metrics["tp"] / (metrics["tp"] + metrics["fn"])
    assert metrics["specificity"] == metrics["tn"] / (metrics["tn"] + metrics["fp"])


def test_threshold_is_inclusive() -> None:
    assert predict_labels(np.array([0.49, 0.5, 0.51]), 0.5).tolist() == [0, 1, 1]
    assert binary_metrics([0, 1, 1], [0.49, 0.5, 0.51], 0.5)["tp"] == 2


def test_no_positive_calls_give_zero_precision_and_f1() -> None:
    metrics = binary_metrics([0, 1, 1, 0], [0.1, 0.4, 0.3, 0.2], threshold=0.9)
    assert (metrics["precision"], metrics["f1"], metrics["recall"], metrics["specificity"]) == (0.0, 0.0, 0.0, 1.0)


def test_absent_class_makes_class_rates_and_ranking_metrics_nan() -> None:
    only_negatives = binary_metrics([0, 0, 0], [0.2, 0.7, 0.4], threshold=0.5)
    assert math.isnan(only_negatives["auroc"]) and math.isnan(only_negatives["auprc"])
    assert math.isnan(only_negatives["recall"])
    assert only_negatives["specificity"] == pytest.approx(2 / 3)

    only_positives = binary_metrics([1, 1], [0.2, 0.7], threshold=0.5)
    assert math.isnan(only_positives["auroc"]) and math.isnan(only_positives["specificity"])
    assert only_positives["recall"] == 0.5


@pytest.mark.parametrize(
    ("y_true", "prob"),
    [([0, 1, 2], [0.1, 0.2, 0.3]), ([0, 1], [0.1, 0.2, 0.3]), ([0, 1], [0.1, math.nan]), ([], [])],
)
def test_invalid_inputs_are_rejected(y_true: list, prob: list) -> None:
    with pytest.raises(ValueError):
        binary_metrics(y_true, prob, threshold=0.5)


# --- operating points -----------------------------------------------------------------


def brute_force_operating_point(
    y: np.ndarray, prob: np.ndarray, floor_on: str, floor: float
) -> tuple[float, float, float]:
    """Every candidate threshold (each distinct prob, and 'call nothing') scored from sklearn's counts."""
    candidates = []
    for threshold in [*np.unique(prob), math.inf]:
        tn, fp, fn, tp = confusion_matrix(y, prob >= threshold, labels=[0, 1]).ravel()
        sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
        floored, maximised = (sensitivity, specificity) if floor_on == "sensitivity" else (specificity, sensitivity)
        if floored >= floor:
            candidates.append(((maximised, floored), threshold, sensitivity, specificity))
    _, threshold, sensitivity, specificity = max(candidates)
    return threshold, sensitivity, specificity


def conformal_misses(n_abnormal: int, target: float) -> int:
    """The largest m with (m + 1) / (n + 1) <= 1 - target, in exact fractions: the misses the
    split-conformal bound allows (a new case below the (m+1)-th lowest of n scores: (m + 1) / (n + 1))."""
    allowed = -1
    while Fraction(allowed + 2, n_abnormal + 1) <= 1 - Fraction(str(target)):
        allowed += 1
    return max(allowed, 0)


@pytest.mark.parametrize("target", [0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("n_abnormal", [1, 9, 19, 20, 59, 117, 146, 581])
def test_misses_allowed_are_the_split_conformal_order_statistic(n_abnormal: int, target: float) -> None:
    assert abnormal_misses_allowed(n_abnormal, target) == conformal_misses(n_abnormal, target)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_choose_threshold_is_the_most_specific_threshold_that_keeps_the_abnormal_cases_needed(seed: int, target: float) -> None:
    y, prob = scored_cases(200, seed=seed, decimals=2)  # rounding creates tied probabilities
    n_abnormal = int(y.sum())
    floor = (n_abnormal - conformal_misses(n_abnormal, target)) / n_abnormal
    threshold = choose_threshold(y, prob, min_sensitivity=target)
    expected_threshold, _, expected_specificity = brute_force_operating_point(y, prob, "sensitivity", floor)

    metrics = binary_metrics(y, prob, threshold)
    assert metrics["recall"] >= floor >= target
    assert metrics["specificity"] == pytest.approx(expected_specificity)
    assert specificity_at_sensitivity(y, prob, floor) == metrics["specificity"]
    # The same normal cases are called abnormal as at the brute-force threshold.
    assert np.array_equal(predict_labels(prob, threshold)[y == 0], predict_labels(prob, expected_threshold)[y == 0])


@pytest.mark.parametrize("n_abnormal", [40, 117])
def test_choose_threshold_keeps_the_target_sensitivity_on_new_cases(n_abnormal: int) -> None:
    """The promise the rule makes, checked by simulation: abnormal logits ~ N(1, 1), so a
    threshold t misses a new abnormal case with probability Phi(logit(t) - 1). Averaged over
    many validation samples that miss rate stays <= 1 - target for choose_threshold, while
    the threshold that only just keeps the target on its own sample (its k-th highest
    abnormal score, k = ceil(target * n)) misses more: the optimism the rule corrects."""
    rng = np.random.default_rng(0)
    target, n_normal, repeats = 0.95, 60, 3000
    y = np.repeat([0, 1], [n_normal, n_abnormal])
    rule_miss, in_sample_miss = [], []
    for _ in range(repeats):
        abnormal = rng.normal(1.0, 1.0, n_abnormal)
        prob = expit(np.concatenate([rng.normal(-1.0, 1.0, n_normal), abnormal]))
        rule_miss.append(norm.cdf(logit(choose_threshold(y, prob, target)) - 1.0))
        kth_highest = np.sort(abnormal)[::-1][math.ceil(target * n_abnormal) - 1]
        in_sample_miss.append(norm.cdf(kth_highest - 1.0))
    standard_error = np.std(rule_miss) / math.sqrt(repeats)
    assert np.mean(rule_miss) <= (1 - target) + 3 * standard_error
    assert np.mean(in_sample_miss) > (1 - target) + 3 * np.std(in_sample_miss) / math.sqrt(repeats)


def test_choose_threshold_takes_the_log_odds_midpoint_of_the_equally_specific_thresholds() -> None:
    # Of 3 abnormal cases a target of 0.25 may miss 2 (3 / 4 <= 0.75): from just above the
    # normal at 0.6 up to 0.9 every threshold keeps specificity 1 and one abnormal case; the
    # midpoint of 0.6 and 0.9 in log-odds is returned.
    y = np.array([1, 1, 0, 1, 0])
    prob = np.array([0.9, 0.7, 0.6, 0.5, 0.1])
    assert choose_threshold(y, prob, min_sensitivity=0.25) == pytest.approx(expit((logit(0.6) + logit(0.9)) / 2))
    # A target of 0.3 may miss only 1 (2 / 4 <= 0.7 < 3 / 4): between 0.6 and the abnormal at 0.7.
    assert choose_threshold(y, prob, min_sensitivity=0.3) == pytest.approx(expit((logit(0.6) + logit(0.7)) / 2))
    # All abnormal cases needed: between the normal at 0.1 and the abnormal at 0.5.
    threshold = choose_threshold(y, prob, min_sensitivity=1.0)
    assert threshold == pytest.approx(expit((logit(0.1) + logit(0.5)) / 2))
    assert binary_metrics(y, prob, threshold)["recall"] == 1.0


def test_choose_threshold_margin_survives_a_small_shift_of_the_normals() -> None:
    """Where the old lower-edge rule sat right on the top normal's score, a small upward shift of
    the normals (a new site) turned them into false alarms; the midpoint keeps them normal."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 500)
    # One abnormal case scores just above the normals: the lower edge of the interval is 0.31.
    prob = np.concatenate([rng.uniform(0.0, 0.3, 500), [0.31], rng.uniform(0.7, 1.0, 499)])
    threshold = choose_threshold(y, prob, 0.95)
    shifted = np.where(y == 0, prob + 0.1, prob)
    assert binary_metrics(y, shifted, 0.31)["specificity"] < 0.9  # what the lower edge would have done
    assert binary_metrics(y, shifted, threshold)["specificity"] == 1.0
    assert binary_metrics(y, prob, threshold)["recall"] >= 0.95


def test_choose_threshold_with_saturated_scores_stays_in_the_interval() -> None:
    y = np.array([0, 0, 1, 1])
    prob = np.array([0.0, 1.0, 1.0, 1.0])
    threshold = choose_threshold(y, prob, 1.0)
    assert binary_metrics(y, prob, threshold)["recall"] == 1.0 and binary_metrics(y, prob, threshold)["specificity"] == 0.5


@pytest.mark.parametrize("target", [0.0, 0.5, 0.8, 0.95, 1.0])
def test_sensitivity_at_specificity_matches_brute_force(target: float) -> None:
    y, prob = scored_cases(150, seed=5, decimals=2)
    _, expected_sensitivity, _ = brute_force_operating_point(y, prob, "specificity", target)
    assert sensitivity_at_specificity(y, prob, target) == pytest.approx(expected_sensitivity)


def test_sensitivity_at_full_specificity_is_zero_when_the_top_score_is_a_negative() -> None:
    assert sensitivity_at_specificity([0, 1, 1, 0], [0.9, 0.8, 0.7, 0.1], specificity=1.0) == 0.0


def test_operating_points_reject_impossible_requests() -> None:
    with pytest.raises(ValueError):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError):
        choose_threshold([0, 1], [0.2, 0.9], min_sensitivity=0.0)
    with pytest.raises(ValueError):
        sensitivity_at_specificity([0, 1], [0.2, 0.9], specificity=1.5)


# --- bootstrap ------------------------------------------------------------------------


def ci_width(interval: tuple[float, float, float]) -> float:
    return interval[2] - interval[1]


def test_bootstrap_ci_contains_the_point_and_shrinks_with_more_data() -> None:
    small = bootstrap_ci(*scored_cases(100, seed=6), roc_auc_score, n_boot=200)
    large = bootstrap_ci(*scored_cases(2000, seed=6), roc_auc_score, n_boot=200)
    for point, low, high in (small, large):
        assert low < point < high
    assert ci_width(large) < 0.5 * ci_width(small)


def test_cluster_bootstrap_is_wider_when_a_patients_images_are_correlated() -> None:
    y, prob, groups = patient_cases(n_patients=60, images_per_patient=10, seed=7)
    by_image = bootstrap_ci(y, prob, roc_auc_score, n_boot=200)
    by_patient = bootstrap_ci(y, prob, roc_auc_score, groups=groups, n_boot=200)

    assert by_patient[0] == by_image[0]
    assert by_patient[1] < by_patient[0] < by_patient[2]
    assert ci_width(by_patient) > 2 * ci_width(by_image)


def test_cluster_bootstrap_with_one_image_per_patient_is_the_image_bootstrap() -> None:
    y, prob = scored_cases(400, seed=8)
    by_image = bootstrap_ci(y, prob, roc_auc_score, n_boot=200)
    by_patient = bootstrap_ci(y, prob, roc_auc_score, groups=np.arange(y.size), n_boot=200)
    assert by_patient == by_image


def test_bootstrap_is_reproducible_from_its_seed() -> None:
    y, prob = scored_cases(200, seed=9)
    first, again, other_seed = (bootstrap_ci(y, prob, roc_auc_score, n_boot=100, seed=seed) for seed in (1, 1, 2))
    assert first == again
    assert first != other_seed


def test_single_class_resamples_are_skipped_and_counted() -> None:
    seen_classes = []

    def auroc_recording_classes(y: np.ndarray, prob: np.ndarray) -> float:
        seen_classes.append(np.unique(y).size)
        return roc_auc_score(y, prob)

    # One positive among four: about (3/4)^4 = 32% of resamples miss it.
    with pytest.warns(RuntimeWarning, match=r"skipped \d+ of 200"):
        point, low, high = bootstrap_ci([0, 0, 1, 0], [0.1, 0.4, 0.8, 0.3], auroc_recording_classes, n_boot=200)
    assert set(seen_classes) == {2}
    assert 200 - 50 > len(seen_classes) - 1 > 200 - 100
    assert (point, low, high) == (1.0, 1.0, 1.0)


def test_metrics_with_ci_reports_every_rate_with_an_interval_around_it() -> None:
    y, prob, groups = patient_cases(n_patients=80, images_per_patient=3, seed=10)
    estimates = metrics_with_ci(y, prob, threshold=0.5, groups=groups, n_boot=200)
    point = binary_metrics(y, prob, 0.5)

    assert list(estimates) == list(RATE_METRICS)
    for name, estimate in estimates.items():
        assert estimate["value"] == point[name]
        assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"]
        assert estimate["ci_low"] < estimate["ci_high"]
        assert estimate["n_skipped"] == 0
    # Same seed, same resamples: the AUROC interval is bootstrap_ci's.
    assert bootstrap_ci(y, prob, roc_auc_score, groups=groups, n_boot=200) == pytest.approx(
        tuple(estimates["auroc"][key] for key in ("value", "ci_low", "ci_high"))
    )


def test_metrics_with_ci_keeps_the_resamples_of_one_class_where_a_rate_is_defined() -> None:
    """A source of normals only (a per-source row of the report) has a specificity and its CI:
    the ordinary percentile bootstrap over every resample is the oracle. Before, every
    resample lacking a class was skipped for every rate, and the CI was NaN."""
    prob = np.random.default_rng(0).random(50) * 0.6
    y = np.zeros(50, dtype=int)
    estimates = metrics_with_ci(y, prob, threshold=0.5, n_boot=1000)
    draws = np.random.default_rng(0)
    oracle = [np.mean(prob[indices] < 0.5) for indices in (draws.integers(0, 50, 50) for _ in range(1000))]
    for name in ("specificity", "accuracy"):
        assert (estimates[name]["ci_low"], estimates[name]["ci_high"]) == pytest.approx(tuple(np.quantile(oracle, [0.025, 0.975])))
        assert estimates[name]["n_skipped"] == 0
    assert math.isnan(estimates["recall"]["ci_low"]) and estimates["recall"]["n_skipped"] == 1000  # no abnormal image in any
    assert estimates["auroc"]["n_skipped"] == 1000


# --- McNemar --------------------------------------------------------------------------


def discordant_cases(b: int, c: int, concordant: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cases where A alone is right b times, B alone c times, and both agree otherwise."""
    y = np.ones(b + c + concordant, dtype=int)
    pred_a = np.concatenate([np.ones(b), np.zeros(c), np.ones(concordant // 2), np.zeros(concordant - concordant // 2)])
    pred_b = np.concatenate([np.zeros(b), np.ones(c), np.ones(concordant // 2), np.zeros(concordant - concordant // 2)])
    return y, pred_a.astype(int), pred_b.astype(int)


def test_mcnemar_exact_one_sided_disagreement() -> None:
    result = mcnemar(*discordant_cases(b=10, c=0))
    assert (result["b"], result["c"], result["method"]) == (10, 0, "exact")
    assert result["p_value"] == pytest.approx(2 * 0.5**10)


def test_mcnemar_counts_are_oriented_from_model_a() -> None:
    y = np.array([1, 1, 1, 0])
    pred_a = np.array([1, 1, 0, 0])  # right, right, wrong, right
    pred_b = np.array([0, 0, 1, 0])  # wrong, wrong, right, right
    result = mcnemar(y, pred_a, pred_b)
    assert (result["b"], result["c"]) == (2, 1)


def test_mcnemar_chi_square_matches_hand_computation() -> None:
    result = mcnemar(*discordant_cases(b=40, c=20))
    statistic = (abs(40 - 20) - 1) ** 2 / (40 + 20)
    assert result["method"] == "chi2"
    assert result["statistic"] == pytest.approx(statistic)
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(statistic / 2)))  # chi2(1) tail


def test_mcnemar_balanced_disagreement_is_no_evidence() -> None:
    result = mcnemar(*discordant_cases(b=200, c=200))
    assert result["statistic"] == 0.0
    assert result["p_value"] == pytest.approx(1.0)


def test_mcnemar_is_exact_below_25_discordant_pairs() -> None:
    assert mcnemar(*discordant_cases(b=14, c=10))["method"] == "exact"
    assert mcnemar(*discordant_cases(b=15, c=10))["method"] == "chi2"


def test_mcnemar_method_can_be_forced_and_handles_no_discordance() -> None:
    assert mcnemar(*discordant_cases(b=30, c=10), exact=True)["method"] == "exact"
    assert mcnemar(*discordant_cases(b=3, c=1), exact=False)["method"] == "chi2"
    assert mcnemar(*discordant_cases(b=0, c=0))["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar([0, 1], [0.2, 0.9], [0, 1])


# --- DeLong and paired bootstrap ------------------------------------------------------


def slow_delong(y: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray) -> tuple[float, float, float]:
    """DeLong et al. 1988 by its O(n^2) definition: (difference, se, two-sided p)."""
    positives, negatives = y == 1, y == 0
    per_positive, per_negative, aurocs = [], [], []
    for prob in (prob_a, prob_b):
        x, z = prob[positives][:, None], prob[negatives][None, :]
        kernel = (x > z) + 0.5 * (x == z)
        per_positive.append(kernel.mean(axis=1))
        per_negative.append(kernel.mean(axis=0))
        aurocs.append(kernel.mean())
    covariance = np.cov(per_positive) / positives.sum() + np.cov(per_negative) / negatives.sum()
    se = math.sqrt(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = aurocs[0] - aurocs[1]
    return difference, se, math.erfc(abs(difference / se) / math.sqrt(2))


def two_models(n: int, seed: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stronger and a weaker model scoring the same cases, with correlated errors."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    shared = rng.normal(size=n)
    prob_a = expit(1.5 * (2 * y - 1) + shared + 0.5 * rng.normal(size=n))
    prob_b = expit(0.8 * (2 * y - 1) + shared + 0.5 * rng.normal(size=n))
    if decimals is not None:
        prob_a, prob_b = np.round(prob_a, decimals), np.round(prob_b, decimals)
    return y, prob_a, prob_b


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many ties, midranks matter
def test_delong_matches_the_slow_definition_and_sklearn(decimals: int | None) -> None:
    y, prob_a, prob_b = two_models(300, seed=11, decimals=decimals)
    result = delong_test(y, prob_a, prob_b)
    difference, se, p_value = slow_delong(y, prob_a, prob_b)

    assert result["auroc_a"] == pytest.approx(roc_auc_score(y, prob_a), abs=1e-12)
    assert result["auroc_b"] == pytest.approx(roc_auc_score(y, prob_b), abs=1e-12)
    assert result["difference"] == pytest.approx(difference, abs=1e-12)
    assert result["se"] == pytest.approx(se, rel=1e-9)
    assert result["p_value"] == pytest.approx(p_value, rel=1e-6)
    assert result["ci_low"] < result["difference"] < result["ci_high"]


def test_delong_identical_models_do_not_differ() -> None:
    y, prob, _ = two_models(200, seed=12)
    result = delong_test(y, prob, prob)
    assert (result["difference"], result["se"], result["z"], result["p_value"]) == (0.0, 0.0, 0.0, 1.0)


def test_delong_very_different_models_differ() -> None:
    y, _, _ = two_models(400, seed=13)
    informative = expit(3 * (2 * y - 1) + np.random.default_rng(0).normal(size=y.size))
    noise = np.random.default_rng(1).random(y.size)
    result = delong_test(y, informative, noise)
    assert result["difference"] > 0.3
    assert result["p_value"] < 1e-10


def test_delong_without_variance_says_nothing_rather_than_p_0() -> None:
    """A constant model against a perfect one on four images: every structural component is
    equal, se is 0, and a p of 0 (z infinite) would read as certainty."""
    result = delong_test([0, 0, 1, 1], [0.5] * 4, [0.1, 0.2, 0.8, 0.9])
    assert (result["difference"], result["se"]) == (-0.5, 0.0)
    assert all(math.isnan(result[key]) for key in ("z", "p_value", "ci_low", "ci_high"))


def test_delong_needs_two_cases_of_each_class() -> None:
    with pytest.raises(ValueError):
        delong_test([0, 0, 1], [0.1, 0.2, 0.9], [0.3, 0.2, 0.8])


def test_paired_bootstrap_agrees_with_delong() -> None:
    y, prob_a, prob_b = two_models(400, seed=14)
    bootstrap = paired_bootstrap_auroc(y, prob_a, prob_b, n_boot=500)
    delong = delong_test(y, prob_a, prob_b)

    assert bootstrap["difference"] == pytest.approx(delong["difference"])
    assert bootstrap["ci_low"] < bootstrap["difference"] < bootstrap["ci_high"]
    assert bootstrap["ci_low"] > 0  # the stronger model wins, as DeLong also finds
    assert delong["p_value"] < 0.05 and bootstrap["p_value"] < 0.05
    # Both estimate the same sampling spread of the difference.
    bootstrap_se = (bootstrap["ci_high"] - bootstrap["ci_low"]) / (2 * 1.96)
    assert bootstrap_se == pytest.approx(delong["se"], rel=0.25)


def test_paired_bootstrap_identical_models_and_patient_groups() -> None:
    y, prob, groups = patient_cases(n_patients=50, images_per_patient=4, seed=15)
    same = paired_bootstrap_auroc(y, prob, prob, groups=groups, n_boot=200)
    assert (same["difference"], same["ci_low"], same["ci_high"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)

    noise = np.random.default_rng(2).random(y.size)
    different = paired_bootstrap_auroc(y, prob, noise, groups=groups, n_boot=200)
    assert different["ci_low"] > 0
    assert different["p_value"] == pytest.approx(2 / 201)  # the smallest p 200 resamples can give


def exact_auroc(labels: np.ndarray, scores: np.ndarray) -> Fraction:
    """Pairs ranked right over all pairs, ties half, in exact fractions (the definition)."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    right = sum(Fraction(int(p > n) * 2 + int(p == n), 2) for p in positives for n in negatives)
    return right / (len(positives) * len(negatives))


def test_paired_bootstrap_counts_resamples_where_the_aurocs_tie_on_both_sides() -> None:
    """Scores of 3 decimals whose AUROCs are exactly equal on the data and on many resamples:
    in floats the difference came out as -5.6e-17 and such ties counted on one side only
    (p too small; a CI bound of -1e-16 printed as -0.000). The oracle is the exact difference
    of each resample (fractions), on the same resamples (seed 0)."""
    y = np.array([0, 0, 0, 1, 0, 1, 0])
    a = np.array([0.841, 0.487, 0.476, 0.258, 0.156, 0.712, 0.844])
    b = np.array([0.678, 0.369, 0.576, 0.563, 0.937, 0.388, 0.165])
    assert exact_auroc(y, a) == exact_auroc(y, b) and roc_auc_score(y, a) - roc_auc_score(y, b) != 0.0  # the float trap
    result = paired_bootstrap_auroc(y, a, b, n_boot=400, seed=0)
    assert result["difference"] == 0.0

    draws = np.random.default_rng(0)
    exact = []
    for indices in (draws.integers(0, y.size, y.size) for _ in range(400)):
        if 0 < y[indices].sum() < y.size:
            exact.append(exact_auroc(y[indices], a[indices]) - exact_auroc(y[indices], b[indices]))
    ties = sum(difference == 0 for difference in exact)
    assert ties > 50  # the case is one of ties
    extreme = min(sum(difference <= 0 for difference in exact), sum(difference >= 0 for difference in exact))
    assert result["p_value"] == pytest.approx(min(1.0, 2 * (extreme + 1) / (len(exact) + 1)))
    assert result["n_skipped"] == 400 - len(exact)
    assert {result["ci_low"], result["ci_high"]} <= {float(difference) for difference in exact}  # no rounding residue


def test_paired_bootstrap_interval_excludes_0_exactly_when_p_is_below_alpha() -> None:
    """The report says "the interval excludes 0" beside the p-value: they must not disagree
    (interpolated quantiles and the +1 correction gave CI +0.005 to +0.336 with p = 0.060)."""
    checked = excluded = 0
    for seed in range(150):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, int(rng.integers(15, 40)))
        if y.min() == y.max():
            continue
        a = np.round(rng.random(y.size) + 0.4 * y * rng.random(), 2)
        b = np.round(rng.random(y.size) + 0.1 * y * rng.random(), 2)
        result = paired_bootstrap_auroc(y, a, b, n_boot=200, seed=seed)
        if result["n_skipped"]:
            continue
        checked += 1
        excludes = result["ci_low"] > 0 or result["ci_high"] < 0
        excluded += excludes
        assert excludes == (result["p_value"] < 0.05), result
    assert checked > 100 and 10 < excluded < checked - 10


# --- calibration ----------------------------------------------------------------------
# --- calibration ----------------------------------------------------------------------


def test_calibration_bins_match_sklearn() -> None:
    y, prob = scored_cases(500, seed=16)
    data = calibration_curve_data(y, prob, n_bins=8)
    fraction_positive, mean_predicted = calibration_curve(y, prob, n_bins=8)

    assert data["fraction_positive"] == pytest.approx(fraction_positive.tolist())
    assert data["mean_predicted"] == pytest.approx(mean_predicted.tolist())
    assert sum(data["count"]) == y.size
    assert data["brier"] == pytest.approx(brier_score_loss(y, prob))


def test_calibration_error_by_hand() -> None:
    # Bins [0, 0.1] and (0.9, 1] (0.1 belongs to the first: upper edges are inclusive).
    data = calibration_curve_data([0, 1, 0, 1], [0.05, 0.1, 0.06, 0.95], n_bins=10)
    assert data["bin_low"] == pytest.approx([0.0, 0.9])
    assert data["count"] == [3, 1]
    assert data["mean_predicted"] == pytest.approx([0.07, 0.95])
    assert data["fraction_positive"] == pytest.approx([1 / 3, 1.0])
    assert data["ece"] == pytest.approx(3 / 4 * abs(1 / 3 - 0.07) + 1 / 4 * abs(1.0 - 0.95))
    assert data["brier"] == pytest.approx((0.05**2 + 0.9**2 + 0.06**2 + 0.05**2) / 4)


def test_calibrated_probabilities_have_smaller_error_than_distorted_ones() -> None:
    rng = np.random.default_rng(17)
    prob = rng.random(5000)
    y = (rng.random(5000) < prob).astype(int)  # prob is the true frequency
    calibrated = calibration_curve_data(y, prob)["ece"]
    distorted = calibration_curve_data(y, prob**3)["ece"]
    assert calibrated < 0.03 < 0.15 < distorted


def test_calibration_rejects_scores_outside_unit_interval() -> None:
    with pytest.raises(ValueError):
        calibration_curve_data([0, 1], [-0.1, 0.9])
