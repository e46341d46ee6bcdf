"""`lungray calibrate`: a model's operating threshold and temperature chosen on a site's labelled sample.

Three numbers come out, each judged honestly:
- the threshold, by `lungray.metrics.choose_threshold` (the training rule) on the whole
  sample, with a patient-bootstrap CI of the threshold itself and the metrics it reaches
  there, which are apparent (the sample chose the threshold, so they flatter it);
- the temperature, one scalar fitted by NLL on the sample (`temperature.fit_temperature`);
- the cross-validated estimate over the site's patients: k patient folds, stratified; on
  each, threshold and temperature are chosen on the other k-1 folds and the held-out
  fold's images are called with them. The pooled sensitivity and specificity of those
  calls (with a patient-bootstrap CI) are what a site can expect from a threshold chosen
  on a sample of its size: the number to hold against a bar such as sensitivity >= 0.95
  at specificity >= 0.85.

Too small a sample: the rule keeps sensitivity >= target on new films in expectation, but on n
abnormal films, even all of them detected, the one-sided 95% lower confidence bound on
sensitivity is 0.05^(1/n) (Clopper-Pearson); it reaches the target only when
n >= log(0.05) / log(target), the "rule of three" 3 / (1 - target): 59 abnormal films for
0.95. With fewer, the sample cannot show that the target is met, and `calibrate` warns.
(At under 2 / (1 - target) - 1 abnormal films, 39 for 0.95, the rule can miss none, and the
threshold sits on the single lowest-scored abnormal film: far below the warning's bound.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.model_selection import StratifiedGroupKFold

from lungray.metrics import THRESHOLD_RULE, binary_metrics, bootstrap_ci, calibration_curve_data, choose_threshold, metrics_with_ci, predict_labels
from lungray.modeldir import load_model_dir, proba_from_logits
from lungray.site.data import read_site_sample
from lungray.site.lineage import check_free, earlier_use, save_derived, site_name, written_step
from lungray.site.temperature import fit_temperature

CONFIDENCE = 0.95  # of the small-sample rule and of every interval
#: The pooled cross-validated rates reported, taken from `binary_metrics` of the held-out calls.
CV_RATES = ("recall", "specificity", "accuracy", "precision")


@dataclass(frozen=True)
class CalibrateConfig:
    """Which model, which site sample, the sensitivity target, and how hard to resample."""

    model_dir: str
    data: str
    output: str
    min_sensitivity: float = 0.95
    site: str | None = None
    folds: int = 5
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        check_calibration_settings(self.min_sensitivity, self.folds, self.n_boot)


def check_calibration_settings(min_sensitivity: float, folds: int, n_boot: int) -> None:
    """The settings of choosing a threshold and cross-validating it, checked before any work."""
    if not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must lie in (0, 1], got {min_sensitivity}")
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")


def abnormal_needed(target: float, confidence: float = CONFIDENCE) -> float:
    """Abnormal films needed before a perfect result bounds sensitivity >= `target` at `confidence`."""
    return math.inf if target >= 1.0 else math.log(1.0 - confidence) / math.log(target)


def sample_warnings(labels: np.ndarray, target: float) -> list[str]:
    """The too-small-sample warning of the module docstring, or none."""
    n_abnormal = int(labels.sum())
    needed = abnormal_needed(target)
    if n_abnormal >= needed:
        return []
    bound = f"{(1 - CONFIDENCE) ** (1 / n_abnormal):.3f}" if n_abnormal else "0"
    if math.isinf(needed):  # a target of 1.0: every lower bound stays below it
        return [
            f"the target sensitivity 1.0 cannot be shown by any sample: with all {n_abnormal} abnormal images detected, "
            f"the one-sided {CONFIDENCE:.0%} lower bound on sensitivity is {bound}, and the threshold is unstable"
        ]
    return [
        f"the sample holds {n_abnormal} abnormal images: with all of them detected, the one-sided "
        f"{CONFIDENCE:.0%} lower bound on sensitivity is {bound}, below the target "
        f"{target}; at least {math.ceil(needed)} abnormal images are needed to show it, and the threshold is unstable"
    ]


def sensitivity_interval(labels: np.ndarray, calls: np.ndarray) -> dict[str, float]:
    """Exact (Clopper-Pearson) two-sided interval of the sensitivity of `calls`."""
    positives = labels == 1
    interval = binomtest(int(calls[positives].sum()), int(positives.sum())).proportion_ci(CONFIDENCE, method="exact")
    return {"ci_low": float(interval.low), "ci_high": float(interval.high)}


def site_operating_point(
    labels: np.ndarray, prob: np.ndarray, patients: np.ndarray, target: float, n_boot: int, seed: int
) -> dict[str, Any]:
    """The threshold on the whole sample, its patient-bootstrap CI, and the (apparent) metrics it reaches."""
    threshold = choose_threshold(labels, prob, target)
    _, low, high = bootstrap_ci(labels, prob, lambda y, p: choose_threshold(y, p, target), groups=patients, n_boot=n_boot, seed=seed)
    return {
        "threshold": threshold,
        "threshold_ci": {"ci_low": low, "ci_high": high, "method": "patient bootstrap of the threshold rule"},
        "apparent_metrics": {
            "note": "judged on the images that chose the threshold: optimistic; see cross_validation",
            **metrics_with_ci(labels, prob, threshold, groups=patients, n_boot=n_boot, seed=seed),
            "counts": {key: value for key, value in binary_metrics(labels, prob, threshold).items() if key in ("n", "tp", "fp", "tn", "fn")},
        },
    }


def patient_folds(labels: np.ndarray, patients: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, held-out) index pairs: patients never straddle folds, and folds keep the class balance."""
    n_patients = np.unique(patients).size
    if n_patients < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} patients, the sample has {n_patients}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    pairs = list(splitter.split(np.zeros(len(labels)), labels, groups=patients))
    for fit, _ in pairs:
        if labels[fit].min() == labels[fit].max():
            raise ValueError(f"the sample is too small for {folds}-fold cross-validation: a fold's complement holds one class")
    return pairs


