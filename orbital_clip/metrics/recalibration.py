"""Logistic recalibration (Cox 1958; Van Calster et al. 2019, 'Calibration: the Achilles heel'):
the calibration slope (logit(y) = a + b logit(p): b < 1 means too extreme, b > 1 too timid) and
calibration-in-the-large (the intercept a with logit(p) as an offset: a > 0 means risks too low),
with Wald intervals, one-vs-rest per class. Unlike the ECE these depend on no binning.
Fitted by Newton-Raphson here (a two-parameter logistic regression) so the package needs no
statsmodels; the tests check every number against statsmodels' Logit and GLM with an offset.
"""

import math

import numpy as np
from scipy.special import expit
from scipy.stats import norm

from orbital_clip.metrics.classification import CONFIDENCE_LEVEL

LOGIT_EPS = 1e-6  # probabilities clipped to [eps, 1 - eps]: a softmax of 1.0 has no finite logit
MAX_ITER = 50


def logit(p):
    p = np.clip(np.asarray(p, np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(p / (1.0 - p))


def fit_logistic(y, design, offset=None):
    """Maximum-likelihood logistic regression of the 0/1 `y` on `design` (N, K) (+ `offset`).

    Returns
    -------
    (coefficients (K,), covariance (K, K) = inverse Fisher information), or (None, None) when
    the fit does not converge (complete separation: every positive outranks every negative).
    """
    y, design = np.asarray(y, np.float64), np.asarray(design, np.float64)
    offset = np.zeros(len(y)) if offset is None else np.asarray(offset, np.float64)
    coef = np.zeros(design.shape[1])
    for _ in range(MAX_ITER):
        mu = expit(design @ coef + offset)
        info = design.T @ (design * (mu * (1.0 - mu))[:, None])
        try:
            step = np.linalg.solve(info, design.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None, None
        coef = coef + step
        if np.max(np.abs(step)) < 1e-10:
            if np.max(np.abs(coef)) > 30:  # diverging towards separation, not converged
                return None, None
            return coef, np.linalg.inv(info)
    return None, None


def wald(estimate, variance, confidence):
    half = norm.ppf(0.5 + confidence / 2.0) * math.sqrt(variance)
    return [float(estimate - half), float(estimate + half)]


def calibration_slope_intercept(positive, p, confidence=CONFIDENCE_LEVEL):
    """Calibration slope and calibration-in-the-large of the probabilities `p` of one class.

    Returns
    -------
    dict: n, n_positive, observed (event rate), expected (mean p), slope, slope_ci, intercept
    (calibration-in-the-large), intercept_ci; None where undefined (no positive or no negative
    image, or perfect separation). Perfect calibration: slope 1, intercept 0.
    """
    positive = np.asarray(positive, bool)
    p = np.asarray(p, np.float64)
    out = {"n": int(len(p)), "n_positive": int(positive.sum()),
           "observed": float(positive.mean()) if len(p) else None,
           "expected": float(p.mean()) if len(p) else None,
           "slope": None, "slope_ci": None, "intercept": None, "intercept_ci": None}
    if positive.all() or not positive.any():
        return out
    lp = logit(p)
    coef, cov = fit_logistic(positive, np.column_stack([np.ones(len(p)), lp]))
    if coef is not None:
        out.update(slope=float(coef[1]), slope_ci=wald(coef[1], cov[1, 1], confidence))
    coef, cov = fit_logistic(positive, np.ones((len(p), 1)), offset=lp)
    if coef is not None:
        out.update(intercept=float(coef[0]), intercept_ci=wald(coef[0], cov[0, 0], confidence))
    return out


def per_class_recalibration(y_true, probs, class_names, confidence=CONFIDENCE_LEVEL):
    """`calibration_slope_intercept` of each class one-vs-rest: {class name: dict}."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    return {name: calibration_slope_intercept(y_true == k, probs[:, k], confidence)
            for k, name in enumerate(class_names)}
