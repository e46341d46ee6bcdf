"""The one place where screening performance is measured.

Training (validation AUROC), tuning (the objective), evaluation and the CNN vs CNN-LSTM
comparison report all import from here, so one number cannot be computed two ways.

Conventions shared by every function:

- `y_true` holds 0 (normal) / 1 (abnormal); `prob` is a model's probability of 1.
- A case is called abnormal when ``prob >= threshold`` (`predict_labels`).
- A rate whose denominator is a class of `y_true` (recall = sensitivity, specificity) and
  the ranking metrics (AUROC, AUPRC) are NaN when a class they need is absent, never 0
  and never an exception: a small split or a bootstrap resample may lack a class, and NaN
  keeps the value a float that callers and the bootstrap can test with `math.isfinite`.
  Precision and F1, whose denominators depend on the predictions, follow scikit-learn's
  ``zero_division=0``: 0 when the model calls no case abnormal.
- Confidence intervals are percentile bootstrap intervals. Given `groups` (patient keys),
  whole patients are resampled (cluster bootstrap): a patient's images are correlated,
  and resampling images one by one would make the intervals too narrow.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, TypedDict

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import expit, logit
from scipy.stats import binomtest, chi2, norm, rankdata
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve

#: The threshold-dependent and ranking rates of `binary_metrics`, the ones that get CIs.
RATE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "auroc", "auprc")

#: How `choose_threshold` picks the operating point, as recorded in model.json.
THRESHOLD_RULE = (
    "highest specificity keeping sensitivity >= min_sensitivity on new cases in expectation (of n abnormal cases at most "
    "floor((1 - min_sensitivity)(n + 1)) - 1 missed: the split-conformal order statistic); log-odds midpoint of the "
    "equally specific thresholds"
)

#: McNemar switches from the exact binomial test to chi-square at this many discordant pairs.
MCNEMAR_EXACT_BELOW = 25


class IntervalEstimate(TypedDict):
    """A metric on the full data with its bootstrap CI and the resamples it could not use."""

    value: float
    ci_low: float
    ci_high: float
    n_skipped: int


def predict_labels(prob: ArrayLike, threshold: float) -> np.ndarray:
    """0/1 calls at `threshold`; the one place that fixes the ``>=`` convention."""
    return (np.asarray(prob) >= threshold).astype(np.int64)


def binary_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float) -> dict[str, float | int | list[list[int]]]:
    """Every screening metric at one operating point, as plain JSON-ready Python values.

    Keys: n, threshold, tp, fp, tn, fn, confusion_matrix ``[[tn, fp], [fn, tp]]``
    (scikit-learn's layout), accuracy, precision, recall (= sensitivity), specificity, f1,
    auroc, auprc. The rates come from one set of counts so that they cannot disagree with
    the confusion matrix, and so that the bootstrap, which calls this once per resample,
    stays fast; the tests check each of them against scikit-learn. auroc and auprc are NaN
    when either class is absent, recall when there are no positives, specificity when
    there are no negatives (see the module docstring).
    """
    y, (p,) = _validated(y_true, prob)
    tn, fp, fn, tp = (int(count) for count in np.bincount(2 * y + predict_labels(p, threshold), minlength=4))
    both_classes = tp + fn > 0 and tn + fp > 0
    return {
        "n": int(y.size),
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "accuracy": (tp + tn) / y.size,
        "precision": _ratio(tp, tp + fp, undefined=0.0),
        "recall": _ratio(tp, tp + fn, undefined=math.nan),
        "specificity": _ratio(tn, tn + fp, undefined=math.nan),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, undefined=0.0),
        "auroc": float(roc_auc_score(y, p)) if both_classes else math.nan,
        "auprc": float(average_precision_score(y, p)) if both_classes else math.nan,
    }


def abnormal_misses_allowed(n_abnormal: int, min_sensitivity: float) -> int:
    """How many of `n_abnormal` chosen-on cases a threshold may miss and still keep `min_sensitivity` on new cases.

    Not ``n - ceil(min_sensitivity * n)``: a threshold that just keeps the target on the
    cases that chose it keeps less on new ones (its sensitivity there is the target minus
    the optimism of having been chosen). If the threshold sits on the k-th lowest abnormal
    score, a new abnormal case, exchangeable with them, scores below it with probability at
    most k / (n + 1) (its rank among the n + 1 is uniform): the split-conformal bound. So
    k = floor((1 - target)(n + 1)) keeps the expected sensitivity on new cases >= target,
    and the k - 1 cases below the threshold are those it may miss: none below
    2 / (1 - target) - 1 cases (39 for 0.95). Below 1 / (1 - target) - 1 (19) even missing none
    cannot promise the target, which `calibrate`'s sample-size warning says (from 59 down).
    """
    _check_rate("min_sensitivity", min_sensitivity, allow_zero=False)
    order_statistic = math.floor((1.0 - min_sensitivity) * (n_abnormal + 1) + 1e-9)  # the tolerance absorbs 0.1 * 10 = 0.999...
    return max(order_statistic - 1, 0)


def choose_threshold(y_true: ArrayLike, prob: ArrayLike, min_sensitivity: float = 0.95) -> float:
    """The screening operating point: the most specific threshold that keeps sensitivity on new
    cases, placed with the widest margin on both sides.

    `prob` are probabilities. Of the thresholds that miss at most
    `abnormal_misses_allowed` of the abnormal cases (so that sensitivity >= `min_sensitivity`
    is expected on new cases, not only on these), those with the highest specificity call the
    same normal cases abnormal, and they form an interval: from just above the highest normal
    score called normal up to the highest threshold that still keeps the abnormal cases needed
    (the score of the k-th highest abnormal case). The threshold returned is that interval's
    midpoint in log-odds.

    Why not an edge: either edge sits on one validation case's score. On a new site's
    films the scores move a little (the normals of another acquisition tend to score
    higher), and a threshold at the lower edge then lets those normals through as
    abnormal, at the upper edge it drops abnormal cases under the sensitivity floor. The
    midpoint gives both the same margin, in log-odds, the scale on which a model's
    logits shift. The expected sensitivity holds for new cases like those that chose the
    threshold (the same site), not across sites: report the sensitivity it reaches on a test
    set, and choose it again on a site's sample (`lungray calibrate`).
    """
    _check_rate("min_sensitivity", min_sensitivity, allow_zero=False)
    y, (p,) = _validated(y_true, prob)
    _require_both_classes(y)
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("choose_threshold takes probabilities in [0, 1]")
    positives = np.sort(p[y == 1])[::-1]
    needed = positives.size - abnormal_misses_allowed(positives.size, min_sensitivity)
    lowest, _, _ = _best_operating_point(y, p, floor_on="sensitivity", floor=needed / positives.size)
    highest = float(positives[needed - 1])
    normals_below = p[(y == 0) & (p < lowest)]
    if normals_below.size == 0:  # every normal is called abnormal anyway: keep every abnormal case
        return lowest
    normal_top = float(normals_below.max())
    eps = 1e-12
    midpoint = float(expit((logit(max(normal_top, eps)) + logit(min(highest, 1.0 - eps))) / 2.0))
    # Scores saturated at 0 or 1 can push the midpoint out of the interval: the upper edge is then safe.
    return midpoint if normal_top < midpoint <= highest else highest


def specificity_at_sensitivity(y_true: ArrayLike, prob: ArrayLike, sensitivity: float) -> float:
    """Highest specificity reached while sensitivity >= `sensitivity` (empirical, no interpolation)."""
    _check_rate("sensitivity", sensitivity, allow_zero=False)
    return _best_operating_point(y_true, prob, floor_on="sensitivity", floor=sensitivity)[2]


def sensitivity_at_specificity(y_true: ArrayLike, prob: ArrayLike, specificity: float) -> float:
    """Highest sensitivity reached while specificity >= `specificity` (empirical, no interpolation).

    At ``specificity=1`` this may be 0: calling no case abnormal is an attainable point.
    """
    _check_rate("specificity", specificity, allow_zero=True)
    return _best_operating_point(y_true, prob, floor_on="specificity", floor=specificity)[1]


def bootstrap_ci(
    y_true: ArrayLike,
    prob: ArrayLike,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, low, high): `metric_fn` on the full data and its percentile bootstrap CI.

    With `groups`, patients are drawn with replacement and bring all their images. A
    resample holding one class only, or on which `metric_fn` is not finite, is skipped; a
    RuntimeWarning gives the count, because many skips bias the interval. low and high are
    NaN when every resample was skipped.
    """
    _check_alpha(alpha)
    y, (p,) = _validated(y_true, prob)
    point, replicates = _bootstrap(y, (p,), lambda yy, pp: (metric_fn(yy, pp),), groups, n_boot, seed)
    low, high, n_skipped = _percentile_interval(replicates[:, 0], alpha)
    if n_skipped:
        warnings.warn(
            f"bootstrap_ci skipped {n_skipped} of {n_boot} resamples (one class or undefined metric)",
            RuntimeWarning,
            stacklevel=2,
        )
    return float(point[0]), low, high


def metrics_with_ci(
    y_true: ArrayLike,
    prob: ArrayLike,
    threshold: float,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, IntervalEstimate]:
    """Each of `RATE_METRICS` at `threshold` with its bootstrap CI (see `bootstrap_ci`).

    All metrics share the same resamples (the same as `bootstrap_ci` with the same seed),
    each skipping those where it is undefined. The counts (tp, fp, ...) are left out: they
    scale with the sample size and are reported, without CI, by `binary_metrics`.
    """
    _check_alpha(alpha)
    y, (p,) = _validated(y_true, prob)

    def rates(labels: np.ndarray, probabilities: np.ndarray) -> list[float]:
        metrics = binary_metrics(labels, probabilities, threshold)
        return [metrics[name] for name in RATE_METRICS]

    # A resample of one class still has an accuracy and one of sensitivity / specificity: only
    # the metrics it leaves undefined (NaN) skip it.
    point, replicates = _bootstrap(y, (p,), rates, groups, n_boot, seed, one_class_resamples=True)
    estimates: dict[str, IntervalEstimate] = {}
    for column, name in enumerate(RATE_METRICS):
        low, high, n_skipped = _percentile_interval(replicates[:, column], alpha)
        estimates[name] = {"value": float(point[column]), "ci_low": low, "ci_high": high, "n_skipped": n_skipped}
    return estimates


def mcnemar(
    y_true: ArrayLike, pred_a: ArrayLike, pred_b: ArrayLike, exact: bool | None = None
) -> dict[str, float | int | str]:
    """McNemar's test: do two classifiers' error rates differ on the same cases?

    b counts cases A gets right and B wrong, c the reverse; only these discordant pairs
    carry information. ``exact=None`` uses the exact two-sided binomial test when
    b + c < `MCNEMAR_EXACT_BELOW` (statistic: min(b, c)) and otherwise chi-square with
    one degree of freedom and Yates' continuity correction, (max(|b - c| - 1, 0))^2 / (b + c);
    the correction is floored at 0 so that it never turns b = c into evidence. With no
    discordant pair the statistic is 0 and p is 1.
    """
    y, (calls_a, calls_b) = _validated(y_true, pred_a, pred_b)
    for name, calls in (("pred_a", calls_a), ("pred_b", calls_b)):
        if not np.isin(calls, (0, 1)).all():
            raise ValueError(f"{name} must hold 0/1 calls; use predict_labels on probabilities")
    correct_a, correct_b = calls_a == y, calls_b == y
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    use_exact = b + c < MCNEMAR_EXACT_BELOW if exact is None else exact
    method = "exact" if use_exact else "chi2"
    if b + c == 0:
        statistic, p_value = 0.0, 1.0
    elif use_exact:
        statistic, p_value = float(min(b, c)), float(binomtest(b, b + c, 0.5).pvalue)
    else:
        statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
        p_value = float(chi2.sf(statistic, df=1))
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": p_value, "method": method}


def delong_test(y_true: ArrayLike, prob_a: ArrayLike, prob_b: ArrayLike, alpha: float = 0.05) -> dict[str, float]:
    """DeLong's test for two correlated AUROCs on the same cases (fast form, Sun & Xu 2014).

    Returns auroc_a, auroc_b, difference (a - b), its standard error se, z, the two-sided
    p_value and a normal (1 - alpha) CI of the difference (ci_low, ci_high). Images are
    treated as independent; with several images per patient prefer
    `paired_bootstrap_auroc` with `groups`. When se is 0, z is 0 and p is 1 for a zero
    difference (identical rankings); for another difference (a handful of cases, e.g. a
    constant model against a perfect one) the variance estimate has broken down, and z, p
    and the CI are NaN ("n/a" in the report) rather than a certainty the data cannot give.
    """
    _check_alpha(alpha)
    y, (a, b) = _validated(y_true, prob_a, prob_b)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if min(n_pos, n_neg) < 2:
        raise ValueError(f"DeLong's test needs 2 cases of each class, got {n_pos} positive, {n_neg} negative")
    scores = np.vstack([a, b])
    positives, negatives = scores[:, y == 1], scores[:, y == 0]
    # Midranks within each class and overall give, per case, the share of the other class
    # it outranks (ties count half): the structural components of the AUC estimate.
    rank_pos = rankdata(positives, axis=1)
    rank_neg = rankdata(negatives, axis=1)
    rank_all = rankdata(np.hstack([positives, negatives]), axis=1)
    components_pos = (rank_all[:, :n_pos] - rank_pos) / n_neg
    components_neg = 1.0 - (rank_all[:, n_pos:] - rank_neg) / n_pos
    aurocs = components_pos.mean(axis=1)
    covariance = np.cov(components_pos) / n_pos + np.cov(components_neg) / n_neg
    difference = float(aurocs[0] - aurocs[1])
    se = math.sqrt(max(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1], 0.0))
    if se > 0:
        z = difference / se
    else:
        z = 0.0 if difference == 0 else math.nan
    half_width = float(norm.ppf(1 - alpha / 2)) * se if math.isfinite(z) else math.nan
    return {
        "auroc_a": float(aurocs[0]),
        "auroc_b": float(aurocs[1]),
        "difference": difference,
        "se": se,
        "z": z,
        "p_value": float(2 * norm.sf(abs(z))),
        "ci_low": difference - half_width,
        "ci_high": difference + half_width,
    }