def cross_validate(
    logits: np.ndarray, labels: np.ndarray, patients: np.ndarray, target: float, folds: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """Pooled held-out calls and calibration when threshold and temperature are chosen on the other folds."""
    calls = np.zeros(len(labels), dtype=np.int64)
    held_out_prob = np.zeros(len(labels))
    per_fold = []
    for fit, held_out in patient_folds(labels, patients, folds, seed):
        temperature = fit_temperature(logits[fit], labels[fit])
        threshold = choose_threshold(labels[fit], proba_from_logits(logits[fit], temperature), target)
        held_out_prob[held_out] = proba_from_logits(logits[held_out], temperature)
        calls[held_out] = predict_labels(held_out_prob[held_out], threshold)
        per_fold.append({"n_images": int(held_out.size), "temperature": temperature, "threshold": threshold})
    # The calls as 0/1 scores at threshold 0.5 give their counts and rates through binary_metrics.
    counts = binary_metrics(labels, calls, 0.5)
    with_ci = metrics_with_ci(labels, calls, 0.5, groups=patients, n_boot=n_boot, seed=seed)
    return {
        "folds": folds,
        "seed": seed,
        "method": "stratified patient folds; threshold and temperature chosen on k-1 folds, held-out calls pooled",
        **{key: counts[key] for key in ("n", "tp", "fp", "tn", "fn")},
        **{name: with_ci[name] for name in CV_RATES},
        "sensitivity_exact_ci": sensitivity_interval(labels, calls),
        "calibration_held_out": {
            "uncalibrated": _calibration_summary(labels, proba_from_logits(logits)),
            "temperature_scaled": _calibration_summary(labels, held_out_prob),
        },
        "per_fold": per_fold,
    }


def _calibration_summary(labels: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    curve = calibration_curve_data(labels, prob)
    return {"ece": float(curve["ece"]), "brier": float(curve["brier"])}


def calibration_record(
    labels: np.ndarray, patients: np.ndarray, logits: np.ndarray, target: float, folds: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """Everything calibration chooses and measures on a labelled sample: the body of a lineage step."""
    temperature = fit_temperature(logits, labels)
    prob = proba_from_logits(logits, temperature)
    return {
        "temperature": temperature,
        **site_operating_point(labels, prob, patients, target, n_boot, seed),
        "calibration": {
            "uncalibrated": _calibration_summary(labels, proba_from_logits(logits)),
            "temperature_scaled": _calibration_summary(labels, prob),
        },
        "cross_validation": cross_validate(logits, labels, patients, target, folds, n_boot, seed),
        "warnings": sample_warnings(labels, target),
    }


def calibrate(config: CalibrateConfig) -> dict[str, Any]:
    """Write the calibrated model directory to `config.output`; returns the lineage step written (the CLI's JSON)."""
    check_free(config.output)
    parent = load_model_dir(config.model_dir)
    sample = read_site_sample(config.data, parent, labelled=True)
    assert sample.labels is not None
    record = calibration_record(
        sample.labels, sample.patients, parent.predict_logits(sample.images),
        config.min_sensitivity, config.folds, config.n_boot, config.seed,
    )
    described = sample.describe()
    step = {
        "step": "calibrate",
        "site": site_name(config.site, config.data),
        **described,
        "min_sensitivity": config.min_sensitivity,
        **record,
        "warnings": [*earlier_use(parent.meta, described), *sample.patient_warnings(), *record["warnings"]],
    }
    policy = {"rule": THRESHOLD_RULE, "min_sensitivity": config.min_sensitivity, "chosen_on": f"site:{step['site']}"}
    output = save_derived(
        config.output, parent, parent.model.state_dict(), step,
        threshold=record["threshold"], temperature=record["temperature"], threshold_policy=policy,
    )
    return written_step(output)
