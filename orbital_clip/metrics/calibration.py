"""Calibration: per-image Brier score and log-loss, equal-width reliability bins (ECE), and the
temperature fitted on validation logits.
"""

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

DEFAULT_ECE_BINS = 10  # equal-width bins of the max probability (Guo et al. 2017 use 15; 10 is common)
LOG_LOSS_EPS = float(np.finfo(np.float64).eps)  # probabilities clipped here, as scikit-learn does
CALIBRATION_METRICS = ("brier", "log_loss", "ece")
# fit_temperature searches log T in [-bound, bound] (T from e^-4 to e^4); train/health.py reads a
# fit at either end as a sign of collapse, so both read this one constant
TEMPERATURE_LOG_BOUND = 4.0


def brier_per_image(y_true, probs):
    """Multi-class Brier score of each image: sum over classes of (p - onehot)^2, in [0, 2]."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(y_true, dtype=np.int64)]
    return ((probs - onehot) ** 2).sum(axis=1)


def log_loss_per_image(y_true, probs):
    """-ln p(true class) of each image, p clipped below at float64 eps (as scikit-learn)."""
    probs = np.asarray(probs, dtype=np.float64)
    picked = probs[np.arange(len(probs)), np.asarray(y_true, dtype=np.int64)]
    return -np.log(np.clip(picked, LOG_LOSS_EPS, 1.0))


def calibration_bins(values, n_bins=DEFAULT_ECE_BINS):
    """Bin index of each value in `n_bins` equal-width bins of [0, 1], right-closed:
    (0, 1/n], (1/n, 2/n], ... with 0 itself in the first bin."""
    index = np.ceil(np.asarray(values, dtype=np.float64) * n_bins).astype(np.int64) - 1
    return np.clip(index, 0, n_bins - 1)


def reliability_table(scores, hits, n_bins=DEFAULT_ECE_BINS):
    """Per equal-width bin of `scores`: (count, mean score, observed frequency of `hits`),
    NaN means for empty bins. The data of one reliability diagram."""
    scores = np.asarray(scores, dtype=np.float64)
    bins = calibration_bins(scores, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(bins, scores, minlength=n_bins) / count
        observed = np.bincount(bins, np.asarray(hits, dtype=np.float64), minlength=n_bins) / count
    return count, mean_score, observed


def mean_nll(logits, y_true, temperature=1.0):
    """Mean negative log-likelihood (cross-entropy) of softmax(logits / temperature) at the true
    classes, in float64: the validation loss, and what `fit_temperature` minimises."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true, dtype=np.int64)
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(y_true)), y_true].mean())


def fit_temperature(logits, y_true):
    """Temperature T > 0 minimising the validation NLL of softmax(logits / T) (Guo et al. 2017)."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    if len(y_true) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: mean_nll(logits, y_true, math.exp(log_t)),
                             bounds=(-TEMPERATURE_LOG_BOUND, TEMPERATURE_LOG_BOUND), method="bounded")
    return float(math.exp(result.x))