def auroc_counts(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney U of the positives: the (positive, negative) pairs ranked right, ties counting
    half, which is AUROC x pairs. Midranks are whole or half numbers, so U is exact in float64."""
    positives = int(labels.sum())
    return float(rankdata(scores)[labels == 1].sum() - positives * (positives + 1) / 2)


def paired_bootstrap_auroc(
    y_true: ArrayLike,
    prob_a: ArrayLike,
    prob_b: ArrayLike,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float | int]:
    """AUROC(a) - AUROC(b) with a paired (optionally patient-level) bootstrap CI and p-value.

    Both models are scored on the same resample each time, so their correlation is kept.
    The difference is exact (Mann-Whitney U counts, `auroc_counts`): two models that rank a
    resample alike differ by 0, not by a rounding error that would count on one side only.
    The two-sided p-value is 2 * the smaller share of differences on either side of 0, with
    the +1 Monte Carlo correction so that a finite number of resamples never reports p = 0.
    The CI is of order statistics (`_order_statistic_interval`), so that where alpha x the
    resamples / 2 is whole (the defaults, none skipped) it excludes 0 exactly when p < alpha.
    """
    _check_alpha(alpha)
    y, (a, b) = _validated(y_true, prob_a, prob_b)
    _require_both_classes(y)

    def aurocs_and_difference(labels: np.ndarray, a_scores: np.ndarray, b_scores: np.ndarray) -> tuple[float, ...]:
        pairs = float(labels.sum() * (labels.size - labels.sum()))
        count_a, count_b = auroc_counts(labels, a_scores), auroc_counts(labels, b_scores)
        return count_a / pairs, count_b / pairs, (count_a - count_b) / pairs

    point, replicates = _bootstrap(y, (a, b), aurocs_and_difference, groups, n_boot, seed)
    differences = replicates[:, 2]
    low, high, n_skipped = _order_statistic_interval(differences, alpha)
    valid = differences[np.isfinite(differences)]
    extreme = min(np.sum(valid <= 0), np.sum(valid >= 0))
    return {
        "auroc_a": float(point[0]),
        "auroc_b": float(point[1]),
        "difference": float(point[2]),
        "ci_low": low,
        "ci_high": high,
        "p_value": min(1.0, float(2 * (extreme + 1) / (valid.size + 1))),
        "n_skipped": n_skipped,
    }


def calibration_curve_data(
    y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10
) -> dict[str, list[float] | list[int] | float]:
    """Reliability-diagram points, expected calibration error (ece) and Brier score.

    Bins split [0, 1] into `n_bins` equal widths with scikit-learn's `calibration_curve`
    binning (each bin includes its upper edge). Only non-empty bins are listed (bin_low,
    bin_high, count, mean_predicted, fraction_positive), so every value is finite. ece is
    the count-weighted mean of |fraction_positive - mean_predicted|.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, (p,) = _validated(y_true, prob)
    if p.min() < 0 or p.max() > 1:
        raise ValueError("calibration needs probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of_case = np.searchsorted(edges[1:-1], p)
    counts = np.bincount(bin_of_case, minlength=n_bins)
    filled = counts > 0
    mean_predicted = np.bincount(bin_of_case, weights=p, minlength=n_bins)[filled] / counts[filled]
    fraction_positive = np.bincount(bin_of_case, weights=y, minlength=n_bins)[filled] / counts[filled]
    ece = float(np.sum(counts[filled] / y.size * np.abs(fraction_positive - mean_predicted)))
    return {
        "bin_low": edges[:-1][filled].tolist(),
        "bin_high": edges[1:][filled].tolist(),
        "count": counts[filled].tolist(),
        "mean_predicted": mean_predicted.tolist(),
        "fraction_positive": fraction_positive.tolist(),
        "ece": ece,
        "brier": float(brier_score_loss(y, p)),
    }


def _validated(y_true: ArrayLike, *scores: ArrayLike) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels as int64 0/1 and each score as finite float64, all 1-D and of one length."""
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 (normal) and 1 (abnormal)")
    checked = []
    for score in scores:
        values = np.asarray(score, dtype=np.float64)
        if values.shape != y.shape:
            raise ValueError(f"scores must have the shape of y_true {y.shape}, got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("scores must be finite")
        checked.append(values)
    return y.astype(np.int64), checked


def _require_both_classes(y: np.ndarray) -> None:
    if y.min() == y.max():
        raise ValueError(f"needs both classes in y_true, got only {int(y[0])}")


def _check_rate(name: str, value: float, *, allow_zero: bool) -> None:
    if not (0.0 <= value <= 1.0) or (value == 0.0 and not allow_zero):
        bounds = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {bounds}, got {value}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _ratio(numerator: int, denominator: int, *, undefined: float) -> float:
    return numerator / denominator if denominator else undefined


def _best_operating_point(
    y_true: ArrayLike, prob: ArrayLike, *, floor_on: Literal["sensitivity", "specificity"], floor: float
) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) maximising one rate while the other stays >= floor.

    Ties on the maximised rate go to the higher floored rate. The candidates are the
    empirical ROC points, including ``threshold=inf`` (no case called abnormal).
    """
    y, (p,) = _validated(y_true, prob)
    _require_both_classes(y)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    # Back to counts, then one division each, so that a rate equals the float that
    # binary_metrics reports for the same threshold and a floor like 0.95 compares exactly.
    sensitivity = np.rint(tpr * n_pos) / n_pos
    specificity = (n_neg - np.rint(fpr * n_neg)) / n_neg
    floored, maximised = (sensitivity, specificity) if floor_on == "sensitivity" else (specificity, sensitivity)
    eligible = np.flatnonzero(floored >= floor)
    best = eligible[np.lexsort((floored[eligible], maximised[eligible]))[-1]]
    return float(thresholds[best]), float(sensitivity[best]), float(specificity[best])


def _resample_indices(n: int, groups: ArrayLike | None, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays of bootstrap resamples: of cases, or of whole groups when given."""
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, size=n)
        return
    keys = np.asarray(groups)
    if keys.shape != (n,):
        raise ValueError(f"groups must have one key per case, shape ({n},), got {keys.shape}")
    _, group_of_case = np.unique(keys, return_inverse=True)
    cases_by_group = np.argsort(group_of_case, kind="stable")
    group_sizes = np.bincount(group_of_case)
    group_starts = np.cumsum(group_sizes) - group_sizes
    n_groups = group_sizes.size
    for _ in range(n_boot):
        chosen = rng.integers(0, n_groups, size=n_groups)
        sizes = group_sizes[chosen]
        position_in_group = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        yield cases_by_group[np.repeat(group_starts[chosen], sizes) + position_in_group]


def _bootstrap(
    y: np.ndarray,
    scores: Sequence[np.ndarray],
    statistic: Callable[..., Sequence[float]],
    groups: ArrayLike | None,
    n_boot: int,
    seed: int,
    one_class_resamples: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`statistic(y, *scores)` on the full data, shape (k,), and on `n_boot` resamples.

    The replicates have shape (n_boot, k); a resample holding one class only is not
    scored (unless `one_class_resamples`: the statistic returns NaN where it is undefined)
    and keeps a row of NaN, which `_percentile_interval` counts as skipped.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    point = np.asarray(statistic(y, *scores), dtype=np.float64)
    replicates = np.full((n_boot, point.size), np.nan)
    for row, indices in enumerate(_resample_indices(y.size, groups, n_boot, np.random.default_rng(seed))):
        resampled = y[indices]
        if one_class_resamples or resampled.min() < resampled.max():
            replicates[row] = statistic(resampled, *(score[indices] for score in scores))
    return point, replicates


def _order_statistic_interval(values: np.ndarray, alpha: float) -> tuple[float, float, int]:
    """(low, high, n_skipped): the m-th smallest and the m-th largest finite replicate, m =
    ceil(alpha / 2 x their number), the same from either end (numpy's quantiles are not), so
    that the interval excludes 0 exactly when fewer than m replicates lie on its far side."""
    finite = np.sort(values[np.isfinite(values)])
    n_skipped = int(values.size - finite.size)
    if finite.size == 0:
        return math.nan, math.nan, n_skipped
    m = max(1, math.ceil(alpha / 2 * finite.size))
    return float(finite[m - 1]), float(finite[finite.size - m]), n_skipped


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float, int]:
    """(low, high, n_skipped) of the finite replicates; NaN bounds when none is finite."""
    finite = values[np.isfinite(values)]
    n_skipped = int(values.size - finite.size)
    if finite.size == 0:
        return math.nan, math.nan, n_skipped
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high), n_skipped
