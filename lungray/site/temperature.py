"""Temperature scaling (Guo et al. 2017): one scalar T, logits / T, fitted by minimising the NLL.

A site's films shift a model's logits; one temperature makes its probabilities honest
again there without changing the ranking (AUROC) or, with the log-odds threshold rule,
which cases a threshold re-chosen on the same sample calls abnormal.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

#: Search range of log T: T from 1/100 to 100 covers any useful rescaling; at the edges
#: the sample is separable (T -> 0) or uninformative (T -> inf) and the edge is returned.
LOG_T_BOUNDS = (-math.log(100.0), math.log(100.0))


def scaled_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising `scaled_nll` (bounded scalar search over log T).

    The NLL is convex in 1/T, so the minimum found is the global one.
    """
    if len(logits) != len(labels) or len(labels) == 0:
        raise ValueError("fit_temperature needs one label per row of logits, and at least one row")
    result = minimize_scalar(
        lambda log_t: scaled_nll(logits, labels, math.exp(log_t)), bounds=LOG_T_BOUNDS, method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))
